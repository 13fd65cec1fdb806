"""What a command runs on: the data set ``--data`` names, or a model's bundled default (the Fashion-MNIST test
set; the cluttered canvases for the cluttered reference model; moving-garment clips for a video model).

Every function here reads what it needs of the model from its data config (``ats.adapters.data_config``: the
preprocessing, ``class_names``, ``num_frames`` for a video model, and ``test_set``, the bundled data set a model
trained here declares), so the data layer knows no model family."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import Dataset

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


def takes_canvases(config: Dict[str, Any]) -> bool:
    """Whether the model of data config ``config`` declares cluttered Fashion-MNIST as its data (the reference
    model trained on it)."""
    return config.get("test_set") == CLUTTERED_TEST_SET


def takes_clips(config: Dict[str, Any]) -> bool:
    """Whether the model of data config ``config`` classifies video clips [B, T, C, H, W] rather than images."""
    return "num_frames" in config


def knows_bundled_classes(config: Dict[str, Any]) -> bool:
    """Whether the labels of the bundled data are the classes of the model of data config ``config``: a model
    trained here on it, or one whose class names are Fashion-MNIST's (moving garments' for a video model); else
    top-1 on it means nothing."""
    if config.get("test_set") in (FASHION_MNIST_TEST_SET, CLUTTERED_TEST_SET, MOVING_GARMENTS_TEST_SET):
        return True
    names = config.get("class_names")
    return names is not None and tuple(names) == (MOVING_GARMENT_CLASSES if takes_clips(config) else
                                                  FASHION_MNIST_CLASSES)


def takes_bundled_images(config: Dict[str, Any]) -> bool:
    """Whether the bundled images, as they are, are the input of the model of data config ``config``: 1 x 28 x 28
    with the Fashion-MNIST mean and std (the reference models' data config); a video model, clips of such frames."""
    channels, height, width = config["input_size"][-3:]
    size_fits = takes_clips(config) or (height, width) == (28, 28)
    return (channels == 1 and size_fits and tuple(config["mean"]) == FASHION_MNIST_MEAN
            and tuple(config["std"]) == FASHION_MNIST_STD)


def bundled_default(config: Dict[str, Any]) -> Dataset:
    """What a command runs the model of data config ``config`` on without ``--data``: the cluttered test canvases
    for the cluttered reference model, the moving-garment test clips (at its frames and size) for a video model,
    else the Fashion-MNIST test images; converted to the model's channels, size and normalisation (``ForModel``)
    when it takes other input than the bundled data's."""
    if takes_canvases(config):
        return cluttered_test()
    transform = None if takes_bundled_images(config) else ForModel(config)
    if takes_clips(config):
        return moving_garments_test(clip_spec(config), transform)
    return bundled_test_set(transform)


def training_set(data: Optional[Path], config: Dict[str, Any]) -> Dataset:
    """What ``ats train`` trains the model of data config ``config`` on, with augmentation: Fashion-MNIST's
    training images (Debian's by default, or a folder holding ``train-images-idx3-ubyte.gz`` and its labels), or an
    ImageFolder; for a video model, moving-garment clips of those Fashion-MNIST images, or a folder of video
    files; for the cluttered reference model, cluttered canvases of those Fashion-MNIST images, flipped at
    random."""
    from torchvision.transforms import v2

    if takes_canvases(config) and (data is None or (Path(data) / "train-images-idx3-ubyte.gz").is_file()):
        return cluttered_train(data, transform=v2.RandomHorizontalFlip())
    if takes_clips(config):
        if data is None or (Path(data) / "train-images-idx3-ubyte.gz").is_file():
            return moving_garments_train(data, clip_spec(config))
        return video_folder(Path(data), config)
    if data is None:
        return fashion_mnist_train(augment=True)
    if (Path(data) / "train-images-idx3-ubyte.gz").is_file():
        return fashion_mnist_train(Path(data), augment=True)
    return image_folder(Path(data), config, is_training=True)


def clip_spec(config: Dict[str, Any]) -> ClipSpec:
    """The moving-garment clips that fit the video model of data config ``config``: its frames and frame size."""
    return ClipSpec(num_frames=config["num_frames"], size=config["input_size"][-2])


def build_dataset(data: Optional[str], config: Dict[str, Any], limit: Optional[int] = None) -> Dataset:
    """``bundled_default(config)`` (``data`` None) or an ImageFolder at ``data`` (for a video model a folder of
    video files, ``ats.data.video_files``), for the model of data config ``config``; the first ``limit`` images or
    clips."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if data is None:
        dataset = bundled_default(config)
    elif takes_clips(config):
        dataset = video_folder(Path(data), config)
    else:
        dataset = image_folder(Path(data), config)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return dataset
