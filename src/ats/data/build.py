"""What a command runs on: the data set ``--data`` names, or a model's bundled default (the Fashion-MNIST test
set; the cluttered canvases for the cluttered reference model; moving-garment clips for a video model)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from ..patch import family_of, takes_clips
from .cluttered import CLUTTERED_TEST_SET, cluttered_test, cluttered_train
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FASHION_MNIST_TEST_SET,
    ForModel,
    bundled_test_set,
    fashion_mnist_train,
)
from .image_folder import image_folder
from .moving_garments import (
    MOVING_GARMENT_CLASSES,
    MOVING_GARMENTS_TEST_SET,
    ClipSpec,
    moving_garments_test,
    moving_garments_train,
)
from .video_files import video_folder


def takes_canvases(model: torch.nn.Module) -> bool:
    """Whether ``model`` declares cluttered Fashion-MNIST as its data (the reference model trained on it)."""
    return declared_test_set(model) == CLUTTERED_TEST_SET


def declared_test_set(model: torch.nn.Module) -> Optional[str]:
    """The bundled data set a model trained here declares (``pretrained_cfg["test_set"]``), or None."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("test_set")


def knows_bundled_classes(model: torch.nn.Module) -> bool:
    """Whether the labels of the bundled data are ``model``'s classes: a model trained here on it, or one whose
    class names are Fashion-MNIST's (moving garments' for a video model); else top-1 on it means nothing."""
    if declared_test_set(model) in (FASHION_MNIST_TEST_SET, CLUTTERED_TEST_SET, MOVING_GARMENTS_TEST_SET):
        return True
    names = family_of(model).class_names(model)
    return names is not None and tuple(names) == (MOVING_GARMENT_CLASSES if takes_clips(model) else
                                                  FASHION_MNIST_CLASSES)


def takes_bundled_images(model: torch.nn.Module) -> bool:
    """Whether the bundled images, as they are, are ``model``'s input: 1 x 28 x 28 with the Fashion-MNIST mean
    and std (the reference models' data config); a video model, clips of such frames."""
    config = family_of(model).data_config(model)
    channels, height, width = config["input_size"][-3:]
    size_fits = takes_clips(model) or (height, width) == (28, 28)
    return (channels == 1 and size_fits and tuple(config["mean"]) == FASHION_MNIST_MEAN
            and tuple(config["std"]) == FASHION_MNIST_STD)


def bundled_default(model: torch.nn.Module) -> Dataset:
    """What a command runs ``model`` on without ``--data``: the cluttered test canvases for the cluttered
    reference model, the moving-garment test clips (at its frames and size) for a video model, else the
    Fashion-MNIST test images; converted to the model's channels, size and normalisation (``ForModel``) when it
    takes other input than the bundled data's."""
    if takes_canvases(model):
        return cluttered_test()
    transform = None if takes_bundled_images(model) else ForModel(family_of(model).data_config(model))
    if takes_clips(model):
        return moving_garments_test(clip_spec(model), transform)
    return bundled_test_set(transform)


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
    """``bundled_default(model)`` (``data`` None) or an ImageFolder at ``data`` (for a video model a folder of
    video files, ``ats.data.video_files``); the first ``limit`` images or clips."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if data is None:
        dataset = bundled_default(model)
    elif takes_clips(model):
        dataset = video_folder(Path(data), model)
    else:
        dataset = image_folder(Path(data), model)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return dataset
