"""Datasets: the bundled Fashion-MNIST test set, Fashion-MNIST from Debian, and ImageFolder trees.

An image a run cannot use (unreadable, truncated, empty, or with non-finite pixels after
preprocessing) does not stop it: the dataset returns a ``SkippedImage`` in its place,
``collate_usable`` leaves it out of the batch and names it in the batch's ``skipped``, and
``SkippedImages`` warns once per image and stops the run when more than ``--max-bad`` of the images
are unusable.
"""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from .reference import FASHION_MNIST_MEAN, FASHION_MNIST_STD

if TYPE_CHECKING:
    from .moving_garments import ClipSpec

BUNDLED_FASHION_MNIST = Path(__file__).parent / "assets" / "fashion-mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: The share of a data set's images that may be unusable before a run stops (``--max-bad``).
DEFAULT_MAX_BAD = 0.01
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzipped), as uint8 [N, ...]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def read_fashion_mnist(root: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``split`` ("train" or "t10k") under ``root``."""
    images, labels = (root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz")
    for path in (images, labels):
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; `apt-get install dataset-fashion-mnist` "
                                    "puts it under /usr/share/datasets/fashion-mnist, or pass that directory")
    return read_idx(images), read_idx(labels).long()


class TensorImages(Dataset):
    """(image [1, H, W] float normalised, label) pairs from uint8 images [N, H, W] and labels [N];
    ``transform`` (e.g. augmentation) applies to the normalised image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = normalise(self.images[index][None])
        return (image if self.transform is None else self.transform(image)), int(self.labels[index])


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 Fashion-MNIST images [..., H, W] -> float, normalised with the reference mean and std."""
    return (images.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


def bundled_test_set() -> TensorImages:
    """The 10,000 Fashion-MNIST test images shipped with the package."""
    return TensorImages(*read_fashion_mnist(BUNDLED_FASHION_MNIST, "t10k"))


def fashion_mnist_train(root: Optional[Path] = None, augment: bool = False) -> TensorImages:
    """The 60,000 Fashion-MNIST training images, from Debian's dataset-fashion-mnist by default;
    ``augment``: random crop (padding 2) and horizontal flip."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(28, padding=2, fill=normalise(torch.zeros(())).item()),
                            v2.RandomHorizontalFlip()]) if augment else None
    return TensorImages(*read_fashion_mnist(Path(root) if root else DEBIAN_FASHION_MNIST, "train"), transform)


def image_folder(root: Path, model: torch.nn.Module, is_training: bool = False) -> Dataset:
    """An ImageFolder tree ``root/<class>/<image>`` (the ImageNet val layout), transformed with the
    model's own data config (resize, crop, interpolation, mean, std; a transformers model's from its image
    processor config) by timm's transforms; unusable images come back as SkippedImages."""
    import timm.data
    from torchvision.datasets import ImageFolder

    from .patch import family_of

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist; pass a folder laid out as "
                                "root/<class>/<image>.jpg (the ImageNet val layout)")
    if not any(child.is_dir() for child in root.iterdir()):
        raise ValueError(f"{root} has no class sub-folders; lay it out as root/<class>/<image>.jpg")
    config = family_of(model).data_config(model)
    transform = timm.data.create_transform(**config, is_training=is_training)
    grayscale = config["input_size"][0] == 1
    try:
        folder = ImageFolder(str(root), transform=transform, loader=_grayscale_loader if grayscale else _rgb_loader)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{root} holds no images ({error}); put .jpg/.png files under "
                                "root/<class>/") from None
    return UsableImages(folder)


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


def _rgb_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _grayscale_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L")


def takes_canvases(model: torch.nn.Module) -> bool:
    """Whether ``model`` declares cluttered Fashion-MNIST as its data (the reference model trained on it)."""
    from .reference import CLUTTERED_TEST_SET

    return (getattr(model, "pretrained_cfg", None) or {}).get("test_set") == CLUTTERED_TEST_SET


def training_set(data: Optional[Path], model: torch.nn.Module) -> Dataset:
    """What ``ats train`` trains on, with augmentation: Fashion-MNIST's training images (Debian's by
    default, or a folder holding ``train-images-idx3-ubyte.gz`` and its labels), or an ImageFolder; for a
    video model, moving-garment clips of those Fashion-MNIST images, or a folder of video files; for the
    cluttered reference model, cluttered canvases of those Fashion-MNIST images, flipped at random."""
    from torchvision.transforms import v2

    from .cluttered import cluttered_train
    from .moving_garments import moving_garments_train
    from .patch import takes_clips
    from .video_files import video_folder

    if takes_canvases(model) and (data is None or (Path(data) / "train-images-idx3-ubyte.gz").is_file()):
        return cluttered_train(data, transform=v2.RandomHorizontalFlip())
    if takes_clips(model):
        if data is None or (Path(data) / "train-images-idx3-ubyte.gz").is_file():
            return moving_garments_train(data, clip_spec(model))
        return video_folder(Path(data), model)
    if data is None:
        return fashion_mnist_train(augment=True)
    if (Path(data) / "train-images-idx3-ubyte.gz").is_file():
        return fashion_mnist_train(Path(data), augment=True)
    return image_folder(Path(data), model, is_training=True)


def clip_spec(model: torch.nn.Module) -> "ClipSpec":
    """The moving-garment clips that fit a video model: its frames and frame size."""
    from .moving_garments import ClipSpec
    from .patch import family_of

    frames, _, height, _ = family_of(model).input_size(model)
    return ClipSpec(num_frames=frames, size=height)


def build_dataset(data: Optional[str], model: torch.nn.Module, limit: Optional[int] = None) -> Dataset:
    """The bundled Fashion-MNIST test set (``data`` None; for a video model the moving-garment test clips at its
    frames and size, for the cluttered reference model the cluttered test canvases) or an ImageFolder at
    ``data`` (for a video model a folder of video files, ``ats.video_files``); first ``limit`` images or clips."""
    from .cluttered import cluttered_test
    from .moving_garments import moving_garments_test
    from .patch import takes_clips
    from .video_files import video_folder

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if data is None and takes_canvases(model):
        dataset = cluttered_test()
    elif data is None:
        dataset = moving_garments_test(clip_spec(model)) if takes_clips(model) else bundled_test_set()
    elif takes_clips(model):
        dataset = video_folder(Path(data), model)
    else:
        dataset = image_folder(Path(data), model)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return dataset
