"""Fashion-MNIST (Zalando, MIT licence): its IDX files, the 10,000 test images bundled with the package,
the 60,000 training images from Debian's ``dataset-fashion-mnist``, and the normalisation every reference
model uses."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .transforms import timm_transform

BUNDLED_FASHION_MNIST = Path(__file__).parent / "fashion-mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
#: ``pretrained_cfg["test_set"]`` of the models trained here on Fashion-MNIST (the reference models).
FASHION_MNIST_TEST_SET = "fashion-mnist"
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


def bundled_test_set(transform: Optional[Callable] = None) -> TensorImages:
    """The 10,000 Fashion-MNIST test images shipped with the package; ``transform`` applies to each normalised
    image."""
    return TensorImages(*read_fashion_mnist(BUNDLED_FASHION_MNIST, "t10k"), transform)


def fashion_mnist_train(root: Optional[Path] = None, augment: bool = False) -> TensorImages:
    """The 60,000 Fashion-MNIST training images, from Debian's dataset-fashion-mnist by default;
    ``augment``: random crop (padding 2) and horizontal flip."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(28, padding=2, fill=normalise(torch.zeros(())).item()),
                            v2.RandomHorizontalFlip()]) if augment else None
    return TensorImages(*read_fashion_mnist(Path(root) if root else DEBIAN_FASHION_MNIST, "train"), transform)


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """Normalised Fashion-MNIST images (``normalise``) -> pixels in [0, 1]."""
    return images * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]


class ForModel:
    """A transform from a normalised Fashion-MNIST image [1, h, w] (or clip [T, 1, h, w]) to the input a model's
    data config describes: its channels (gray repeated), size (timm's evaluation transform on the 8-bit image:
    resize, centre crop; per frame of a clip) and mean and std; for running a model trained on other data on
    the bundled images."""

    def __init__(self, data_config: dict) -> None:
        self.mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        self.transform = timm_transform(data_config)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import to_pil_image

        frames = (unnormalise(images).clamp(0, 1) * 255).round().to(torch.uint8).reshape(-1, *images.shape[-3:])
        converted = torch.stack([self.transform(to_pil_image(frame).convert(self.mode)) for frame in frames])
        return converted[0] if images.ndim == 3 else converted
