"""Cluttered Fashion-MNIST: a seeded image classification benchmark whose information is localised.

Adaptive token sampling assumes images in which much of the content does not matter to the label, so that
a model can drop most tokens and lose little. The classic benchmark of that kind is cluttered MNIST from
the work on glimpses and spatial transformers (a digit on a larger canvas strewn with digit fragments);
this is the same with Fashion-MNIST garments.

Each image is a ``size`` x ``size`` canvas (by default 56x56, i.e. 14x14 = 196 tokens with 4x4 patches,
DeiT-S's geometry) holding one 28x28 Fashion-MNIST garment, the target, optionally rescaled by a factor
uniform in [``min_scale``, ``max_scale``] (bilinear with antialiasing), at a uniformly random position
fully inside the canvas. ``clutter`` fragments, random ``clutter_size`` x ``clutter_size`` crops of other
images of the same split (never the target), lie at uniformly random positions; garment and clutter
combine by the pixel-wise maximum. The label is the target's class (``FASHION_MNIST_CLASSES``), and
``target_box`` says where the target is, e.g. to measure where a model looks. The default clutter, 4
fragments of 8 x 8 pixels, is modelled on the 60 x 60 cluttered MNIST of the recurrent attention model
(Mnih et al., 2014), whose clutter is 8 x 8 pieces of other digits.

Seeds: image ``index`` of a data set with ``seed`` is drawn from its own ``torch.Generator`` seeded from
(seed, index) alone, so it is the same whatever else is generated and in whatever order (DataLoader
workers included). Training may pass a different seed per epoch for fresh positions and clutter. The test
split is generated deterministically at run time from the 10,000 test images bundled with the package and
``TEST_SEED``: nothing to download, and nothing to ship beyond those images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .fashion_mnist import FASHION_MNIST_CLASSES, bundled_test_set, fashion_mnist_train, normalise
from .moving_garments import GARMENT_SIZE, check_clutter, check_source, clip_generator, draw_clutter

#: ``pretrained_cfg["test_set"]`` of the models whose test set is cluttered Fashion-MNIST, not Fashion-MNIST.
CLUTTERED_TEST_SET = "cluttered-fashion-mnist"
#: The seed of the test split, ``cluttered_test()``.
TEST_SEED = 104729


def scaled_size(scale: float) -> int:
    """The side in pixels of a 28x28 garment rescaled by ``scale`` (at least 1)."""
    return max(1, round(GARMENT_SIZE * scale))


@dataclass(frozen=True)
class CanvasSpec:
    """The canvas size, the range of the garment's scale factor, and the clutter (fragments and their size)."""

    size: int = 56
    clutter: int = 4
    clutter_size: int = 8
    min_scale: float = 1.0
    max_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"scales must satisfy 0 < min_scale <= max_scale, got min_scale={self.min_scale}, "
                             f"max_scale={self.max_scale}")
        largest = scaled_size(self.max_scale)
        if self.size < largest:
            raise ValueError(f"size {self.size} is too small: a garment scaled by up to {self.max_scale:g} is "
                             f"{largest}x{largest} pixels, so size must be >= {largest}")
        check_clutter(self)


DEFAULT_CANVAS_SPEC = CanvasSpec()


class Box(NamedTuple):
    """Where the target garment lies on the canvas, in pixels."""

    top: int
    left: int
    height: int
    width: int


def draw_box(generator: torch.Generator, spec: CanvasSpec) -> Box:
    """A random scale in [min_scale, max_scale] and a position that keeps the scaled garment inside the canvas."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    side = scaled_size(spec.min_scale + u * (spec.max_scale - spec.min_scale))
    top, left = torch.randint(spec.size - side + 1, (2,), generator=generator).tolist()
    return Box(top, left, side, side)


def target_box(index: int, seed: int = 0, spec: CanvasSpec = DEFAULT_CANVAS_SPEC) -> Box:
    """The box of image ``index``'s target garment in the data set with ``seed`` (what ``render_canvas`` uses)."""
    return draw_box(clip_generator(index, seed), spec)


def resize_garment(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 image [28, 28] -> uint8 [side, side], bilinear with antialiasing."""
    if side == GARMENT_SIZE:
        return image
    resized = F.interpolate(image[None, None].float(), size=(side, side), mode="bilinear", antialias=True)
    return resized[0, 0].round().clamp(0, 255).to(torch.uint8)


def render_canvas(images: torch.Tensor, labels: torch.Tensor, index: int, spec: CanvasSpec = DEFAULT_CANVAS_SPEC,
                  seed: int = 0) -> Tuple[torch.Tensor, int]:
    """Canvas ``index`` (uint8 [size, size]) of the data set with ``seed`` on ``images`` uint8 [N, 28, 28] and
    ``labels`` [N], and its label: garment ``images[index]`` in its ``target_box`` over clutter from the others."""
    check_source(images, labels, spec)
    if not 0 <= index < len(images):
        raise IndexError(f"canvas index {index} is out of range for {len(images)} images")
    generator = clip_generator(index, seed)
    top, left, height, width = draw_box(generator, spec)
    canvas = images.new_zeros(spec.size, spec.size)
    canvas[top:top + height, left:left + width] = resize_garment(images[index], height)
    if spec.clutter:
        canvas = torch.maximum(canvas, draw_clutter(generator, images, index, spec))
    return canvas, int(labels[index])


class ClutteredFashionMNIST(Dataset):
    """(image float [1, size, size] normalised, label in [0, 10)) pairs, one per source image (uint8
    [N, 28, 28], labels [N]); ``transform`` applies to the normalised image."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: CanvasSpec = DEFAULT_CANVAS_SPEC,
                 seed: int = 0, transform: Optional[Callable] = None) -> None:
        check_source(images, labels, spec)
        self.images, self.labels, self.spec, self.seed, self.transform = images, labels, spec, seed, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        canvas, label = render_canvas(self.images, self.labels, index, self.spec, self.seed)
        image = normalise(canvas[None])
        return (image if self.transform is None else self.transform(image)), label


def cluttered_test(spec: CanvasSpec = DEFAULT_CANVAS_SPEC) -> ClutteredFashionMNIST:
    """The test split: 10,000 canvases of the bundled Fashion-MNIST test images with ``TEST_SEED``."""
    test_set = bundled_test_set()
    return ClutteredFashionMNIST(test_set.images, test_set.labels, spec, TEST_SEED)


def cluttered_train(root: Optional[Path] = None, spec: CanvasSpec = DEFAULT_CANVAS_SPEC, seed: int = 0,
                    transform: Optional[Callable] = None) -> ClutteredFashionMNIST:
    """The training split: 60,000 canvases of Fashion-MNIST's training images (Debian's by default, or those
    under ``root``). Pass a different ``seed`` per epoch (e.g. ``seed=epoch``) for fresh positions and clutter."""
    train_set = fashion_mnist_train(root)
    return ClutteredFashionMNIST(train_set.images, train_set.labels, spec, seed, transform)
