"""ImageFolder trees (``root/<class>/<image>``, the ImageNet val layout), preprocessed as the model's own
data config says."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from torch.utils.data import Dataset

from .skipped import UsableImages
from .transforms import timm_transform


def image_folder(root: Path, config: Dict[str, Any], is_training: bool = False) -> Dataset:
    """An ImageFolder tree ``root/<class>/<image>`` (the ImageNet val layout), transformed with the model's own
    data config ``config`` (resize, crop, interpolation, mean, std; a transformers model's from its image processor
    config) by timm's transforms; unusable images come back as SkippedImages."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist; pass a folder laid out as "
                                "root/<class>/<image>.jpg (the ImageNet val layout)")
    if not any(child.is_dir() for child in root.iterdir()):
        raise ValueError(f"{root} has no class sub-folders; lay it out as root/<class>/<image>.jpg")
    transform = timm_transform(config, is_training)
    grayscale = config["input_size"][0] == 1
    try:
        folder = ImageFolder(str(root), transform=transform, loader=_grayscale_loader if grayscale else _rgb_loader)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{root} holds no images ({error}); put .jpg/.png files under "
                                "root/<class>/") from None
    return UsableImages(folder)



def _rgb_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _grayscale_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L")

