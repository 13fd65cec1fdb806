"""``ats segment``: dense features under token dropping, measured on cluttered Fashion-MNIST segmentation.

The cluttered reference ViT (``--model reference-cluttered``, frozen) and its segmentation head
(``checkpoints/reference-cluttered-segmentation.pt``, ``scripts/train_segmentation_head.py``) label every patch of
the test canvases with the target garment's class or background (``ats.data.cluttered_segmentation``). The head
reads the full token map, so a patched backbone runs with a ``restore`` rule that puts the dropped positions back
(docs/method.md, "Dense features"). The command reports mean IoU and GFLOPs per image (backbone and head) for the
unpatched model, ATS (multi-stage, each ``--rhos`` x ``--distinct``, with fuse unless ``--no-fuse``) under each
``--rules`` restore rule, and token merging with its unmerge (restore "fuse") at the r whose GFLOPs come closest to
each ATS row's, measured on the first batch.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..adapters import gflops, last_stats, patch, tokens_before, unpatch
from ..data.cluttered_segmentation import cluttered_segmentation_test, confusion, mean_iou
from ..merging import RESTORE_RULES
from ..method import Method
from ..methods import ATSConfig, MergeConfig
from ..reference import load_reference_cluttered, load_reference_segmentation_head

#: The restore rule ``ats segment`` measures by default (docs/results.md, "Dense features").
DEFAULT_RULES = ("nearest", "own", "mix")


@dataclass
class SegmentRow:
    """One config's result: mean IoU (percent) and its change from the unpatched model, GFLOPs per image (backbone
    and head) and the share saved, the patch tokens left at the last block (mean), the images measured."""

    label: str
    method: str
    rule: Optional[str]
    gflops: float
    saved: float
    miou: float
    change: float
    tokens_last: float
    images: int


@dataclass
class Tally:
    """Sums over the batches of one config."""

    config: Optional[Method]
    confusion: torch.Tensor
    gflops: float = 0.0
    tokens_last: float = 0.0
    images: int = 0


def ats_configs(rhos: Sequence[float], distincts: Sequence[float], rules: Sequence[str], fuse: bool,
                first: int, depth: int) -> List[ATSConfig]:
    """Multi-stage ATS from block ``first`` for each rho, distinct threshold and restore rule."""
    return [ATSConfig.multi_stage(rho, first=first, depth=depth, fuse=fuse, distinct=distinct, restore=rule)
            for rho in rhos for distinct in distincts for rule in rules]


def matching_merge(model: nn.Module, target: float, head_gflops: float) -> MergeConfig:
    """Token merging with its unmerge (restore "fuse") at the r whose GFLOPs (with the head's) come closest to
    ``target``; merging's count is exact, every image merging r tokens per block. Leaves the model patched."""
    costs = {}
    for r in range(1, model.patch_embed.num_patches // 2 + 1):
        patch(model, MergeConfig(r=r, restore="fuse"))
        costs[r] = abs(gflops(model) + head_gflops - target)
    return MergeConfig(r=min(costs, key=costs.get), restore="fuse")


def label_of(config: Optional[Method]) -> str:
    if config is None:
        return "unpatched"
    return f"{config.describe()}, restore={config.restore}"


def new_tally(config: Optional[Method], classes: int) -> Tally:
    return Tally(config, torch.zeros(classes, classes, dtype=torch.long))


def measure(model: nn.Module, head: nn.Module, tally: Tally, images: torch.Tensor, masks: torch.Tensor,
            starts: Dict[int, torch.Tensor]) -> None:
    """Add one batch to ``tally``: the model patched with its config, from the tokens before its first block
    (``starts``, computed once per first block and batch)."""
    patch(model, tally.config)
    first = tally.config.first_block
    if first not in starts:
        starts[first] = tokens_before(model, images, first)
    maps = model.forward_tokens(starts[first], start=first)
    stats = last_stats(model)
    tally.confusion += confusion(head(maps).argmax(dim=1), masks)
    tally.gflops += float(stats.gflops.sum()) + head.flops() / 1e9 * len(images)
    tally.tokens_last += float((stats.tokens_out[:, -1] - stats.shape.num_prefix_tokens).sum())
    tally.images += len(images)


@torch.inference_mode()
def segment_benchmark(model: nn.Module, head: nn.Module, loader: DataLoader, configs: Sequence[Method],
                      merge: bool = True, progress: bool = True, partial: Optional[Path] = None) -> List[SegmentRow]:
    """mIoU and GFLOPs of ``head`` on the token maps of ``model`` unpatched and under each of ``configs`` (each
    with a restore rule) over ``loader``'s (images, patch labels); with ``merge``, token merging at the GFLOPs of
    each ATS config (on the first batch) too; ``partial``: a JSON file rewritten with the rows so far after every
    batch. The model is patched for the measurement and unpatched after."""
    head_gflops = head.flops() / 1e9
    classes = head.classify.out_channels
    tallies: Dict[str, Tally] = {label_of(config): new_tally(config, classes) for config in (None, *configs)}
    base_gflops = gflops(model) + head_gflops
    bar = tqdm(loader, desc="segment", unit="batch", disable=not progress)
    try:
        for step, (images, masks) in enumerate(bar):
            unpatched = tallies["unpatched"]
            unpatched.confusion += confusion(head(model.forward_features(images)).argmax(dim=1), masks)
            unpatched.gflops += base_gflops * len(images)
            unpatched.tokens_last += model.patch_embed.num_patches * len(images)
            unpatched.images += len(images)
            starts: Dict[int, torch.Tensor] = {}
            for tally in list(tallies.values())[1:]:
                measure(model, head, tally, images, masks, starts)
            if merge and step == 0:
                targets = [tally.gflops / tally.images for tally in tallies.values() if isinstance(tally.config,
                                                                                                   ATSConfig)]
                for target in targets:
                    config = matching_merge(model, target, head_gflops)
                    if label_of(config) not in tallies:
                        tallies[label_of(config)] = new_tally(config, classes)
                        measure(model, head, tallies[label_of(config)], images, masks, starts)
            unpatch(model)
            bar.set_postfix(mIoU=f"{mean_iou(unpatched.confusion):.2f}")
            if partial is not None:
                partial.write_text(json.dumps([asdict(row) for row in rows_of(tallies, base_gflops)], indent=1))
    finally:
        if hasattr(model, "_ats"):
            unpatch(model)
    return rows_of(tallies, base_gflops)


def rows_of(tallies: Dict[str, Tally], base_gflops: float) -> List[SegmentRow]:
    reference = mean_iou(tallies["unpatched"].confusion)
    rows = []
    for label, tally in tallies.items():
        if not tally.images:
            continue
        miou, cost = mean_iou(tally.confusion), tally.gflops / tally.images
        method = "unpatched" if tally.config is None else type(tally.config).__name__
        rows.append(SegmentRow(label, method, None if tally.config is None else tally.config.restore, round(cost, 4),
                               round(100 * (1 - cost / base_gflops), 1), round(miou, 2), round(miou - reference, 2),
                               round(tally.tokens_last / tally.images, 1), tally.images))
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("segment", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rhos", type=float, nargs="+", default=[1.0], help="multi-stage ATS ratios (default 1.0)")
    parser.add_argument("--distinct", type=float, nargs="+", default=[0.95],
                        help="ATS distinct thresholds, each a row per rho (default 0.95; 0: off)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="ATS without fuse")
    parser.add_argument("--first", type=int, default=3, help="ATS's first block (default 3)")
    parser.add_argument("--rules", nargs="+", choices=RESTORE_RULES, default=list(DEFAULT_RULES),
                        help=f"restore rules (default {' '.join(DEFAULT_RULES)})")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="leave out token merging at the GFLOPs of each ATS row")
    parser.add_argument("--head", type=Path, help="the segmentation head's weights (default: the bundled "
                        "checkpoints/reference-cluttered-segmentation.pt)")
    parser.add_argument("--limit", type=int, default=10000, help="the first N test canvases (default all 10,000)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--partial", type=Path, help="rewrite this JSON file with the rows so far after every batch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, head = load_reference_cluttered(), load_reference_segmentation_head(args.head)
    data = cluttered_segmentation_test()
    loader = DataLoader(Subset(data, range(min(args.limit, len(data)))), batch_size=args.batch_size)
    configs = ats_configs(args.rhos, args.distinct, args.rules, args.fuse, args.first, len(model.blocks))
    rows = segment_benchmark(model, head, loader, configs, args.merge, partial=args.partial)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=1))
        return 0
    print("| config | GFLOPs | saved | mIoU | change | patch tokens at the last block |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        saved = f"{row.saved:.1f}%" if row.method != "unpatched" else ""
        change = f"{row.change:+.2f}" if row.method != "unpatched" else ""
        print(f"| {row.label} | {row.gflops:.4f} | {saved} | {row.miou:.2f} | {change} | {row.tokens_last:.1f} |")
    print(f"({rows[0].images} canvases)")
    return 0
