"""`ats eval`: accuracy, mean GFLOPs and throughput of a model, unpatched and with each config, in one run."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import ats

from ..config import EViTConfig, KeepAllConfig, MergeConfig, PatchConfig, StackedConfig
from ..data.build import build_dataset
from ..data.skipped import DEFAULT_MAX_BAD, SkippedImages, dataset_size, make_loader
from ..patch import family_of
from .options import add_config_arguments, add_data_arguments, add_model_arguments, configs_from_arguments, load_model
from .timing import measure_throughput


@dataclass
class EvalRow:
    """One evaluated config. tokens_in, tokens_out: [N, depth] long, per image and block."""

    method: str
    config: str
    params: int
    gflops: float
    throughput: float
    top1: float
    top1_change: float
    tokens_in: torch.Tensor
    tokens_out: torch.Tensor
    ats_blocks: List[int]
    skipped: int = 0
    nonfinite: int = 0

    def to_json(self) -> dict:
        kept = self.tokens_out[:, self.ats_blocks[-1]].float() if self.ats_blocks else self.tokens_out[:, -1].float()
        return dict(method=self.method, config=self.config, params=self.params, gflops=round(self.gflops, 5),
                    throughput=round(self.throughput, 2), top1=round(self.top1, 3),
                    top1_change=round(self.top1_change, 3),
                    tokens_per_block=[round(value, 2) for value in self.tokens_in.float().mean(0).tolist()],
                    kept_tokens_min=int(kept.min()), kept_tokens_mean=round(float(kept.mean()), 2),
                    kept_tokens_max=int(kept.max()), images=len(self.tokens_in), skipped=self.skipped,
                    nonfinite_outputs=self.nonfinite)

    def plot_record(self) -> dict:
        return dict(method=self.method, config=self.config, gflops=self.gflops, top1=self.top1,
                    tokens_in=self.tokens_in, tokens_out=self.tokens_out, ats_blocks=self.ats_blocks)


def method_of(config: Optional[PatchConfig]) -> str:
    """'unpatched', 'ats', 'topk', 'evit', 'merge', or for stacked configs their methods joined by '+'
    (e.g. 'evit+ats')."""
    if config is None:
        return "unpatched"
    if isinstance(config, StackedConfig):
        return "+".join(method_of(part) for part in config.configs)
    if isinstance(config, MergeConfig):
        return "merge"
    if isinstance(config, EViTConfig):
        return "evit"
    if isinstance(config, KeepAllConfig):
        return "keep-all"
    return "topk" if config.sampler == "topk" else "ats"


#: Throughput is timed on the first this-many images of the first batch.
TIMING_BATCH_SIZE = 64


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, configs: Sequence[Optional[PatchConfig]], repeats: int = 5,
             progress: bool = True, max_bad: float = DEFAULT_MAX_BAD) -> List[EvalRow]:
    """Evaluate ``model`` as it is (config None) and patched with each config, on one pass over ``loader``.

    Each batch is read once and run through every config; the blocks before the first block any
    config changes run once per batch for all of them. Throughput (img/s, median of ``repeats``) is
    measured on the first TIMING_BATCH_SIZE images, every config in this same run, with whole forwards.
    Images the loader skipped (``collate_usable``) are counted, up to ``max_bad`` of the data set;
    an image whose logits are not finite counts as an error and is reported. The model is left unpatched.
    """
    model.eval()
    device = next(model.parameters()).device
    family = family_of(model)
    depth = family.depth(model)
    num_tokens = family.shape(model).num_tokens
    shared = min((config.first_block for config in configs if config is not None), default=0)
    correct = [0] * len(configs)
    nonfinite = [0] * len(configs)
    skipped = SkippedImages(dataset_size(loader), max_bad)
    tokens_in: List[List[torch.Tensor]] = [[] for _ in configs]
    tokens_out: List[List[torch.Tensor]] = [[] for _ in configs]
    flops: List[List[torch.Tensor]] = [[] for _ in configs]
    timing_batch = None
    seen = 0
    try:
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
            skipped.note(batch)
            images, labels = batch[0].to(device), batch[1].to(device)
            if len(labels) == 0:
                continue
            timing_batch = images[:TIMING_BATCH_SIZE] if timing_batch is None else timing_batch
            seen += len(labels)
            tokens = family.run_first_blocks(model, images, shared)
            for index, config in enumerate(configs):
                set_config(model, config)
                logits = family.logits_from_block(model, tokens, shared)
                finite = torch.isfinite(logits).all(dim=-1)
                correct[index] += int(((logits.argmax(-1) == labels) & finite).sum())
                nonfinite[index] += int((~finite).sum())
                tokens_in[index].append(_tokens(model, config, len(labels), depth, num_tokens, "tokens"))
                tokens_out[index].append(_tokens(model, config, len(labels), depth, num_tokens, "tokens_out"))
                if config is not None:
                    flops[index].append(ats.last_stats(model).gflops.cpu())
        if seen == 0:
            raise ValueError("the dataset is empty" + (f" (all {len(skipped)} images were skipped)" if skipped else "")
                             + "; nothing to evaluate")
        throughputs = []
        for config in configs:
            set_config(model, config)
            throughputs.append(measure_throughput(model, timing_batch, repeats=repeats, warmup=1))
        set_config(model, None)
        params = sum(p.numel() for p in model.parameters())
        base_gflops = ats.gflops(model)
    finally:
        set_config(model, None)

    rows = []
    for index, config in enumerate(configs):
        top1 = 100.0 * correct[index] / seen
        gflops = base_gflops if config is None else float(torch.cat(flops[index]).mean())
        blocks = [] if config is None else config.patched_blocks(depth)
        rows.append(EvalRow(method_of(config), "unpatched" if config is None else config.describe(), params,
                            gflops, throughputs[index], top1, 0.0, torch.cat(tokens_in[index]),
                            torch.cat(tokens_out[index]), blocks, len(skipped), nonfinite[index]))
        if nonfinite[index]:
            tqdm.write(f"ats: warning: {nonfinite[index]} of {seen} images gave non-finite logits under "
                       f"{rows[-1].config}; they count as errors in its top-1", file=sys.stderr)
    for row in rows:
        row.top1_change = row.top1 - rows[0].top1
    return rows


def set_config(model: nn.Module, config: Optional[PatchConfig]) -> None:
    """Patch ``model`` with ``config``, or unpatch it for None (the unpatched model)."""
    if config is None:
        if ats.is_patched(model):
            ats.unpatch(model)
    else:
        ats.patch(model, config)


def _tokens(model: nn.Module, config: Optional[PatchConfig], batch: int, depth: int, num_tokens: int,
            which: str) -> torch.Tensor:
    if config is None:
        return torch.full((batch, depth), num_tokens, dtype=torch.long)
    return getattr(ats.last_stats(model), which).cpu()


def text_table(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the header first) as left-aligned columns."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def kept_summary(record: dict) -> str:
    """'min/mean/max' tokens kept at the last ATS block, from a row's JSON record."""
    return f"{record['kept_tokens_min']}/{record['kept_tokens_mean']:.1f}/{record['kept_tokens_max']}"


def format_table(rows: Sequence[EvalRow]) -> str:
    """An aligned text table of the rows."""
    lines = [("config", "params", "GFLOPs", "img/s", "top-1 %", "change", "kept (min/mean/max)")]
    lines += [(row.config, f"{row.params / 1e6:.2f}M", f"{row.gflops:.4f}", f"{row.throughput:.1f}",
               f"{row.top1:.2f}", f"{row.top1_change:+.2f}", kept_summary(row.to_json())) for row in rows]
    return text_table(lines)


def summary_line(rows: Sequence[EvalRow]) -> str:
    """'N images evaluated, M skipped' for stderr."""
    return f"{len(rows[0].tokens_in)} images evaluated, {rows[0].skipped} skipped as unusable"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="accuracy, GFLOPs and throughput, unpatched vs. ATS configs",
                                   description=__doc__)
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats for throughput (median)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write kept-token histograms and top-1/GFLOPs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    configs = [None, *configs_from_arguments(args, depth=family_of(model).depth(model))]
    loader = make_loader(build_dataset(args.data, model, args.limit), args.batch_size, args.workers)
    rows = evaluate(model, loader, configs, repeats=args.repeats, max_bad=args.max_bad)
    print(f"ats eval: {summary_line(rows)}", file=sys.stderr)
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=1))
    else:
        print(format_table(rows))
    if args.plots is not None:
        from .plots import write_eval_plots

        for path in write_eval_plots([row.plot_record() for row in rows], args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0
