"""Moving garments: a seeded video classification data set made from real Fashion-MNIST images.

Each sample is a clip of ``num_frames`` grayscale frames of ``size`` x ``size`` pixels (by default 8
frames of 64x64, i.e. 64 tokens per frame with 8x8 patches). One 28x28 Fashion-MNIST garment, the
target, moves in a straight line at constant velocity over a black canvas: horizontal speed uniform in
[``min_speed``, ``max_speed``] pixels per frame with a random sign, vertical speed uniform in
[-``max_vertical_speed``, ``max_vertical_speed``], and a start position that keeps the whole garment
inside the canvas in every frame (positions are rounded to whole pixels).

The label is ``garment_class * 2 + direction`` (20 classes, ``MOVING_GARMENT_CLASSES``), where direction
is 1 when the garment moves right and 0 when it moves left. Every frame alone shows the garment but not
where it goes, and reversing the frames flips the direction, so a model must relate the frames in order.

Clutter, ``clutter`` crops of ``clutter_size`` x ``clutter_size`` pixels from other images of the same
split pasted at random positions and identical in every frame, is the distractor: many tokens hold
garment-like texture that never moves and does not matter to the label, which is what adaptive token
sampling should learn to drop. Garment and clutter combine by the pixel-wise maximum.

Seeds: clip ``index`` of a data set with ``seed`` is drawn from its own ``torch.Generator`` seeded from
(seed, index) alone, so it is the same whatever else is generated and in whatever order (DataLoader
workers included). Training may pass a different seed per epoch for fresh motion and clutter. The test
split is generated deterministically at run time from the 10,000 test images bundled with the package
and ``TEST_SEED``: nothing to download, and nothing to ship beyond those images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Protocol, Tuple

import torch
from torch.utils.data import Dataset

from .fashion_mnist import FASHION_MNIST_CLASSES, bundled_test_set, fashion_mnist_train, normalise

GARMENT_SIZE = 28
#: The seed of the test split, ``moving_garments_test()``.
TEST_SEED = 7919
#: ``pretrained_cfg["test_set"]`` of the video models trained here on moving-garment clips.
MOVING_GARMENTS_TEST_SET = "moving-garments"
MOVING_GARMENT_CLASSES = tuple(f"{name}, moving {way}" for name in FASHION_MNIST_CLASSES for way in ("left", "right"))
_SEED_STRIDE = 0x9E3779B1  # odd, so the clip seeds of one data set seed are distinct for 2**32 indices


class ClutterSpec(Protocol):
    """What the clutter needs of a spec (``ClipSpec`` here, ``ats.data.cluttered.CanvasSpec`` for still images)."""

    size: int
    clutter: int
    clutter_size: int


def check_clutter(spec: ClutterSpec) -> None:
    """Raise a ValueError unless ``spec`` asks for a count >= 0 of crops of 1 to 28 pixels."""
    if spec.clutter < 0:
        raise ValueError(f"clutter (the number of fragments) must be >= 0, got {spec.clutter}")
    if not 1 <= spec.clutter_size <= GARMENT_SIZE:
        raise ValueError(f"clutter_size must be in [1, {GARMENT_SIZE}] (a crop of a {GARMENT_SIZE}x{GARMENT_SIZE} "
                         f"image), got {spec.clutter_size}")


@dataclass(frozen=True)
class ClipSpec:
    """The shape of the clips and the ranges of their random motion (speeds in pixels per frame) and clutter."""

    num_frames: int = 8
    size: int = 64
    clutter: int = 4
    clutter_size: int = 10
    min_speed: float = 2.0
    max_speed: float = 4.0
    max_vertical_speed: float = 2.0

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2: the label is the direction of motion, got {self.num_frames}")
        if not 0 < self.min_speed <= self.max_speed:
            raise ValueError(f"speeds must satisfy 0 < min_speed <= max_speed so the garment moves left or right, "
                             f"got min_speed={self.min_speed}, max_speed={self.max_speed}")
        if self.max_vertical_speed < 0:
            raise ValueError(f"max_vertical_speed must be >= 0, got {self.max_vertical_speed}")
        travel = (self.num_frames - 1) * max(self.max_speed, self.max_vertical_speed)
        if self.size < GARMENT_SIZE + travel:
            raise ValueError(f"size {self.size} is too small: a {GARMENT_SIZE}x{GARMENT_SIZE} garment moving up to "
                             f"{max(self.max_speed, self.max_vertical_speed):g} pixels per frame for "
                             f"{self.num_frames} frames needs size >= {GARMENT_SIZE + travel:g}")
        check_clutter(self)


DEFAULT_CLIP_SPEC = ClipSpec()


class Motion(NamedTuple):
    """The garment's top-left corner (x, y) in the first frame and its velocity (dx, dy), in pixels (per frame)."""

    x: float
    y: float
    dx: float
    dy: float

    @property
    def direction(self) -> int:
        """1 if the garment moves right, 0 if it moves left."""
        return int(self.dx > 0)

    def positions(self, num_frames: int) -> torch.Tensor:
        """The corner in each frame, rounded to whole pixels: int64 [num_frames, 2] of (x, y)."""
        steps = torch.arange(num_frames, dtype=torch.float64)[:, None]
        start, velocity = torch.tensor([[self.x, self.y], [self.dx, self.dy]], dtype=torch.float64)
        return (start + steps * velocity).round().long()

    def reversed(self, num_frames: int) -> Motion:
        """The motion of the clip's frames played backwards."""
        last = num_frames - 1
        return Motion(self.x + last * self.dx, self.y + last * self.dy, -self.dx, -self.dy)


def clip_generator(index: int, seed: int) -> torch.Generator:
    """The generator of clip ``index``: depends on (seed, index) only; torch keeps 32 bits of a seed, so the seed
    is mixed such that the indices of one ``seed`` get distinct generators."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + index) % 2**32)


def draw_motion(generator: torch.Generator, spec: ClipSpec) -> Motion:
    """A random straight-line motion that keeps the garment inside the canvas in all ``spec.num_frames`` frames."""
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    dx = (spec.min_speed + u[1] * (spec.max_speed - spec.min_speed)) * (1 if u[0] < 0.5 else -1)
    dy = (2 * u[2] - 1) * spec.max_vertical_speed
    room, last = spec.size - GARMENT_SIZE, spec.num_frames - 1

    def start(velocity: float, fraction: float) -> float:
        low, high = max(0.0, -last * velocity), room - max(0.0, last * velocity)
        return low + fraction * (high - low)

    return Motion(start(dx, u[3]), start(dy, u[4]), dx, dy)


def clip_motion(index: int, seed: int = 0, spec: ClipSpec = DEFAULT_CLIP_SPEC) -> Motion:
    """The motion of clip ``index`` of the data set with ``seed`` (what ``render_clip`` uses)."""
    return draw_motion(clip_generator(index, seed), spec)


def clip_label(garment_class: int, motion: Motion) -> int:
    """The clip's label in [0, 20): ``garment_class * 2 + direction``."""
    return garment_class * 2 + motion.direction


def split_labels(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels [N] (``clip_label``) -> (garment classes [N], directions [N]); the inverse of ``clip_label``."""
    return labels // 2, labels % 2


def garment_frames(image: torch.Tensor, motion: Motion, spec: ClipSpec) -> torch.Tensor:
    """uint8 image [28, 28] moved by ``motion`` over a black canvas: uint8 [T, size, size]."""
    frames = image.new_zeros(spec.num_frames, spec.size, spec.size)
    for frame, (x, y) in zip(frames, motion.positions(spec.num_frames).tolist()):
        frame[y:y + GARMENT_SIZE, x:x + GARMENT_SIZE] = image
    return frames


def draw_clutter(generator: torch.Generator, images: torch.Tensor, index: int, spec: ClutterSpec) -> torch.Tensor:
    """``spec.clutter`` random crops of images other than ``index`` at random positions: uint8 [size, size]."""
    count, crop = spec.clutter, spec.clutter_size
    sources = torch.randint(len(images) - 1, (count,), generator=generator)
    sources += sources >= index  # skip the target itself
    corners = torch.randint(GARMENT_SIZE - crop + 1, (count, 2), generator=generator).tolist()
    places = torch.randint(spec.size - crop + 1, (count, 2), generator=generator).tolist()
    layer = images.new_zeros(spec.size, spec.size)
    for source, (cy, cx), (py, px) in zip(sources.tolist(), corners, places):
        patch = layer[py:py + crop, px:px + crop]
        torch.maximum(patch, images[source, cy:cy + crop, cx:cx + crop], out=patch)
    return layer


def check_source(images: torch.Tensor, labels: torch.Tensor, spec: ClutterSpec) -> None:
    """Raise a ValueError unless ``images`` is uint8 [N, 28, 28] with labels [N] and, for clutter, N >= 2."""
    if images.dtype != torch.uint8 or images.shape[1:] != (GARMENT_SIZE, GARMENT_SIZE):
        raise ValueError(f"images must be uint8 [N, {GARMENT_SIZE}, {GARMENT_SIZE}], got {images.dtype} "
                         f"{list(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [N] for {len(images)} images, got {list(labels.shape)}")
    if spec.clutter and len(images) < 2:
        raise ValueError("clutter comes from images other than the target: pass at least 2 images, or clutter=0")


def render_clip(images: torch.Tensor, labels: torch.Tensor, index: int, spec: ClipSpec = DEFAULT_CLIP_SPEC,
                seed: int = 0) -> Tuple[torch.Tensor, int]:
    """Clip ``index`` (uint8 [T, size, size]) of the data set with ``seed`` on ``images`` uint8 [N, 28, 28] and
    ``labels`` [N], and its label: garment ``images[index]`` moving over clutter from the other images."""
    check_source(images, labels, spec)
    if not 0 <= index < len(images):
        raise IndexError(f"clip index {index} is out of range for {len(images)} images")
    generator = clip_generator(index, seed)
    motion = draw_motion(generator, spec)
    garment = garment_frames(images[index], motion, spec)
    clip = torch.maximum(garment, draw_clutter(generator, images, index, spec)) if spec.clutter else garment
    return clip, clip_label(int(labels[index]), motion)


class MovingGarments(Dataset):
    """(clip float [T, 1, size, size] normalised, label in [0, 20)) pairs, one per source image (uint8
    [N, 28, 28], labels [N]); ``transform`` applies to the normalised clip."""

    classes = MOVING_GARMENT_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: ClipSpec = DEFAULT_CLIP_SPEC, seed: int = 0,
                 transform: Optional[Callable] = None) -> None:
        check_source(images, labels, spec)
        self.images, self.labels, self.spec, self.seed, self.transform = images, labels, spec, seed, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        clip, label = render_clip(self.images, self.labels, index, self.spec, self.seed)
        clip = normalise(clip[:, None])
        return (clip if self.transform is None else self.transform(clip)), label


def moving_garments_test(spec: ClipSpec = DEFAULT_CLIP_SPEC, transform: Optional[Callable] = None) -> MovingGarments:
    """The test split: 10,000 clips of the bundled Fashion-MNIST test images with ``TEST_SEED``; ``transform``
    applies to each normalised clip."""
    test_set = bundled_test_set()
    return MovingGarments(test_set.images, test_set.labels, spec, TEST_SEED, transform)


def moving_garments_train(root: Optional[Path] = None, spec: ClipSpec = DEFAULT_CLIP_SPEC,
                          seed: int = 0) -> MovingGarments:
    """The training split: 60,000 clips of Fashion-MNIST's training images (Debian's by default, or those
    under ``root``). Pass a different ``seed`` per epoch (e.g. ``seed=epoch``) for fresh motion and clutter."""
    train_set = fashion_mnist_train(root)
    return MovingGarments(train_set.images, train_set.labels, spec, seed)
