"""The bundled reference model: a DeiT-style ViT trained on Fashion-MNIST with DeiT-S token geometry.

28x28 grayscale input, 2x2 patches -> 14x14 = 196 patch tokens + 1 class token = 197 tokens, 12
blocks, so the paper's schedules (K = 108/78/48 at block 3, rho over blocks 3..11) apply as written.
It is a plain timm VisionTransformer; ``scripts/train_reference.py`` trained it (docs/reference-model.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from timm.models.vision_transformer import VisionTransformer

from .checkpoints import load_weights

REFERENCE_KWARGS = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=12,
                        num_heads=3, mlp_ratio=4.0, class_token=True, global_pool="token")
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
REFERENCE_CHECKPOINT = Path(__file__).parent / "assets" / "reference_vit_fmnist.pt"
TRAINING_COMMAND = "python scripts/train_reference.py (see docs/reference-model.md)"


def create_reference_model(**overrides) -> VisionTransformer:
    """The reference architecture, randomly initialised; ``overrides`` change timm kwargs (e.g. img_size)."""
    kwargs = {**REFERENCE_KWARGS, **overrides}
    model = VisionTransformer(**kwargs)
    size = kwargs["img_size"]
    model.pretrained_cfg = dict(input_size=(1, size, size), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                                interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                                num_classes=kwargs["num_classes"])
    return model


def load_reference_model(path: Optional[Path] = None) -> VisionTransformer:
    """The trained reference model in eval mode, from ``path`` (default: the bundled checkpoint).

    The file holds a state dict (fp16 or fp32), or a training checkpoint with a ``model`` entry.
    """
    path = Path(path) if path is not None else REFERENCE_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist; make it with {TRAINING_COMMAND}")
    return load_weights(create_reference_model(), path).eval()
