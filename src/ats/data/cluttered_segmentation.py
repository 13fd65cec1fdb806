"""Segmentation on cluttered Fashion-MNIST: the canvases of ``ats.data.cluttered`` with a mask for free.

A canvas knows where its target garment lies (``target_box``) and what its pixels were before the clutter was
combined with them, so every patch of the canvas has a label: the target's class (``FASHION_MNIST_CLASSES``)
where at least half of the patch's pixels are the garment's (brighter than ``FOREGROUND_LEVEL`` before the
clutter), else ``BACKGROUND`` (clutter fragments included). The metric is the mean intersection over union of
the 11 classes over a whole split (``confusion``, ``mean_iou``), as segmentation benchmarks count it.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .cluttered import DEFAULT_CANVAS_SPEC, TEST_SEED, CanvasSpec, render_canvas, resize_garment, target_box
from .fashion_mnist import FASHION_MNIST_CLASSES, bundled_test_set, normalise

#: The label of the patches that are not the target garment's, after the 10 garment classes.
BACKGROUND = len(FASHION_MNIST_CLASSES)
SEGMENTATION_CLASSES = (*FASHION_MNIST_CLASSES, "background")
#: A garment pixel brighter than this (of 255) before the clutter is the garment's; Fashion-MNIST's backgrounds are 0.
FOREGROUND_LEVEL = 16
#: The patch side of the cluttered reference ViT (56 x 56 canvases, 14 x 14 patches).
PATCH_SIZE = 4


def target_pixels(images: torch.Tensor, index: int, spec: CanvasSpec = DEFAULT_CANVAS_SPEC,
                  seed: int = 0) -> torch.Tensor:
    """bool [size, size], the pixels of canvas ``index``'s target garment (before the clutter) brighter than
    ``FOREGROUND_LEVEL``; ``images`` uint8 [N, 28, 28] as ``render_canvas`` takes them."""
    top, left, height, width = target_box(index, seed, spec)
    mask = torch.zeros(spec.size, spec.size, dtype=torch.bool)
    mask[top:top + height, left:left + width] = resize_garment(images[index], height) > FOREGROUND_LEVEL
    return mask


def patch_labels(pixels: torch.Tensor, label: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """A target's pixels bool [H, W] -> long [H / patch_size, W / patch_size]: ``label`` on the patches at least
    half of whose pixels are the target's, ``BACKGROUND`` elsewhere."""
    rows, columns = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    share = pixels.float().view(rows, patch_size, columns, patch_size).mean(dim=(1, 3))
    return torch.where(share >= 0.5, label, BACKGROUND)


class ClutteredSegmentation(Dataset):
    """(image float [1, size, size] normalised, patch labels long [size / 4, size / 4]) for each source image
    (uint8 [N, 28, 28], labels [N]) of the canvases ``ClutteredFashionMNIST`` makes with the same ``spec`` and
    ``seed``; ``transform`` applies to the normalised image."""

    classes = SEGMENTATION_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: CanvasSpec = DEFAULT_CANVAS_SPEC,
                 seed: int = 0, transform: Optional[Callable] = None) -> None:
        if spec.size % PATCH_SIZE:
            raise ValueError(f"the canvas side {spec.size} must be a multiple of the patch size {PATCH_SIZE}")
        self.images, self.labels, self.spec, self.seed, self.transform = images, labels, spec, seed, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        canvas, label = render_canvas(self.images, self.labels, index, self.spec, self.seed)
        image = normalise(canvas[None])
        mask = patch_labels(target_pixels(self.images, index, self.spec, self.seed), label)
        return (image if self.transform is None else self.transform(image)), mask


def cluttered_segmentation_test(spec: CanvasSpec = DEFAULT_CANVAS_SPEC) -> ClutteredSegmentation:
    """The test split: the 10,000 canvases of ``cluttered_test`` (the same images, positions and clutter) with
    their patch labels."""
    test_set = bundled_test_set()
    return ClutteredSegmentation(test_set.images, test_set.labels, spec, TEST_SEED)


def confusion(predicted: torch.Tensor, target: torch.Tensor, classes: int = len(SEGMENTATION_CLASSES)) -> torch.Tensor:
    """Predicted and true labels (long, any equal shapes) -> the confusion matrix long [classes, classes]
    (rows: true class, columns: predicted), to sum over batches."""
    pairs = target.reshape(-1) * classes + predicted.reshape(-1)
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes)


def class_iou(matrix: torch.Tensor) -> torch.Tensor:
    """A confusion matrix [K, K] -> each class's intersection over union [K] (NaN for a class never seen nor
    predicted)."""
    matrix = matrix.double()
    hits = matrix.diagonal()
    union = matrix.sum(dim=0) + matrix.sum(dim=1) - hits
    return hits / union.where(union > 0, torch.full_like(union, float("nan")))


def mean_iou(matrix: torch.Tensor) -> float:
    """A confusion matrix [K, K] -> the mean IoU in percent over the classes seen or predicted."""
    return float(class_iou(matrix).nanmean() * 100)
