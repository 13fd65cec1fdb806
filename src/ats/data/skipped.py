"""Images a run cannot use (unreadable, truncated, empty, or with non-finite pixels after preprocessing)
do not stop it: a dataset returns a ``SkippedImage`` in its place, ``collate_usable`` leaves it out of the
batch and names it in the batch's ``skipped``, and ``SkippedImages`` warns once per image and stops the run
when more than ``--max-bad`` of the images are unusable."""
from __future__ import annotations

import sys
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

#: The share of a data set's images that may be unusable before a run stops (``--max-bad``).
DEFAULT_MAX_BAD = 0.01


class SkippedImage(NamedTuple):
    """An image a dataset could not use, in place of its (image, label) pair."""

    name: str
    reason: str


class ImageBatch(tuple):
    """A batch that unpacks as (images [B, C, H, W], labels [B]) and names in ``skipped`` the images
    of its share of the data set that were left out (SkippedImage list)."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, skipped: Sequence[SkippedImage] = ()):
        batch = super().__new__(cls, (images, labels))
        batch.skipped = list(skipped)
        return batch

    def __reduce__(self):
        return ImageBatch, (self[0], self[1], self.skipped)


def collate_usable(samples: Sequence) -> ImageBatch:
    """DataLoader collate: the usable (image, label) samples stacked, the SkippedImages named."""
    skipped = [sample for sample in samples if isinstance(sample, SkippedImage)]
    usable = [sample for sample in samples if not isinstance(sample, SkippedImage)]
    if not usable:
        return ImageBatch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = default_collate(usable)
    return ImageBatch(images, labels, skipped)


class SkippedImages:
    """The images one pass over a data set of ``total`` images skipped (appended to ``names``): a warning
    names each one, and the pass stops with a ValueError once more than ``max_bad`` (a share) of the
    images are skipped."""

    def __init__(self, total: int, max_bad: float = DEFAULT_MAX_BAD, names: Optional[List[str]] = None) -> None:
        if not 0.0 <= max_bad <= 1.0:
            raise ValueError(f"--max-bad is the share of images that may be unusable, in [0, 1], got {max_bad}")
        self.total, self.max_bad = total, max_bad
        self.names: List[str] = [] if names is None else names

    def note(self, batch: Sequence) -> None:
        """Count and warn about the images ``batch`` (from ``collate_usable``) left out."""
        for image in getattr(batch, "skipped", ()):
            self.names.append(image.name)
            tqdm.write(f"ats: warning: skipped {image.name}: {image.reason}", file=sys.stderr)
        self.check()

    def check(self) -> None:
        """The ValueError once more than ``max_bad`` of the images are skipped."""
        if len(self.names) > self.max_bad * self.total:
            raise ValueError(f"{len(self.names)} of the {self.total} images could not be used, more than --max-bad "
                             f"{self.max_bad:g} of them (the last: {self.names[-1]}); fix or remove them, or raise "
                             "--max-bad")

    def __len__(self) -> int:
        return len(self.names)


class UsableImages(Dataset):
    """An ImageFolder whose unusable images (unreadable, truncated, empty, non-finite after
    preprocessing) come back as SkippedImages naming the file."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path = self.folder.samples[index][0]
        try:
            image, label = self.folder[index]
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for broken files
            return SkippedImage(path, f"unreadable ({type(error).__name__}: {error})")
        if not torch.isfinite(image).all():
            return SkippedImage(path, "non-finite pixel values after preprocessing")
        return image, label



def dataset_size(loader) -> int:
    """Images in a DataLoader's data set, or in a list of (images, labels) batches."""
    if hasattr(loader, "dataset"):
        return len(loader.dataset)
    return sum(len(batch[1]) + len(getattr(batch, "skipped", ())) for batch in loader)
