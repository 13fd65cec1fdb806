"""What a command runs on: the data set ``--data`` names, or a model's bundled default (the Fashion-MNIST test
set; the cluttered canvases for the cluttered reference model; moving-garment clips for a video model)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from ..patch import family_of, takes_clips
from .cluttered import CLUTTERED_TEST_SET, cluttered_test, cluttered_train
from .fashion_mnist import bundled_test_set, fashion_mnist_train
from .image_folder import image_folder
from .moving_garments import ClipSpec, moving_garments_test, moving_garments_train
from .video_files import video_folder


def takes_canvases(model: torch.nn.Module) -> bool:
    """Whether ``model`` declares cluttered Fashion-MNIST as its data (the reference model trained on it)."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("test_set") == CLUTTERED_TEST_SET


def training_set(data: Optional[Path], model: torch.nn.Module) -> Dataset:
    """What ``ats train`` trains on, with augmentation: Fashion-MNIST's training images (Debian's by
    default, or a folder holding ``train-images-idx3-ubyte.gz`` and its labels), or an ImageFolder; for a
    video model, moving-garment clips of those Fashion-MNIST images, or a folder of video files; for the
    cluttered reference model, cluttered canvases of those Fashion-MNIST images, flipped at random."""
    from torchvision.transforms import v2

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


def clip_spec(model: torch.nn.Module) -> ClipSpec:
    """The moving-garment clips that fit a video model: its frames and frame size."""
    frames, _, height, _ = family_of(model).input_size(model)
    return ClipSpec(num_frames=frames, size=height)


def build_dataset(data: Optional[str], model: torch.nn.Module, limit: Optional[int] = None) -> Dataset:
    """The bundled Fashion-MNIST test set (``data`` None; for a video model the moving-garment test clips at its
    frames and size, for the cluttered reference model the cluttered test canvases) or an ImageFolder at
    ``data`` (for a video model a folder of video files, ``ats.data.video_files``); first ``limit`` images or clips."""
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
