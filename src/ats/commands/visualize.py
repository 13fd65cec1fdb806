"""See what ATS keeps: the surviving patches of each ATS block and where the class token looks.

Library: after a forward of a patched model, ``kept_masks(ats.last_stats(model))`` and
``attention_maps(...)`` lay the kept tokens and the class token's attention out on the patch grid.
Command: ``ats visualize`` writes one PNG per image and config (the paper's supplement Figs. 2, 5).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from .. import last_stats, patch, unpatch
from ..adapters import as_logits, data_config, depth_of
from ..data.distributed import refuse_torchrun
from ..data.transforms import timm_transform
from ..methods import PatchConfig
from ..stats import ATSStats
from .evaluate import config_label
from .options import (
    add_config_arguments,
    add_model_arguments,
    config_flags_given,
    configs_from_arguments,
    load_model,
)

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn, not when the command line is parsed
    from matplotlib.figure import Figure

#: Dropped patches are shown in grey at this brightness, hatched with diagonal HATCH_COLOUR stripes: no image
#: colour (a blue sky, black, white) looks like that.
DROPPED_DIM = 0.35
HATCH_COLOUR = (1.0, 0.1, 0.8)
#: Stripe width as a share of the image's shorter side (at least one pixel); one stripe in HATCH_PERIOD.
HATCH_SHARE = 1 / 28
HATCH_PERIOD = 3
#: Patches dropped before a block, on that block's heat-map.
DROPPED_COLOUR = (0.5, 0.5, 0.5)
#: The heat-maps' colour map (a matplotlib name).
HEAT_MAP = "inferno"
ATTENTION_LABEL = "class attention / max over blocks"
DEFAULT_RHO = 1.0


def kept_masks(stats: ATSStats) -> Dict[int, torch.Tensor]:
    """ATS block -> [B, rows, cols] bool, True where that patch's token survives the block."""
    rows, cols = stats.grid_size
    masks = {}
    for block, kept in stats.kept.items():
        grid = torch.zeros(kept.shape[0], rows * cols + 1, dtype=torch.bool, device=kept.device)
        grid.scatter_(1, kept.masked_fill(kept < 0, rows * cols), True)
        masks[block] = grid[:, :-1].reshape(-1, rows, cols)
    return masks


def attention_maps(stats: ATSStats) -> Dict[int, torch.Tensor]:
    """ATS block -> [B, rows, cols] float, the class token's head-mean attention over the patches
    entering the block (0 on patches dropped earlier); empty for a model without class token."""
    rows, cols = stats.grid_size
    return {block: attention.reshape(-1, rows, cols) for block, attention in stats.cls_attention.items()}


def display_images(images: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Normalised model inputs [B, C, H, W] -> displayable RGB in [0, 1], [B, H, W, 3]; clips [B, T, C, H, W]
    -> [B, T, H, W, 3]."""
    if images.ndim == 5:
        return display_images(images.flatten(0, 1), data_config).unflatten(0, images.shape[:2])
    mean = images.new_tensor(data_config["mean"])[:, None, None]
    std = images.new_tensor(data_config["std"])[:, None, None]
    pixels = (images * std + mean).clamp(0.0, 1.0)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif pixels.shape[1] != 3:
        raise ValueError(f"cannot display {pixels.shape[1]}-channel images; visualize takes 1- or 3-channel models")
    return pixels.permute(0, 2, 3, 1).cpu()


def _upsample(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[rows, cols] -> [height, width], each patch's value repeated over its pixels."""
    return torch.nn.functional.interpolate(grid[None, None].float(), size=(height, width), mode="nearest")[0, 0]


def tint_dropped(image: torch.Tensor, kept: torch.Tensor) -> np.ndarray:
    """image [H, W, 3] in [0, 1], kept [rows, cols] bool -> [H, W, 3] with dropped patches dimmed to grey and
    hatched with diagonal HATCH_COLOUR stripes."""
    height, width = image.shape[:2]
    keep = _upsample(kept, height, width)[..., None]
    stripe = max(1, round(min(height, width) * HATCH_SHARE))
    diagonal = torch.arange(height)[:, None] + torch.arange(width)[None, :]
    on_stripe = ((diagonal // stripe) % HATCH_PERIOD == 0)[..., None].float()
    grey = image.mean(dim=-1, keepdim=True).expand_as(image) * DROPPED_DIM
    dropped = grey * (1 - on_stripe) + image.new_tensor(HATCH_COLOUR) * on_stripe
    return (image * keep + dropped * (1 - keep)).numpy()


@dataclass
class ImageTokens:
    """What one image went through under one config (tensors on the CPU).

    image: [H, W, 3] display pixels in [0, 1] (a clip: [T, H, W, 3]); kept: block -> [rows, cols] bool (a
    clip: the tubes, the same positions in every frame); attention:
    block -> [rows, cols] float (empty without a class token); present: block -> [rows, cols] bool,
    the patches that entered the block; points: [rows * cols, 2] (x, y) input pixels where each token
    was sampled, for models that sample their tokens off a grid (PS-ViT), else None.
    """

    name: str
    config: str
    image: torch.Tensor
    kept: Dict[int, torch.Tensor]
    attention: Dict[int, torch.Tensor]
    present: Dict[int, torch.Tensor]
    gflops: float
    label: Optional[str] = None
    prediction: Optional[str] = None
    points: Optional[torch.Tensor] = None

    def title(self) -> str:
        parts = [self.name, f"{self.gflops:.4g} GFLOPs"]
        if self.label is not None:
            parts.append(f"label: {self.label}")
        if self.prediction is not None:
            parts.append(f"predicted: {self.prediction}")
        legend = ("hatched grey: dropped patches" if self.points is None
                  else "dots: kept tokens where sampled, x: dropped")
        return " | ".join(parts) + f"\n{self.config}\n{legend}; heat-map: {ATTENTION_LABEL}"

    def attention_max(self) -> float:
        """The largest class attention over every block: the one scale of all the heat-maps."""
        return max((float(values.max()) for values in self.attention.values()), default=0.0) or 1e-12


def token_figure(tokens: ImageTokens) -> Figure:
    """The input image (left), then per ATS block its kept patches (top row, dropped ones hatched) and the class
    token's attention over the patches it saw (bottom row, if there is a class token; one colour scale across the
    blocks, with its colour bar); a clip: ``clip_figure``."""
    from .plots import new_figure

    if tokens.image.ndim == 4:
        return clip_figure(tokens)
    blocks = list(tokens.kept)
    total = tokens.kept[blocks[0]].numel()
    rows = 2 if tokens.attention else 1
    height, width = tokens.image.shape[:2]
    panel = 1.55
    figure = new_figure(max(panel * (len(blocks) + rows) * width / height, 6.0) + 0.6 * rows, panel * rows + 0.9)
    grid = figure.add_gridspec(rows, len(blocks) + rows)
    scale = tokens.attention_max()
    heat_axes = []
    ax = figure.add_subplot(grid[:, :rows])
    ax.imshow(tokens.image.numpy())
    ax.set_title(f"input: {total} patches", fontsize=9)
    ax.axis("off")
    for column, block in enumerate(blocks, start=rows):
        ax = figure.add_subplot(grid[0, column])
        if tokens.points is None:
            ax.imshow(tint_dropped(tokens.image, tokens.kept[block]))
        else:
            _draw_points(ax, tokens.image, tokens.points, tokens.kept[block].flatten())
        ax.set_title(f"block {block}: {int(tokens.kept[block].sum())} kept", fontsize=8)
        ax.axis("off")
        if block in tokens.attention:
            ax = figure.add_subplot(grid[1, column])
            if tokens.points is None:
                _draw_attention(ax, tokens.image, tokens.attention[block], tokens.present[block], scale)
            else:
                _draw_points(ax, tokens.image, tokens.points, tokens.present[block].flatten(),
                             tokens.attention[block].flatten() / scale)
            ax.set_title(f"block {block}: class attn.", fontsize=8)
            ax.axis("off")
            heat_axes.append(ax)
    if heat_axes:
        _colour_bar(figure, heat_axes)
    figure.suptitle(tokens.title(), fontsize=9)
    return figure


def _colour_bar(figure: Figure, axes: list) -> None:
    """The heat-maps' colour bar (0 to the largest attention over the blocks), beside ``axes``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), HEAT_MAP), ax=axes, fraction=0.03, pad=0.02)
    bar.set_label(ATTENTION_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def clip_figure(tokens: ImageTokens) -> Figure:
    """A clip, a row per frame: the frame (left), then per ATS block the frame with the dropped tubes hatched
    (a tube is one position in every frame), and the class token's attention over the positions it
    saw (the last column, averaged over frames, on the frame; its colour bar beside it)."""
    from .plots import new_figure

    blocks = list(tokens.kept)
    frames, height, width = tokens.image.shape[:3]
    columns = 1 + len(blocks) + bool(tokens.attention)
    panel = 1.2
    figure = new_figure(max(panel * columns * width / height, 6.0), panel * frames + 1.0)
    last = blocks[-1]
    heat_axes = []
    for frame in range(frames):
        image = tokens.image[frame]
        panels = [(image.numpy(), f"input: {tokens.kept[last].numel()} positions")]
        panels += [(tint_dropped(image, tokens.kept[block]), f"block {block}: {int(tokens.kept[block].sum())} kept")
                   for block in blocks]
        for column, (pixels, title) in enumerate(panels):
            ax = figure.add_subplot(frames, columns, frame * columns + column + 1)
            ax.imshow(pixels)
            ax.axis("off")
            if frame == 0:
                ax.set_title(title, fontsize=7)
        if tokens.attention:
            ax = figure.add_subplot(frames, columns, (frame + 1) * columns)
            _draw_attention(ax, image, tokens.attention[last], tokens.present[last], tokens.attention_max())
            ax.axis("off")
            heat_axes.append(ax)
            if frame == 0:
                ax.set_title(f"block {last}: class attn.", fontsize=7)
    if heat_axes:
        _colour_bar(figure, heat_axes)
    figure.suptitle(tokens.title().replace("patches", "tubes"), fontsize=8)
    return figure


def _draw_attention(ax, image: torch.Tensor, attention: torch.Tensor, present: torch.Tensor, scale: float) -> None:
    """A heat-map of attention [rows, cols] / ``scale`` (the largest over the blocks) over a dimmed image;
    patches not present [rows, cols] (dropped earlier) are grey."""
    height, width = image.shape[:2]
    ax.imshow((image * 0.4).numpy())
    heat = np.ma.masked_array((attention / scale).numpy(), mask=~present.numpy())
    from matplotlib import colormaps

    ax.imshow(heat, cmap=colormaps[HEAT_MAP].with_extremes(bad=DROPPED_COLOUR), vmin=0.0, vmax=1.0, alpha=0.7,
              interpolation="nearest", extent=(-0.5, width - 0.5, height - 0.5, -0.5))


def _draw_points(ax, image: torch.Tensor, points: torch.Tensor, shown: torch.Tensor,
                 attention: Optional[torch.Tensor] = None) -> None:
    """Tokens at the points they were sampled from, points [N, 2] (x, y) input pixels, over a dimmed image:
    the ``shown`` [N] ones as dots (coloured by ``attention`` [N], on the heat-maps' 0-to-1 scale, when given), the
    rest as crosses."""
    height, width = image.shape[:2]
    ax.imshow((image * 0.5).numpy())
    x, y = (points[:, 0] - 0.5).numpy(), (points[:, 1] - 0.5).numpy()
    shown = shown.numpy()
    ax.scatter(x[~shown], y[~shown], s=6, marker="x", color=HATCH_COLOUR, linewidths=0.6)
    if attention is None:
        ax.scatter(x[shown], y[shown], s=8, color="orange")
    else:
        heat = attention.numpy()[shown]
        ax.scatter(x[shown], y[shown], s=8, c=heat, cmap=HEAT_MAP, vmin=0.0, vmax=1.0)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def image_tokens(stats: ATSStats, pixels: torch.Tensor, names: Sequence[str], config: str,
                 labels: Sequence[Optional[str]], predictions: Sequence[Optional[str]]) -> List[ImageTokens]:
    """Split a batch's statistics into one ImageTokens per image. pixels: [B, H, W, 3]."""
    masks = {block: mask.cpu() for block, mask in kept_masks(stats).items()}
    attention = {block: values.float().cpu() for block, values in attention_maps(stats).items()}
    present = _present_masks(masks, stats.grid_size, pixels.shape[0])
    gflops = stats.gflops.tolist()
    return [ImageTokens(name=names[i], config=config, image=pixels[i],
                        kept={block: mask[i] for block, mask in masks.items()},
                        attention={block: values[i] for block, values in attention.items()},
                        present={block: mask[i] for block, mask in present.items()},
                        gflops=gflops[i], label=labels[i], prediction=predictions[i],
                        points=None if stats.points is None else stats.points[i].cpu())
            for i in range(pixels.shape[0])]


def _present_masks(masks: Dict[int, torch.Tensor], grid_size: Tuple[int, int], batch: int) -> Dict[int, torch.Tensor]:
    """ATS block -> [B, rows, cols] bool, the patches entering it: those the previous ATS block kept."""
    present, previous = {}, torch.ones(batch, *grid_size, dtype=torch.bool)
    for block in sorted(masks):
        present[block] = previous
        previous = masks[block]
    return present


def collect_image_paths(paths: Sequence[Path]) -> List[Path]:
    """Image files given directly or found (recursively, sorted) in the given folders."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image path {path} does not exist; pass image files or a folder of them")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Image files as model inputs (timm's eval transform for the model's data config), label -1."""

    def __init__(self, paths: Sequence[Path], data_config: dict) -> None:
        self.paths = list(paths)
        self.mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        self.transform = timm_transform(data_config)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert(self.mode)), -1


@dataclass
class Inputs:
    """The images to show: a dataset of (normalised image [C, H, W], label or -1), their names, and the class
    names of the labels and of the model's predictions (None: show class indices)."""

    dataset: torch.utils.data.Dataset
    names: List[str]
    label_names: Optional[Sequence[str]]
    class_names: Optional[Sequence[str]]


def load_inputs(args: argparse.Namespace, model: nn.Module, data_config: dict) -> Inputs:
    """--data files/folders, or the first --num-images images of the bundled test set."""
    from ..data.build import build_dataset, knows_bundled_classes, takes_clips
    from ..data.fashion_mnist import FASHION_MNIST_CLASSES
    from ..data.moving_garments import MOVING_GARMENT_CLASSES

    video = takes_clips(data_config)
    test_classes = MOVING_GARMENT_CLASSES if video else FASHION_MNIST_CLASSES
    class_names = test_classes if knows_bundled_classes(data_config) else data_config["class_names"]
    if args.images:
        if video:
            raise ValueError("--data takes image files, and this is a video model; leave --data out to see the "
                             "moving-garment test clips")
        paths = collect_image_paths(args.images)
        return Inputs(ImageFiles(paths, data_config), [path.stem for path in paths], class_names, class_names)
    dataset = build_dataset(None, data_config, limit=args.num_images)
    names = [f"test-{index:05d}" for index in range(len(dataset))]
    return Inputs(dataset, names, test_classes, class_names)


def _class_name(index: int, class_names: Optional[Sequence[str]]) -> Optional[str]:
    if index < 0:
        return None
    if class_names is not None and index < len(class_names):
        return str(class_names[index])
    return str(index)


def _batches(inputs: Inputs, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[str]]]:
    loader = torch.utils.data.DataLoader(inputs.dataset, batch_size=batch_size, shuffle=False)
    start = 0
    for images, labels in loader:
        yield images, labels, inputs.names[start:start + images.shape[0]]
        start += images.shape[0]


def visualize_configs(args: argparse.Namespace, depth: int) -> List[PatchConfig]:
    """The configs the flags ask for; with none, multi-stage rho = 1.0 (not eval's six defaults)."""
    if not config_flags_given(args):
        args = argparse.Namespace(**{**vars(args), "multi_stage": [DEFAULT_RHO]})
    return configs_from_arguments(args, depth)


@torch.no_grad()
def render(model: nn.Module, configs: Sequence[PatchConfig], inputs: Inputs, data_config: dict, out_dir: Path,
           batch_size: int, static: bool = False) -> List[dict]:
    """Write one PNG per image and config (in static mode with ``static``) to ``out_dir``; returns what each shows
    (JSON-ready)."""
    from .plots import save_figure, slug

    device = next(model.parameters()).device
    entries = []
    progress = tqdm(total=len(inputs.names) * len(configs), desc="visualize", unit="figure", file=sys.stderr)
    index = 0
    for images, labels, names in _batches(inputs, batch_size):
        pixels = display_images(images, data_config)
        label_names = [_class_name(int(label), inputs.label_names) for label in labels]
        for config in configs:
            patch(model, config, static)
            predictions = as_logits(model(images.to(device))).argmax(dim=-1).tolist()
            predicted = [_class_name(prediction, inputs.class_names) for prediction in predictions]
            described = config_label(config, static)
            batch_tokens = image_tokens(last_stats(model), pixels, names, described, label_names, predicted)
            for offset, tokens in enumerate(batch_tokens):
                path = out_dir / f"{index + offset:03d}-{slug(tokens.name)}-{slug(described)}.png"
                save_figure(token_figure(tokens), path)
                entries.append(dict(image=tokens.name, config=described, path=str(path), gflops=tokens.gflops,
                                    kept_per_block={str(block): int(mask.sum()) for block, mask in tokens.kept.items()},
                                    label=tokens.label, prediction=tokens.prediction))
                progress.update()
        index += images.shape[0]
    progress.close()
    unpatch(model)
    return entries


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "visualize", description="For each image and ATS config, write a PNG: the input, then per ATS block its kept "
                    "patches (dropped ones hatched) and the class token's attention (one colour scale across the "
                    "blocks). With no config flags: "
                    f"multi-stage rho = {DEFAULT_RHO:g}.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", "--images", dest="images", type=Path, nargs="+", metavar="PATH",
                        help="image files or folders of them, e.g. an ImageFolder (resized and normalised with the "
                             "model's data config)")
    source.add_argument("--num-images", type=int, default=8, metavar="N",
                        help="the first N images of the bundled test set (default 8; used without --data)")
    parser.add_argument("--out", type=Path, default=Path("ats-visualize"), metavar="DIR",
                        help="folder for the PNGs (default ./ats-visualize)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {image, config, path, gflops, kept_per_block, label, prediction}")
    add_model_arguments(parser)
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_torchrun("visualize")
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    model = load_model(args)
    configs = visualize_configs(args, depth_of(model))
    model_data = data_config(model)
    inputs = load_inputs(args, model, model_data)
    entries = render(model, configs, inputs, model_data, args.out, args.batch_size, args.static)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for entry in entries:
            print(entry["path"])
    return 0
