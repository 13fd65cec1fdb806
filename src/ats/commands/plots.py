"""Figures of an evaluation: kept tokens per ATS block, and top-1 against GFLOPs.

Everything draws on matplotlib's Agg canvas (no display, no pyplot state), so it runs headless.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

UNPATCHED = "unpatched"
RESULT_KEYS = ("config", "gflops", "top1", "tokens_in", "tokens_out", "ats_blocks")
FRONTIER_KEYS = ("method", "gflops", "top1")
#: Line styles of the frontier: tab20's dark shades, then its light ones, with a new marker for each round,
#: so ``ats compare``'s eleven methods get eleven looks (matplotlib's cycle repeats after ten colours).
FRONTIER_COLOURS = [colormaps["tab20"](index) for index in (*range(0, 20, 2), *range(1, 20, 2))]
FRONTIER_MARKERS = "osD^v"


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``figure`` as a PNG to ``path`` (its folder is created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def slug(text: str) -> str:
    """A file-name-safe form of a label: 'rho=1 @ blocks 3..11' -> 'rho1-blocks-3..11'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text.replace("=", "")).strip("-.") or "config"


def kept_tokens_histograms(tokens_out: torch.Tensor, ats_blocks: Sequence[int], title: str) -> Figure:
    """Small multiples, one per ATS block: how many tokens each image kept there.

    tokens_out: [N, depth] long, valid tokens (prefix included) each block emitted, per image.
    """
    if not ats_blocks:
        raise ValueError("kept-token histograms need at least one ATS block; the unpatched model has none")
    counts = tokens_out[:, list(ats_blocks)].cpu().numpy()
    columns = min(len(ats_blocks), 3 if len(ats_blocks) <= 9 else 4)
    rows = math.ceil(len(ats_blocks) / columns)
    figure = new_figure(3.0 * columns, 2.2 * rows + 0.4)
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    bins = _integer_bins(counts)
    for ax, block, block_counts in zip(axes, ats_blocks, counts.T):
        ax.hist(block_counts, bins=bins, color="tab:blue")
        ax.axvline(block_counts.mean(), color="black", linestyle="--", linewidth=1)
        ax.set_title(f"block {block}: mean {block_counts.mean():.1f}", fontsize=9)
    for ax in axes[len(ats_blocks):]:
        ax.remove()
    figure.supxlabel("tokens kept (prefix included)")
    figure.supylabel("images")
    figure.suptitle(f"{title} ({counts.shape[0]} images)")
    return figure


def _integer_bins(counts: np.ndarray, most: int = 50) -> np.ndarray:
    """Bin edges centred on whole token counts, merging neighbours when the range is wide."""
    low, high = int(counts.min()), int(counts.max())
    width = max(1, math.ceil((high - low + 1) / most))
    return np.arange(low, high + width + 1, width) - 0.5


def frontier_figure(rows: Sequence[Mapping], title: str = "Top-1 against GFLOPs",
                    baseline: Optional[str] = None) -> Figure:
    """Top-1 against GFLOPs, one line per method (points in ascending GFLOPs).

    rows: dicts with ``method`` (str), ``gflops`` (float), ``top1`` (float, percent) and an
        optional ``label`` (str) written beside the point.
    baseline: the method drawn as a highlighted star with a dashed line at its top-1 (e.g. the
        unpatched model), or None.
    """
    groups = _group_by_method(rows)
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(groups)}")
    figure = new_figure(6.4, 4.6)
    ax = figure.subplots()
    lines = 0
    for method, points in groups.items():
        points = sorted(points, key=lambda row: row["gflops"])
        gflops = [row["gflops"] for row in points]
        top1 = [row["top1"] for row in points]
        if method == baseline:
            ax.scatter(gflops, top1, marker="*", s=220, color="black", zorder=3, label=method)
            ax.axhline(max(top1), color="black", linestyle=":", linewidth=1)
        else:
            colour = FRONTIER_COLOURS[lines % len(FRONTIER_COLOURS)]
            marker = FRONTIER_MARKERS[lines // len(FRONTIER_COLOURS) % len(FRONTIER_MARKERS)]
            ax.plot(gflops, top1, marker=marker, color=colour, label=method)
            lines += 1
        for row in points:
            if row.get("label"):
                ax.annotate(row["label"], (row["gflops"], row["top1"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=7)
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def plot_frontier(rows: Sequence[Mapping], path: Path, title: str = "Top-1 against GFLOPs",
                  baseline: Optional[str] = None) -> Path:
    """Write ``frontier_figure(rows, title, baseline)`` as a PNG to ``path``; returns the path."""
    return save_figure(frontier_figure(rows, title, baseline), Path(path))


def _group_by_method(rows: Sequence[Mapping]) -> Dict[str, List[Mapping]]:
    if not rows:
        raise ValueError("no points to plot; pass at least one row with method, gflops and top1")
    groups: Dict[str, List[Mapping]] = {}
    for row in rows:
        missing = [key for key in FRONTIER_KEYS if key not in row]
        if missing:
            raise ValueError(f"frontier row {dict(row)} lacks {', '.join(missing)}; each row needs "
                             f"{', '.join(FRONTIER_KEYS)}")
        groups.setdefault(str(row["method"]), []).append(row)
    return groups


def eval_method(ats_blocks: Sequence[int]) -> str:
    """The line an evaluated config belongs to: configs with the same ATS blocks share one."""
    if not ats_blocks:
        return UNPATCHED
    blocks = sorted(ats_blocks)
    if len(blocks) > 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"ATS, blocks {blocks[0]}..{blocks[-1]}"
    return "ATS, block" + ("s " if len(blocks) > 1 else " ") + ",".join(map(str, blocks))


def write_eval_plots(results: Sequence[Mapping], out_dir: Path) -> List[Path]:
    """The figures of ``ats eval --plots DIR``; returns the PNGs written.

    results: one dict per evaluated config (unpatched first) with ``config`` (str), ``gflops``
        (float, mean), ``top1`` (float, percent; None where the labels are not the model's classes),
        ``tokens_in`` and ``tokens_out`` (LongTensor
        [N_images, depth]) and ``ats_blocks`` (list of ints, [] when unpatched).
    Writes ``kept-tokens-<config>.png`` for each ATS config and, where every top-1 is known, ``top1-gflops.png``.
    """
    for result in results:
        missing = [key for key in RESULT_KEYS if key not in result]
        if missing:
            raise ValueError(f"eval result for {result.get('config', '?')!r} lacks {', '.join(missing)}")
    out_dir = Path(out_dir)
    paths = []
    for result in results:
        if result["ats_blocks"]:
            figure = kept_tokens_histograms(result["tokens_out"], result["ats_blocks"], result["config"])
            paths.append(save_figure(figure, out_dir / f"kept-tokens-{slug(result['config'])}.png"))
    if any(result["top1"] is None for result in results):
        return paths
    rows = [dict(method=eval_method(result["ats_blocks"]), gflops=float(result["gflops"]),
                 top1=float(result["top1"]), label=result["config"]) for result in results]
    baseline = UNPATCHED if any(not result["ats_blocks"] for result in results) else None
    paths.append(plot_frontier(rows, out_dir / "top1-gflops.png", baseline=baseline))
    return paths
