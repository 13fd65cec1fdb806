"""`ats compare`: ATS against token merging, SAINT, EViT and top-K over a range of budgets, in one run.

Methods: the unpatched model; ATS multi-stage over a range of rho (plain, with ``fuse``, and with the
self-attention score and ``fuse`` on the SELF_ATTENTION_SCHEDULES); ATS with ``fuse``
over a range of ``min_kept`` floors (rho = 1); ATS with ``fuse`` over a range of ``distinct``
thresholds (rho = 1); top-K at the same rho; EViT over a range of keep rates (its blocks 3, 6, 9);
the token-merging baseline (ToMe) at a range of r; and SAINT (similarity-aware token pruning, the
first half of the blocks) at a range of similarity thresholds. One pass over the data runs every
config; the table and the top-1/GFLOPs frontier (a PNG) come from the same rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

from ..adapters import data_config, depth_of, family_of
from ..data.build import build_dataset
from ..data.distributed import make_loader, torchrun_processes
from ..methods import ATSConfig, EViTConfig, MergeConfig, PatchConfig, SAINTConfig
from ..methods.evit import EVIT_BLOCKS
from ..methods.saint import SAINT_GAMMA, SAINT_K
from .evaluate import EvalRow, evaluate, kept_summary, summary_line, text_table
from .options import (
    add_data_arguments,
    add_model_arguments,
    add_static_argument,
    count_or_fraction,
    load_model,
    require_data,
)

DEFAULT_RHOS = (1.0, 0.9, 0.8, 0.7)
DEFAULT_MIN_KEPT = (0.9, 0.85, 0.8, 0.75)
DEFAULT_DISTINCT = (0.9, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
DEFAULT_MERGE_R = (4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19)
DEFAULT_EVIT_KEEP_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
#: SAINT's similarity thresholds (first half of the blocks, K = 5, gamma = 10): about 60% to 25% saved here.
DEFAULT_SAINT_THRESHOLDS = (0.85, 0.9, 0.93, 0.95, 0.97)
#: (first block, every n-th block) of the self-attention + fuse variants: every block from 3 (the
#: paper's blocks), and every other block from 3 and from 1 (docs/results.md).
SELF_ATTENTION_SCHEDULES = ((3, 1), (3, 2), (1, 2))


def comparison_configs(depth: int, rhos: Sequence[float], min_kept: Sequence[Union[int, float]],
                       distinct: Sequence[float], merge_r: Sequence[int],
                       evit_keep_rates: Sequence[float] = DEFAULT_EVIT_KEEP_RATES,
                       saint_thresholds: Sequence[float] = DEFAULT_SAINT_THRESHOLDS,
                       ) -> List[Tuple[str, Optional[PatchConfig]]]:
    """(variant, config) pairs: every method at every budget, the unpatched model first."""
    configs: List[Tuple[str, Optional[PatchConfig]]] = [("unpatched", None)]
    configs += [("ATS", ATSConfig.multi_stage(rho, depth=depth)) for rho in rhos]
    configs += [("ATS + fuse", ATSConfig.multi_stage(rho, depth=depth, fuse=True)) for rho in rhos]
    configs += [("ATS + fuse + min_kept", ATSConfig.multi_stage(1.0, depth=depth, fuse=True, min_kept=floor))
                for floor in min_kept]
    configs += [("ATS + fuse + distinct", ATSConfig.multi_stage(1.0, depth=depth, fuse=True, distinct=threshold))
                for threshold in distinct]
    for first, every in SELF_ATTENTION_SCHEDULES:
        variant = "ATS + self-attention + fuse" + (f", every {every} from block {first}" if every > 1 else "")
        configs += [(variant, ATSConfig.multi_stage(rho, first=first, depth=depth, every=every,
                                                    score="self_attention", fuse=True)) for rho in rhos]
    configs += [("top-K", ATSConfig.multi_stage(rho, depth=depth, sampler="topk")) for rho in rhos]
    evit_blocks = tuple(index for index in EVIT_BLOCKS if index < depth)
    configs += [("EViT", EViTConfig(keep_rate, evit_blocks)) for keep_rate in evit_keep_rates]
    configs += [("merge (ToMe)", MergeConfig(r=r)) for r in merge_r]
    configs += [("SAINT", SAINTConfig.first_half(threshold, depth)) for threshold in saint_thresholds]
    return configs


def runnable(model: nn.Module, pairs: Sequence[Tuple[str, Optional[PatchConfig]]]
             ) -> List[Tuple[str, Optional[PatchConfig]]]:
    """The pairs whose config ``model``'s family can run (e.g. only ATS on tubes under divided space-time
    attention); a note on stderr names each method left out and why."""
    family, kept, left_out = family_of(model), [], set()
    for variant, config in pairs:
        try:
            if config is not None:
                family.check(model, config)
        except ValueError as error:
            if variant not in left_out:
                print(f"ats compare: left out {variant}: {error}", file=sys.stderr)
            left_out.add(variant)
            continue
        kept.append((variant, config))
    return kept


def comparison_record(variant: str, row: EvalRow) -> dict:
    return dict(row.to_json(), variant=variant)


def format_comparison(records: Sequence[dict]) -> str:
    lines = [("method", "config", "GFLOPs", "top-1 %", "change", "img/s", "kept (min/mean/max)")]
    lines += [(record["variant"], record["config"], f"{record['gflops']:.4f}", f"{record['top1']:.2f}",
               f"{record['top1_change']:+.2f}", f"{record['throughput']:.1f}", kept_summary(record))
              for record in records]
    return text_table(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", description=__doc__)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--rho", type=float, action="append", metavar="RHO",
                        help=f"multi-stage budgets for ATS and top-K; repeatable (default {DEFAULT_RHOS})")
    parser.add_argument("--merge-r", type=int, action="append", metavar="R",
                        help=f"tokens merged per block by the baseline; repeatable (default {DEFAULT_MERGE_R})")
    parser.add_argument("--min-kept", type=count_or_fraction, action="append", metavar="N",
                        help="floors of the ATS + fuse + min_kept variant, counts or fractions; repeatable "
                             f"(default {DEFAULT_MIN_KEPT})")
    parser.add_argument("--distinct", type=float, action="append", metavar="COS",
                        help="thresholds of the ATS + fuse + distinct variant; repeatable "
                             f"(default {DEFAULT_DISTINCT})")
    parser.add_argument("--evit", type=float, action="append", metavar="KEEP_RATE",
                        help=f"keep rates of EViT (blocks {', '.join(map(str, EVIT_BLOCKS))}); repeatable "
                             f"(default {DEFAULT_EVIT_KEEP_RATES})")
    parser.add_argument("--saint", type=float, action="append", metavar="THRESHOLD",
                        help=f"similarity thresholds of SAINT (the first half of the blocks, K = {SAINT_K}, gamma = "
                             f"{SAINT_GAMMA:g}); repeatable (default {DEFAULT_SAINT_THRESHOLDS})")
    add_static_argument(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for throughput (median)")
    parser.add_argument("--plot", type=Path, default=Path("ats-compare.png"), help="where to write the frontier PNG")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .plots import plot_frontier

    with torchrun_processes(args.device) as processes:
        args.device = processes.device
        model = load_model(args)
        require_data(args, model, "compare")
        pairs = runnable(model, comparison_configs(depth_of(model), args.rho or DEFAULT_RHOS,
                                                   args.min_kept or DEFAULT_MIN_KEPT, args.distinct or DEFAULT_DISTINCT,
                                                   args.merge_r or DEFAULT_MERGE_R,
                                                   args.evit or DEFAULT_EVIT_KEEP_RATES,
                                                   args.saint or DEFAULT_SAINT_THRESHOLDS))
        dataset = build_dataset(args.data, data_config(model), args.limit)
        loader = make_loader(dataset, args.batch_size, args.workers, processes)
        rows = evaluate(model, loader, [config for _, config in pairs], repeats=args.repeats, max_bad=args.max_bad,
                        processes=processes, static=args.static)
        if not processes.main:
            return 0
    print(f"ats compare: {summary_line(rows)}", file=sys.stderr)
    records = [comparison_record(variant, row) for (variant, _), row in zip(pairs, rows)]
    print(json.dumps(records, indent=1) if args.json else format_comparison(records))
    points = [dict(method=record["variant"], gflops=record["gflops"], top1=record["top1"]) for record in records]
    path = plot_frontier(points, args.plot, title="Top-1 against GFLOPs, off the shelf", baseline="unpatched")
    print(f"wrote {path}", file=sys.stderr)
    return 0
