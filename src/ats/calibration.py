"""``ats.calibrate``, the search behind ``ats calibrate`` (whose module says what it does): bisection on a
method's one free parameter (``METHODS``, ``method_knob``), each step a pass over calibration images held in
memory, until the mean GFLOPs per image meets the target; ``nearest_merge``, merging's analytic counterpart.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from .adapters import as_logits, depth_of, family_of, is_patched, last_stats, patch, unpatch
from .adapters import gflops as analytic_gflops
from .data.distributed import ONE_PROCESS, Processes, interleave
from .data.skipped import DEFAULT_MAX_BAD, SkippedImages, dataset_size
from .methods import ATSConfig, EViTConfig, MergeConfig, PatchConfig, SAINTConfig
from .methods.adaptive_sampling import MULTI_STAGE_FIRST_BLOCK
from .methods.evit import EVIT_BLOCKS

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
    if method == "saint":
        return Knob("threshold", 0.01, 1.0, False, True, lambda cos: SAINTConfig.first_half(cos, depth),
                    lambda cos: f"ats.SAINTConfig.first_half({cos:g}, depth={depth})")
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


#: What each method searches (the rest of its config is fixed).
METHODS = {
    "fuse-distinct": "ATS with rho = 1 and fuse; searches the distinct threshold (from rho = 1's cost up to "
                     "the unpatched model's)",
    "ats": "the paper's multi-stage ATS; searches rho",
    "topk": "multi-stage top-K; searches rho",
    "evit": "EViT in its blocks; searches the keep rate",
    "merge": "token merging (ToMe) in every block; searches r",
    "saint": "SAINT in the first half of the blocks (K = 5, gamma = 10); searches the similarity threshold",
}


def nearest_merge(model: nn.Module, gflops: float, input_size: Optional[Tuple[int, ...]] = None) -> MergeConfig:
    """The token-merging config whose GFLOPs per image come nearest ``gflops``: merging removes the same count
    from every image, so its cost is the analytic one and no image is needed. The model is left as it was."""
    previous = (model._ats.config, model._ats.static) if is_patched(model) else None
    shape = family_of(model).shape(model, input_size)
    costs = {}
    try:
        for r in range(1, max(shape.num_patches // 2, 1) + 1):
            costs[r] = analytic_gflops(patch(model, MergeConfig(r)), input_size)
            if costs[r] <= gflops:
                break
    finally:
        if previous is not None:
            patch(model, *previous)
        elif is_patched(model):
            unpatch(model)
    return MergeConfig(min(costs, key=lambda r: abs(costs[r] - gflops)))


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
              progress: bool = True, max_bad: float = DEFAULT_MAX_BAD,
              processes: Processes = ONE_PROCESS, static: bool = False) -> Calibration:
    """Find the config of ``method`` whose mean GFLOPs on ``loader`` is within ``tolerance`` of a target:
    ``gflops`` per image, or ``fraction`` of the unpatched model's.

    loader: (images [B, C, H, W], labels [B]) batches, held in memory for the search (a few hundred
    images). Returns a Calibration (``.config`` is what to pass to ``ats.patch``); raises
    BudgetUnreachable naming the nearest reachable budget when no value of the parameter gets within
    the tolerance. Images the loader skipped as unusable are counted (up to ``max_bad`` of them). Under
    torchrun (``processes``, each with its share of the batches: ``ats.data.distributed.make_loader``) every
    pass sums the GFLOPs and hits of all processes, so each finds what one process finds. ``static``: the
    configs run in static mode, whose GFLOPs are their capacity's. The model is left as it was (patched with its
    own config, or unpatched).
    """
    if (gflops is None) == (fraction is None):
        raise ValueError("give exactly one target: gflops (per image) or fraction (of the unpatched model's)")
    if gflops is not None and not gflops > 0:
        raise ValueError(f"the GFLOPs target must be > 0, got {gflops}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"the fraction must lie in (0, 1] (of the unpatched model's GFLOPs), got {fraction}")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"the tolerance is a relative error in (0, 1), e.g. 0.02, got {tolerance}")
    previous = (model._ats.config, model._ats.static) if is_patched(model) else None
    if previous is not None:
        unpatch(model)
    device = next(model.parameters()).device
    skipped = SkippedImages(dataset_size(loader), max_bad)
    batches = []
    for batch in loader:
        skipped.note(batch)
        if len(batch[1]):
            batches.append((batch[0].to(device), batch[1].to(device)))
    skipped = SkippedImages(skipped.total, max_bad, [name for names in processes.gather(skipped.names)
                                                     for name in names])
    skipped.check()
    sizes = [size for size in processes.gather(tuple(batches[0][0].shape[1:]) if batches else None) if size]
    if not sizes:
        raise ValueError("the calibration set is empty" + (f" (all {len(skipped)} images were skipped)" if skipped
                                                           else ""))
    family = family_of(model)
    input_size = sizes[0]
    unpatched_gflops = analytic_gflops(model, input_size)
    target = gflops if gflops is not None else fraction * unpatched_gflops
    knob = method_knob(method, depth_of(model), family.shape(model, input_size).num_patches, first, every,
                       evit_blocks)
    measure = partial(_measure, model, batches, processes=processes, input_size=input_size, static=static)
    try:
        unpatched_top1 = measure(None)[1]
        search = _Search(measure, knob, target, tolerance, progress and processes.main)
        value = search.run()
        gflops_found, top1 = search.measured[value]
    finally:
        if previous is not None:
            patch(model, *previous)
        elif is_patched(model):
            unpatch(model)
    images = sum(processes.gather(sum(len(labels) for _, labels in batches)))
    found = Calibration(method, knob.name, value, knob.make(value), gflops_found, target, unpatched_gflops, top1,
                        unpatched_top1, images, len(skipped), len(search.measured), knob.python(value))
    if abs(gflops_found - target) > tolerance * target:
        raise BudgetUnreachable(search.unreachable_message(found), found)
    return found


class _Search:
    """Bisection on a knob; remembers every value it measured (value -> (GFLOPs, top-1))."""

    def __init__(self, measure: Callable[[Optional[PatchConfig]], Tuple[float, float]], knob: Knob, target: float,
                 tolerance: float, progress: bool) -> None:
        self.measure, self.knob = measure, knob
        self.target, self.tolerance = target, tolerance
        self.measured: dict = {}
        self.bar = tqdm(total=MAX_STEPS + 2, desc="calibrate", unit="pass", disable=not progress, file=sys.stderr)

    def gflops(self, value: float) -> float:
        if value not in self.measured:
            self.measured[value] = self.measure(self.knob.make(value))
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


def _measure(model: nn.Module, batches: List[tuple], config: Optional[PatchConfig], processes: Processes,
             input_size: Tuple[int, ...], static: bool = False) -> Tuple[float, float]:
    """(mean GFLOPs per image, top-1 %) of ``model`` under ``config`` (None: unpatched) on the batches of every
    process, summed batch by batch in the order one process would sum them."""
    if config is None:
        if is_patched(model):
            unpatch(model)
    else:
        patch(model, config, static)
    sums = []
    for images, labels in batches:
        logits = as_logits(model(images))
        gflops = float(last_stats(model).gflops.sum()) if config is not None else 0.0
        sums.append((gflops, int((logits.argmax(-1) == labels).sum()), len(labels)))
    total_gflops, correct, count = 0.0, 0, 0
    for gflops, hits, size in interleave(processes.gather(sums)):
        total_gflops, correct, count = total_gflops + gflops, correct + hits, count + size
    mean_gflops = total_gflops / count if config is not None else analytic_gflops(model, input_size)
    return mean_gflops, 100.0 * correct / count
