"""`ats calibrate`: ask for a budget, get a config (the search is ``ats.calibrate``, ``ats.calibration``).

A method (ATS, top-K, ATS with ``fuse`` + ``distinct``, EViT, token merging, SAINT) has one free
parameter that sets its cost: rho, the ``distinct`` threshold, the keep rate, r, or SAINT's similarity
threshold. What a value costs depends on the model and the images, so the search measures it:
bisection on that parameter, each step one pass over a small calibration set (the images stay in
memory), until the mean GFLOPs per image is within a tolerance (2%) of the target. A target outside
what the method can reach is refused with the nearest budget it can reach.
"""
from __future__ import annotations

import argparse
import json

from ..adapters import data_config
from ..calibration import DEFAULT_LIMIT, DEFAULT_TOLERANCE, METHODS, Calibration, calibrate
from ..data.build import build_dataset
from ..data.distributed import make_loader, torchrun_processes
from ..methods.adaptive_sampling import MULTI_STAGE_FIRST_BLOCK
from ..methods.evit import EVIT_BLOCKS
from .options import (
    add_max_bad_argument,
    add_model_arguments,
    add_static_argument,
    block_list,
    load_model,
    require_data,
)


def format_calibration(found: Calibration) -> str:
    record = found.to_json()
    return "\n".join([
        f"method:  {found.method}: {METHODS[found.method]}",
        f"target:  {found.target_gflops:.4f} GFLOPs ({found.target_gflops / found.unpatched_gflops:.1%} of the "
        f"unpatched {found.unpatched_gflops:.4f})",
        f"found:   {found.parameter}={found.value:g} -> {found.gflops:.4f} GFLOPs ({record['error']:+.1%}), "
        f"top-1 {found.top1:.2f}% on {found.images} images (unpatched {found.unpatched_top1:.2f}%; "
        f"{found.skipped} skipped as unusable), {found.steps} passes",
        f"config:  {found.config.describe()}",
        f"python:  ats.patch(model, {found.python})",
    ])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data", help="an ImageFolder of calibration images; default: the bundled Fashion-MNIST "
                                      "test set")
    group.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                       help=f"calibrate on the first N images (default {DEFAULT_LIMIT})")
    group.add_argument("--batch-size", type=int, default=250)
    add_max_bad_argument(group)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--gflops", type=float, metavar="G", help="the target mean GFLOPs per image")
    budget.add_argument("--fraction", type=float, metavar="F",
                        help="the target as a fraction of the unpatched model's GFLOPs, e.g. 0.6")
    parser.add_argument("--method", choices=list(METHODS), default="fuse-distinct",
                        help="; ".join(f"{name}: {text}" for name, text in METHODS.items()) +
                             " (default fuse-distinct)")
    parser.add_argument("--first", type=int, default=MULTI_STAGE_FIRST_BLOCK,
                        help=f"the first ATS block of the ATS methods (default {MULTI_STAGE_FIRST_BLOCK})")
    parser.add_argument("--every", type=int, default=1, help="ATS in every N-th block from --first (default 1)")
    parser.add_argument("--evit-blocks", type=block_list, default=EVIT_BLOCKS, metavar="I,J,..",
                        help=f"the blocks of --method evit (default {','.join(map(str, EVIT_BLOCKS))})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"how close to the target the mean GFLOPs must come (default {DEFAULT_TOLERANCE})")
    add_static_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with torchrun_processes(args.device) as processes:
        args.device = processes.device
        model = load_model(args)
        require_data(args, model, "calibrate")
        loader = make_loader(build_dataset(args.data, data_config(model), args.limit), args.batch_size, 0, processes)
        found = calibrate(model, loader, gflops=args.gflops, fraction=args.fraction, method=args.method,
                          first=args.first, every=args.every, evit_blocks=args.evit_blocks, tolerance=args.tolerance,
                          max_bad=args.max_bad, processes=processes, static=args.static)
        if processes.main:
            print(json.dumps(found.to_json(), indent=1) if args.json else format_calibration(found))
    return 0
