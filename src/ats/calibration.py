"""`ats calibrate` / ``ats.calibrate``: ask for a budget, get a config.

A method (ATS, top-K, ATS with ``fuse`` + ``distinct``, EViT, token merging) has one free parameter
that sets its cost: rho, the ``distinct`` threshold, the keep rate, or r. What a value costs depends
on the model and the images, so the search measures it: bisection on that parameter, each step one
pass over a small calibration set (the images stay in memory), until the mean GFLOPs per image is
within a tolerance (2%) of the target. A target outside what the method can reach is refused with
the nearest budget it can reach.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

import ats

from .cli_options import add_model_arguments, block_list, load_model
from .config import EVIT_BLOCKS, MULTI_STAGE_FIRST_BLOCK, ATSConfig, EViTConfig, MergeConfig, PatchConfig
from .datasets import DEFAULT_MAX_BAD, SkippedImages, build_dataset
from .evaluate import add_max_bad_argument, dataset_size, make_loader
from .patch import as_logits, family_of

#: The calibration set's default size: enough for a stable mean of GFLOPs, quick to run many times.
DEFAULT_LIMIT = 500
DEFAULT_TOLERANCE = 0.02
#: Bisection steps at most (each one pass over the calibration set).
MAX_STEPS = 16


@dataclass(frozen=True)
class Knob:
    """A method's one free parameter: its range, whether GFLOPs grow with it, and the config it makes."""

    name: str
    low: float
    high: float
    integer: bool
    increasing: bool
    make: Callable[[float], PatchConfig]
    python: Callable[[float], str]


def method_knob(method: str, depth: int, num_patches: int, first: int = MULTI_STAGE_FIRST_BLOCK, every: int = 1,
                evit_blocks: Tuple[int, ...] = EVIT_BLOCKS) -> Knob:
    """The free parameter of ``method`` (one of METHODS) for a model of ``depth`` blocks."""
    schedule = dict(first=first, depth=depth, every=every)
    where = f"first={first}, depth={depth}" + (f", every={every}" if every != 1 else "")
    if method == "ats":
        return Knob("rho", 0.01, 1.0, False, True, lambda rho: ATSConfig.multi_stage(rho, **schedule),
                    lambda rho: f"ats.ATSConfig.multi_stage({rho:g}, {where})")
    if method == "topk":
        return Knob("rho", 0.01, 1.0, False, True,
                    lambda rho: ATSConfig.multi_stage(rho, sampler="topk", **schedule),
                    lambda rho: f"ats.ATSConfig.multi_stage({rho:g}, {where}, sampler='topk')")
    if method == "fuse-distinct":
        return Knob("distinct", 0.0, 1.0, False, True,
                    lambda cos: ATSConfig.multi_stage(1.0, fuse=True, distinct=cos, **schedule),
                    lambda cos: f"ats.ATSConfig.multi_stage(1.0, {where}, fuse=True, distinct={cos:g})")
    if method == "evit":
        return Knob("keep_rate", 0.01, 1.0, False, True, lambda rate: EViTConfig(rate, evit_blocks),
                    lambda rate: f"ats.EViTConfig({rate:g}, blocks={evit_blocks})")
    if method == "merge":
        return Knob("r", 1, max(num_patches // 2, 1), True, False, lambda r: MergeConfig(int(r)),
                    lambda r: f"ats.MergeConfig(r={int(r)})")
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


#: What each method searches (the rest of its config is fixed).
METHODS = {
    "fuse-distinct": "ATS with rho = 1 and fuse; searches the distinct threshold (from rho = 1's cost up to "
                     "the unpatched model's)",
    "ats": "the paper's multi-stage ATS; searches rho",
    "topk": "multi-stage top-K; searches rho",
    "evit": "EViT in its blocks; searches the keep rate",
    "merge": "token merging (ToMe) in every block; searches r",
}


class BudgetUnreachable(ValueError):
    """The target lies outside what the method can reach; ``nearest`` is the closest Calibration seen."""

    def __init__(self, message: str, nearest: "Calibration") -> None:
        super().__init__(message)
        self.nearest = nearest


@dataclass
class Calibration:
    """The config found for a budget, and what it costs and scores on the calibration images."""

    method: str
    parameter: str
    value: float
    config: PatchConfig
    gflops: float
    target_gflops: float
    unpatched_gflops: float
    top1: float
    unpatched_top1: float
    images: int
    skipped: int
    steps: int
    python: str

    def to_json(self) -> dict:
        return dict(method=self.method, parameter=self.parameter, value=self.value, config=self.config.describe(),
                    gflops=round(self.gflops, 5), target_gflops=round(self.target_gflops, 5),
                    error=round(self.gflops / self.target_gflops - 1, 5),
                    unpatched_gflops=round(self.unpatched_gflops, 5),
                    fraction=round(self.gflops / self.unpatched_gflops, 5), top1=round(self.top1, 3),
                    unpatched_top1=round(self.unpatched_top1, 3), images=self.images, skipped=self.skipped,
                    steps=self.steps,
                    python=self.python)


@torch.inference_mode()
def calibrate(model: nn.Module, loader: Iterable, gflops: Optional[float] = None, fraction: Optional[float] = None,
              method: str = "fuse-distinct", first: int = MULTI_STAGE_FIRST_BLOCK, every: int = 1,
              evit_blocks: Tuple[int, ...] = EVIT_BLOCKS, tolerance: float = DEFAULT_TOLERANCE,
              progress: bool = True, max_bad: float = DEFAULT_MAX_BAD) -> Calibration:
    """Find the config of ``method`` whose mean GFLOPs on ``loader`` is within ``tolerance`` of a target:
    ``gflops`` per image, or ``fraction`` of the unpatched model's.

    loader: (images [B, C, H, W], labels [B]) batches, held in memory for the search (a few hundred
    images). Returns a Calibration (``.config`` is what to pass to ``ats.patch``); raises
    BudgetUnreachable naming the nearest reachable budget when no value of the parameter gets within
    the tolerance. Images the loader skipped as unusable are counted (up to ``max_bad`` of them). The
    model is left as it was (patched with its own config, or unpatched).
    """
    if (gflops is None) == (fraction is None):
        raise ValueError("give exactly one target: gflops (per image) or fraction (of the unpatched model's)")
    if gflops is not None and not gflops > 0:
        raise ValueError(f"the GFLOPs target must be > 0, got {gflops}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"the fraction must lie in (0, 1] (of the unpatched model's GFLOPs), got {fraction}")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"the tolerance is a relative error in (0, 1), e.g. 0.02, got {tolerance}")
    previous = model._ats.config if ats.is_patched(model) else None
    if previous is not None:
        ats.unpatch(model)
    device = next(model.parameters()).device
    skipped = SkippedImages(dataset_size(loader), max_bad)
    batches = []
    for batch in loader:
        skipped.note(batch)
        if len(batch[1]):
            batches.append((batch[0].to(device), batch[1].to(device)))
    if not batches:
        raise ValueError("the calibration set is empty" + (f" (all {len(skipped)} images were skipped)" if skipped
                                                           else ""))
    family = family_of(model)
    input_size = tuple(batches[0][0].shape[1:])
    unpatched_gflops = ats.gflops(model, input_size)
    target = gflops if gflops is not None else fraction * unpatched_gflops
    knob = method_knob(method, family.depth(model), family.shape(model, input_size).num_patches, first, every,
                       evit_blocks)
    try:
        unpatched_top1 = _measure(model, batches, None)[1]
        search = _Search(model, batches, knob, target, tolerance, progress)
        value = search.run()
        gflops_found, top1 = search.measured[value]
    finally:
        if previous is not None:
            ats.patch(model, previous)
        elif ats.is_patched(model):
            ats.unpatch(model)
    found = Calibration(method, knob.name, value, knob.make(value), gflops_found, target, unpatched_gflops, top1,
                        unpatched_top1, sum(len(labels) for _, labels in batches), len(skipped), len(search.measured),
                        knob.python(value))
    if abs(gflops_found - target) > tolerance * target:
        raise BudgetUnreachable(search.unreachable_message(found), found)
    return found


class _Search:
    """Bisection on a knob; remembers every value it measured (value -> (GFLOPs, top-1))."""

    def __init__(self, model: nn.Module, batches: List[tuple], knob: Knob, target: float, tolerance: float,
                 progress: bool) -> None:
        self.model, self.batches, self.knob = model, batches, knob
        self.target, self.tolerance = target, tolerance
        self.measured: dict = {}
        self.bar = tqdm(total=MAX_STEPS + 2, desc="calibrate", unit="pass", disable=not progress, file=sys.stderr)

    def gflops(self, value: float) -> float:
        if value not in self.measured:
            self.measured[value] = _measure(self.model, self.batches, self.knob.make(value))
            self.bar.update()
            self.bar.set_postfix_str(f"{self.knob.name}={value:g}: {self.measured[value][0]:.4g} GFLOPs")
        return self.measured[value][0]

    def close_enough(self, value: float) -> bool:
        return abs(self.gflops(value) - self.target) <= self.tolerance * self.target

    def run(self) -> float:
        """The value found: within the tolerance, or (when none is) the nearest one measured."""
        try:
            low, high = self.knob.low, self.knob.high
            for end in (high, low):
                if self.close_enough(end):
                    return end
            cheap, dear = (low, high) if self.knob.increasing else (high, low)
            if self.target < self.gflops(cheap) or self.target > self.gflops(dear):
                return self.nearest()
            for _ in range(MAX_STEPS):
                middle = self._middle(low, high)
                if middle in (low, high):
                    break
                if self.close_enough(middle):
                    return middle
                if (self.gflops(middle) < self.target) == self.knob.increasing:
                    low = middle
                else:
                    high = middle
            return self.nearest()
        finally:
            self.bar.close()

    def _middle(self, low: float, high: float) -> float:
        if self.knob.integer:
            return (low + high) // 2
        return round((low + high) / 2, 4)

    def nearest(self) -> float:
        return min(self.measured, key=lambda value: abs(self.measured[value][0] - self.target))

    def unreachable_message(self, nearest: Calibration) -> str:
        cheapest = min(gflops for gflops, _ in self.measured.values())
        dearest = max(gflops for gflops, _ in self.measured.values())
        return (f"{nearest.method} cannot reach {self.target:.4g} GFLOPs within {self.tolerance:.0%} on these images: "
                f"its {self.knob.name} from {self.knob.low:g} to {self.knob.high:g} measured {cheapest:.4g} to "
                f"{dearest:.4g} GFLOPs, and the nearest reachable budget is {nearest.gflops:.4g} GFLOPs "
                f"({self.knob.name}={nearest.value:g}: {nearest.python}); aim there or try another method")


def _measure(model: nn.Module, batches: List[tuple], config: Optional[PatchConfig]) -> Tuple[float, float]:
    """(mean GFLOPs per image, top-1 %) of ``model`` under ``config`` (None: unpatched) on the batches."""
    if config is None:
        if ats.is_patched(model):
            ats.unpatch(model)
    else:
        ats.patch(model, config)
    total_gflops, correct, count = 0.0, 0, 0
    for images, labels in batches:
        logits = as_logits(model(images))
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
        if config is not None:
            total_gflops += float(ats.last_stats(model).gflops.sum())
    mean_gflops = total_gflops / count if config is not None else ats.gflops(model, tuple(images.shape[1:]))
    return mean_gflops, 100.0 * correct / count


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
    parser = subparsers.add_parser("calibrate", help="find the config that costs a given GFLOPs budget",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    loader = make_loader(build_dataset(args.data, model, args.limit), args.batch_size, 0)
    found = calibrate(model, loader, gflops=args.gflops, fraction=args.fraction, method=args.method,
                      first=args.first, every=args.every, evit_blocks=args.evit_blocks, tolerance=args.tolerance,
                      max_bad=args.max_bad)
    print(json.dumps(found.to_json(), indent=1) if args.json else format_calibration(found))
    return 0
