"""`ats eval`: accuracy, mean GFLOPs and throughput of a model, unpatched and with each config, in one run."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import ats

from ..adapters import as_logits, data_config, depth_of, family_of, logits_from, tokens_before
from ..calibration import nearest_merge
from ..data.build import build_dataset, knows_bundled_classes
from ..data.distributed import ONE_PROCESS, Processes, interleave, make_loader, torchrun_processes
from ..data.skipped import DEFAULT_MAX_BAD, SkippedImages, dataset_size
from ..methods import ATSConfig, EViTConfig, KeepAllConfig, MergeConfig, PatchConfig, SAINTConfig, StackedConfig
from .options import (
    add_config_arguments,
    add_data_arguments,
    add_model_arguments,
    config_flags_given,
    configs_from_arguments,
    load_model,
    random_weights,
)
from .timing import measure_throughput


@dataclass
class EvalRow:
    """One evaluated config. tokens_in, tokens_out: [N, depth] long, per image and block; top1 None where the
    labels are not the model's classes (the bundled images run through a model trained on other data)."""

    method: str
    config: str
    params: int
    gflops: float
    throughput: float
    top1: Optional[float]
    top1_change: Optional[float]
    tokens_in: torch.Tensor
    tokens_out: torch.Tensor
    ats_blocks: List[int]
    skipped: int = 0
    nonfinite: int = 0

    def to_json(self) -> dict:
        kept = self.tokens_out[:, self.ats_blocks[-1]].float() if self.ats_blocks else self.tokens_out[:, -1].float()
        return dict(method=self.method, config=self.config, params=self.params, gflops=round(self.gflops, 5),
                    throughput=round(self.throughput, 2), top1=_rounded(self.top1),
                    top1_change=_rounded(self.top1_change),
                    tokens_per_block=[round(value, 2) for value in self.tokens_in.float().mean(0).tolist()],
                    kept_tokens_min=int(kept.min()), kept_tokens_mean=round(float(kept.mean()), 2),
                    kept_tokens_max=int(kept.max()), images=len(self.tokens_in), skipped=self.skipped,
                    nonfinite_outputs=self.nonfinite)

    def plot_record(self) -> dict:
        return dict(method=self.method, config=self.config, gflops=self.gflops, top1=self.top1,
                    tokens_in=self.tokens_in, tokens_out=self.tokens_out, ats_blocks=self.ats_blocks)


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


def method_of(config: Optional[PatchConfig]) -> str:
    """'unpatched', 'ats', 'topk', 'evit', 'merge', 'saint', or for stacked configs their methods joined by '+'
    (e.g. 'evit+ats')."""
    if config is None:
        return "unpatched"
    if isinstance(config, StackedConfig):
        return "+".join(method_of(part) for part in config.configs)
    if isinstance(config, MergeConfig):
        return "merge"
    if isinstance(config, SAINTConfig):
        return "saint"
    if isinstance(config, EViTConfig):
        return "evit"
    if isinstance(config, KeepAllConfig):
        return "keep-all"
    return "topk" if config.sampler == "topk" else "ats"


#: Throughput is timed on the first this-many images of the first batch (by default; ``--timing-images``).
TIMING_BATCH_SIZE = 64


@dataclass
class BatchResult:
    """What one batch gave under one config: correct and non-finite predictions, tokens each image took in and
    kept per block ([B, depth]), and each image's GFLOPs ([B]; None for the unpatched model)."""

    correct: int
    nonfinite: int
    tokens_in: torch.Tensor
    tokens_out: torch.Tensor
    gflops: Optional[torch.Tensor]


@dataclass
class EvalShare:
    """One process's part of an evaluation: per batch, a BatchResult per config; the images it skipped; its
    throughput per config (None when it had no batch)."""

    batches: List[List[BatchResult]]
    skipped: List[str]
    throughputs: Optional[List[float]]


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, configs: Sequence[Optional[PatchConfig]], repeats: int = 5,
             progress: bool = True, max_bad: float = DEFAULT_MAX_BAD, labels: bool = True,
             processes: Processes = ONE_PROCESS, static: bool = False,
             timing_images: int = TIMING_BATCH_SIZE) -> List[EvalRow]:
    """Evaluate ``model`` as it is (config None) and patched with each config, on one pass over ``loader``.

    Each batch is read once and run through every config; the blocks before the first block a config
    changes run once per batch for all the configs that start there (``ats.adapters.tokens_before``). Throughput
    (img/s, median of ``repeats``) is measured on the first ``timing_images`` images, every config in this same
    run, with whole forwards. Images the loader skipped (``collate_usable``) are counted, up to ``max_bad`` of the
    data set; an image whose logits are not finite counts as an error and is reported. ``labels`` False: the labels
    are not the model's classes, and top-1 is None. Under torchrun each process evaluates its share of the
    batches (``make_loader(..., processes)``) and every process returns the rows of the whole data set, equal
    to one process's but for throughput, the sum over processes. ``static``: every config in static mode
    (``ats.patch(..., static=True)``; its GFLOPs are its capacity's). The model is left unpatched.
    """
    model.eval()
    share = _evaluate_share(model, loader, configs, repeats, progress and processes.main,
                            SkippedImages(dataset_size(loader), max_bad), static, timing_images)
    shares = processes.gather(share)
    batches = interleave([part.batches for part in shares])
    skipped = SkippedImages(dataset_size(loader), max_bad, names=[name for part in shares for name in part.skipped])
    skipped.check()
    if not batches:
        raise ValueError("the dataset is empty" + (f" (all {len(skipped)} images were skipped)" if skipped else "")
                         + "; nothing to evaluate")
    throughputs = [sum(values) for values in zip(*[part.throughputs for part in shares if part.throughputs])]
    depth = depth_of(model)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for index, config in enumerate(configs):
        results = [batch[index] for batch in batches]
        seen = sum(len(result.tokens_in) for result in results)
        nonfinite = sum(result.nonfinite for result in results)
        top1 = 100.0 * sum(result.correct for result in results) / seen if labels else None
        gflops = ats.gflops(model) if config is None else float(torch.cat([result.gflops for result in results]).mean())
        blocks = [] if config is None else config.patched_blocks(depth)
        rows.append(EvalRow(method_of(config), config_label(config, static), params,
                            gflops, throughputs[index], top1, None, torch.cat([result.tokens_in for result in results]),
                            torch.cat([result.tokens_out for result in results]), blocks, len(skipped), nonfinite))
        if nonfinite and processes.main:
            tqdm.write(f"ats: warning: {nonfinite} of {seen} images gave non-finite logits under "
                       f"{rows[-1].config}; they count as errors in its top-1", file=sys.stderr)
    for row in rows:
        row.top1_change = None if row.top1 is None else row.top1 - rows[0].top1
    return rows


def _evaluate_share(model: nn.Module, loader: DataLoader, configs: Sequence[Optional[PatchConfig]], repeats: int,
                    progress: bool, skipped: SkippedImages, static: bool, timing_images: int) -> EvalShare:
    """This process's batches through every config, and the throughput of each on the first ``timing_images`` of
    its first batch."""
    device = next(model.parameters()).device
    depth = depth_of(model)
    num_tokens = family_of(model).shape(model).num_tokens
    first_of_start = {config.first_block: config for config in reversed(configs) if config is not None}
    batches: List[List[BatchResult]] = []
    timing_batch = None
    try:
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
            skipped.note(batch)
            images, labels = batch[0].to(device), batch[1].to(device)
            if len(labels) == 0:
                continue
            timing_batch = images[:timing_images] if timing_batch is None else timing_batch
            tokens = {}
            for start, config in first_of_start.items():
                set_config(model, config, static)
                tokens[start] = tokens_before(model, images, start)
            results = []
            for config in configs:
                set_config(model, config, static)
                if config is None:
                    logits = as_logits(model(images))
                else:
                    logits = logits_from(model, tokens[config.first_block], config.first_block)
                finite = torch.isfinite(logits).all(dim=-1)
                results.append(BatchResult(
                    int(((logits.argmax(-1) == labels) & finite).sum()), int((~finite).sum()),
                    _tokens(model, config, len(labels), depth, num_tokens, "tokens"),
                    _tokens(model, config, len(labels), depth, num_tokens, "tokens_out"),
                    None if config is None else ats.last_stats(model).gflops.cpu()))
            batches.append(results)
        throughputs = None if timing_batch is None else _time_configs(model, configs, timing_batch, repeats,
                                                                       progress, static)
    finally:
        set_config(model, None)
    return EvalShare(batches, list(skipped.names), throughputs)


def _time_configs(model: nn.Module, configs: Sequence[Optional[PatchConfig]], images: torch.Tensor, repeats: int,
                  progress: bool, static: bool) -> List[float]:
    """The throughput of each config on ``images`` (median of ``repeats`` forwards after one warm-up), with a
    progress bar over the forwards."""
    throughputs = []
    with tqdm(total=len(configs) * (repeats + 1), desc=f"throughput ({len(images)} images)", unit="forward",
              disable=not progress, file=sys.stderr) as bar:
        for config in configs:
            set_config(model, config, static)
            throughputs.append(measure_throughput(model, images, repeats=repeats, warmup=1, on_forward=bar.update))
    return throughputs


def set_config(model: nn.Module, config: Optional[PatchConfig], static: bool = False) -> None:
    """Patch ``model`` with ``config`` (in static mode with ``static``), or unpatch it for None (the unpatched
    model)."""
    if config is None:
        if ats.is_patched(model):
            ats.unpatch(model)
    else:
        ats.patch(model, config, static=static)


def config_label(config: Optional[PatchConfig], static: bool = False) -> str:
    """How tables and JSON name a config: 'unpatched', its ``describe()``, with ' [static]' in static mode."""
    if config is None:
        return "unpatched"
    return config.describe() + (" [static]" if static else "")


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
               "n/a" if row.top1 is None else f"{row.top1:.2f}",
               "n/a" if row.top1_change is None else f"{row.top1_change:+.2f}", kept_summary(row.to_json()))
              for row in rows]
    return text_table(lines)


def recommended_and_peer(model: nn.Module, dataset: Dataset, batch_size: int) -> Tuple[ATSConfig, PatchConfig]:
    """The recommended config (``ATSConfig.recommended``) and the peer it is compared with: token merging at about
    its mean GFLOPs on the first batch of ``dataset`` (the same batch on every process of a torchrun) where the
    model can merge; where it cannot (a video model: only ATS runs, on tubes), tube fusing without ``distinct``."""
    recommended = ATSConfig.recommended(depth_of(model))
    if not accepts(model, MergeConfig(1)):
        return recommended, replace(recommended, distinct=0.0)
    device = next(model.parameters()).device
    images = next(batch[0] for batch in make_loader(dataset, batch_size, 0) if len(batch[1]))
    try:
        with torch.inference_mode():
            ats.patch(model, recommended)(images.to(device))
        gflops = float(ats.last_stats(model).gflops.mean())
    finally:
        set_config(model, None)
    return recommended, nearest_merge(model, gflops, tuple(images.shape[1:]))


def accepts(model: nn.Module, config: PatchConfig) -> bool:
    """Whether ``model`` can be patched with ``config`` (its family refuses some methods); leaves it unpatched."""
    try:
        ats.patch(model, config)
    except ValueError:
        return False
    finally:
        set_config(model, None)
    return True


def which_row(recommended: ATSConfig, peer: PatchConfig) -> str:
    """The line under the default table that says which row is for what."""
    if isinstance(peer, MergeConfig):
        compared = f"'{peer.describe()}' is token merging at about its GFLOPs, for comparison"
    else:
        compared = (f"'{peer.describe()}' is the same without distinct, for comparison (this model runs ATS only: "
                    "token merging, EViT and SAINT are refused)")
    return (f"which row: '{recommended.describe()}' is the recommended setting; {compared}; the paper's six configs "
            "above them drop more tokens than a model with peaked class attention can spare (docs/results.md)")


#: Why top-1 means nothing when the bundled images' labels are not the model's classes.
BUNDLED_LABELS = ("the bundled images are Fashion-MNIST garments (resized to this model's input), not this model's "
                  "classes; pass --data DIR (an ImageFolder of its classes, e.g. ImageNet's val folder) for accuracy")


def top1_unavailable(args: argparse.Namespace, model: nn.Module, dataset: Dataset) -> List[str]:
    """Why the labels of ``dataset`` cannot be scored as ``model``'s classes (empty: they can): random weights,
    the bundled images under a model of other classes, or a folder whose classes differ from the model's in count
    or names."""
    reasons = []
    if random_weights(args):
        reasons.append(f"{args.model} has random weights (add --pretrained for timm's, or --checkpoint FILE)")
    inputs = data_config(model)
    if args.data is None:
        if not knows_bundled_classes(inputs):
            reasons.append(BUNDLED_LABELS)
        return reasons
    folder = dataset_classes(dataset)
    zeros = torch.zeros(1, *family_of(model).input_size(model), device=next(model.parameters()).device)
    with torch.inference_mode():
        outputs = as_logits(model(zeros)).shape[-1]
    names = inputs["class_names"]
    if len(folder) != outputs:
        reasons.append(f"{args.data} has {len(folder)} classes and the model {outputs} (a checkpoint with another "
                       "head: --num-classes N)")
    elif names is not None and len(names) == outputs and folder not in (list(names), imagenet_label_names(model)):
        reasons.append(f"the class folders of {args.data} ({', '.join(folder[:3])}, ...) are not the model's classes "
                       f"({', '.join(map(str, names[:3]))}, ...) in that order")
    return reasons


def dataset_classes(dataset: Dataset) -> List[str]:
    """The class names of an ImageFolder or video folder (``build_dataset``'s, perhaps a Subset of it), in label
    order."""
    while not hasattr(dataset, "classes"):
        dataset = getattr(dataset, "dataset", None) or dataset.folder
    return list(dataset.classes)


def imagenet_label_names(model: nn.Module) -> Optional[List[str]]:
    """The synset folder names (n01440764, ...) of a timm model's ImageNet classes, as in ImageNet's val folder;
    None for other models."""
    import timm.data

    subset = timm.data.infer_imagenet_subset(model) if hasattr(model, "pretrained_cfg") else None
    return None if subset is None else list(timm.data.ImageNetInfo(subset).label_names())


def summary_line(rows: Sequence[EvalRow]) -> str:
    """'N images evaluated, M skipped' for stderr."""
    return f"{len(rows[0].tokens_in)} images evaluated, {rows[0].skipped} skipped as unusable"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", description=__doc__)
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats for throughput (median)")
    parser.add_argument("--timing-images", type=int, default=TIMING_BATCH_SIZE, metavar="N",
                        help=f"time throughput on the first N images (default {TIMING_BATCH_SIZE})")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write kept-token histograms and top-1/GFLOPs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.timing_images < 1:
        raise ValueError(f"--timing-images must be at least 1, got {args.timing_images}")
    with torchrun_processes(args.device) as processes:
        args.device = processes.device
        model = load_model(args)
        dataset = build_dataset(args.data, data_config(model), args.limit)
        unavailable = top1_unavailable(args, model, dataset)
        configs = [None, *configs_from_arguments(args, depth=depth_of(model))]
        defaults = not config_flags_given(args)
        if defaults:
            recommended, peer = recommended_and_peer(model, dataset, args.batch_size)
            configs += [recommended, peer]
        loader = make_loader(dataset, args.batch_size, args.workers, processes)
        rows = evaluate(model, loader, configs, repeats=args.repeats, max_bad=args.max_bad, labels=not unavailable,
                        processes=processes, static=args.static, timing_images=args.timing_images)
        if not processes.main:
            return 0
        where = f" ({processes.world_size} processes)" if processes.distributed else ""
        print(f"ats eval{where}: {summary_line(rows)}", file=sys.stderr)
        if unavailable:
            print(f"ats eval: top-1 is n/a: {'; '.join(unavailable)}", file=sys.stderr)
        if args.json:
            print(json.dumps([row.to_json() for row in rows], indent=1))
        else:
            print(format_table(rows))
            if defaults:
                print(which_row(recommended, peer))
        if args.plots is not None:
            from .plots import write_eval_plots

            for path in write_eval_plots([row.plot_record() for row in rows], args.plots):
                print(f"wrote {path}", file=sys.stderr)
    return 0
