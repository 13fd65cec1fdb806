"""The reference models, trained on Fashion-MNIST with DeiT-S token geometry.

The bundled one is a DeiT-style ViT: 28x28 grayscale input, 2x2 patches -> 14x14 = 196 patch tokens
+ 1 class token = 197 tokens, 12 blocks, so the paper's schedules (K = 108/78/48 at block 3, rho over
blocks 3..11) apply as written; a plain timm VisionTransformer. The CvT one (transformers'
``CvtForImageClassification``, the CvT-13 layout of 1, 2 and 10 blocks) ends in a stage of 14x14 = 196
patch tokens + 1 class token, and so does the PS-ViT one (``ats.models.psvit``, 196 sampled tokens).
The video one (transformers' ``TimesformerForVideoClassification``, divided space-time attention) classifies
moving-garment clips (``ats.data.moving_garments``: 8 frames of 64x64, 8x8 patches, 64 positions per frame), and so
does the XViT one (``ats.models.xvit``, space-time mixing attention) at the same sizes.
``scripts/train_reference.py`` trains them (docs/reference-model.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..data.cluttered import CLUTTERED_TEST_SET
from ..data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_TEST_SET
from ..data.moving_garments import MOVING_GARMENT_CLASSES, MOVING_GARMENTS_TEST_SET
from ..models.conv_stem import ConvStemPatchEmbed
from ..models.psvit import PSVIT_TINY_FMNIST, PSViT
from ..models.segmentation_head import PatchSegmentationHead
from ..models.xvit import XVIT_TINY_GARMENTS, XViT
from .checkpoints import load_weights, read_state_dict

REFERENCE_KWARGS = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=12,
                        num_heads=3, mlp_ratio=4.0, class_token=True, global_pool="token")
#: The bundled reference models' weights (in the wheel).
WEIGHTS_DIR = Path(__file__).parent / "weights"
REFERENCE_CHECKPOINT = WEIGHTS_DIR / "reference_vit_fmnist.pt"
#: The reference ViT's layout on cluttered Fashion-MNIST canvases (``ats.data.cluttered``): 56x56, 4x4 patches,
#: again 14x14 = 196 patch tokens + 1 class token; 6 heads of 16 channels (DeiT-S's head count), which
#: spread the early class attention wider than 3 (docs/reference-model.md).
REFERENCE_CLUTTERED_KWARGS = dict(REFERENCE_KWARGS, img_size=56, patch_size=4, num_heads=6)
#: A state-dict key only a cluttered reference model with a convolutional stem has.
CONV_STEM_KEY = "patch_embed.proj.0.weight"
#: The models too big for the wheel's 15 MB (docs/reference-model.md): the repository's ``checkpoints/`` folder.
CHECKPOINTS_DIR = Path(__file__).resolve().parents[3] / "checkpoints"
REFERENCE_CLUTTERED_CHECKPOINT = CHECKPOINTS_DIR / "reference-cluttered.pt"
#: The segmentation head on the cluttered reference ViT's frozen token map (``scripts/train_segmentation_head.py``):
#: 11 classes (10 garments and background) per patch of its 14 x 14 grid.
REFERENCE_SEGMENTATION_KWARGS = dict(embed_dim=96, num_classes=11, grid_size=(14, 14), num_prefix_tokens=1, hidden=64)
REFERENCE_SEGMENTATION_CHECKPOINT = CHECKPOINTS_DIR / "reference-cluttered-segmentation.pt"
TRAINING_COMMAND = "python scripts/train_reference.py (see docs/reference-model.md)"
#: The CvT-13 layout (1, 2, 10 blocks; 1, 2, 3 heads) at a width that trains on a CPU. Stage strides
#: 1, 2, 1 on 28x28 input: stages of 28x28, 14x14 and 14x14 tokens, the last with a class token.
REFERENCE_CVT_KWARGS = dict(num_channels=1, num_labels=10, patch_sizes=[3, 3, 3], patch_stride=[1, 2, 1],
                            patch_padding=[1, 1, 1], embed_dim=[32, 64, 96], num_heads=[1, 2, 3], depth=[1, 2, 10],
                            mlp_ratio=[4.0] * 3, drop_rate=[0.0] * 3, attention_drop_rate=[0.0] * 3,
                            drop_path_rate=[0.0] * 3, qkv_bias=[True] * 3, cls_token=[False, False, True],
                            qkv_projection_method=["dw_bn"] * 3, kernel_qkv=[3] * 3, padding_kv=[1] * 3,
                            stride_kv=[2] * 3, padding_q=[1] * 3, stride_q=[1] * 3)
REFERENCE_CVT_CHECKPOINT = WEIGHTS_DIR / "reference_cvt_fmnist.pt"
REFERENCE_PSVIT_CHECKPOINT = WEIGHTS_DIR / "reference_psvit_fmnist.pt"
#: A small TimeSformer with divided space-time attention on moving-garment clips (8 frames of 64x64, 8x8 patches).
REFERENCE_VIDEO_KWARGS = dict(image_size=64, patch_size=8, num_channels=1, num_frames=8, hidden_size=64,
                              num_attention_heads=2, num_hidden_layers=8, intermediate_size=256,
                              attention_type="divided_space_time", qkv_bias=True)
REFERENCE_VIDEO_CHECKPOINT = WEIGHTS_DIR / "reference_video_garments.pt"
REFERENCE_XVIT_CHECKPOINT = WEIGHTS_DIR / "reference_xvit_garments.pt"


def fashion_mnist_data_config(size: int, num_classes: int = 10, test_set: str = FASHION_MNIST_TEST_SET) -> dict:
    """The timm-style data config every reference model declares (``model.pretrained_cfg``), with the bundled
    data set it is trained and tested on."""
    return dict(input_size=(1, size, size), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, interpolation="bilinear",
                crop_pct=1.0, crop_mode="center", num_classes=num_classes, test_set=test_set)


def create_reference_model(**overrides) -> VisionTransformer:
    """The reference architecture, randomly initialised; ``overrides`` change timm kwargs (e.g. img_size)."""
    kwargs = {**REFERENCE_KWARGS, **overrides}
    model = VisionTransformer(**kwargs)
    size = kwargs["img_size"]
    model.pretrained_cfg = fashion_mnist_data_config(size, kwargs["num_classes"])
    return model


def create_reference_cluttered(conv_stem: bool = False, **overrides) -> VisionTransformer:
    """The reference ViT for cluttered Fashion-MNIST, randomly initialised; ``conv_stem``: a convolutional stem
    (``ConvStemPatchEmbed``) instead of the linear 4x4 patch embedding; ``overrides`` change timm kwargs."""
    if conv_stem:
        overrides = dict(overrides, embed_layer=ConvStemPatchEmbed)
    model = create_reference_model(**{**REFERENCE_CLUTTERED_KWARGS, **overrides})
    model.pretrained_cfg["test_set"] = CLUTTERED_TEST_SET
    return model


def create_reference_cvt(**overrides) -> nn.Module:
    """The reference CvT (a transformers ``CvtForImageClassification``), randomly initialised;
    ``overrides`` change ``CvtConfig`` fields."""
    try:
        from transformers import CvtConfig, CvtForImageClassification
    except ImportError:
        raise ImportError("the reference CvT is a transformers model: pip install 'ats-vit[hf]'") from None
    config = CvtConfig(**{**REFERENCE_CVT_KWARGS, **overrides}, id2label=dict(enumerate(FASHION_MNIST_CLASSES)))
    model = CvtForImageClassification(config)
    model.pretrained_cfg = fashion_mnist_data_config(28)
    return model


def create_reference_psvit(**overrides) -> nn.Module:
    """The reference PS-ViT (``ats.models.psvit.PSVIT_TINY_FMNIST``), randomly initialised; ``overrides``
    change its arguments (e.g. img_size=14 for the cheap first phase of training)."""
    kwargs = {**PSVIT_TINY_FMNIST, **overrides}
    model = PSViT(**kwargs)
    size = kwargs["img_size"]
    model.pretrained_cfg = fashion_mnist_data_config(size)
    return model


def create_reference_video(**overrides) -> nn.Module:
    """The reference video model (a transformers ``TimesformerForVideoClassification``), randomly initialised;
    ``overrides`` change ``TimesformerConfig`` fields."""
    try:
        from transformers import TimesformerConfig, TimesformerForVideoClassification
    except ImportError:
        raise ImportError("the reference video model is a transformers model: pip install 'ats-vit[hf]'") from None
    config = TimesformerConfig(**{**REFERENCE_VIDEO_KWARGS, **overrides},
                               id2label=dict(enumerate(MOVING_GARMENT_CLASSES)))
    model = TimesformerForVideoClassification(config)
    model.pretrained_cfg = fashion_mnist_data_config(config.image_size, len(MOVING_GARMENT_CLASSES),
                                                     MOVING_GARMENTS_TEST_SET)
    return model


def create_reference_xvit(**overrides) -> nn.Module:
    """The reference XViT (``ats.models.xvit.XVIT_TINY_GARMENTS``), randomly initialised; ``overrides`` change its
    arguments."""
    model = XViT(**{**XVIT_TINY_GARMENTS, **overrides})
    model.pretrained_cfg = fashion_mnist_data_config(model.img_size, model.num_classes, MOVING_GARMENTS_TEST_SET)
    return model


def load_reference_model(path: Optional[Path] = None) -> VisionTransformer:
    """The trained reference model in eval mode, from ``path`` (default: the bundled checkpoint).

    The file holds a state dict (fp16 or fp32), or a training checkpoint with a ``model`` entry.
    """
    return _load_trained(create_reference_model(), path, REFERENCE_CHECKPOINT, "reference checkpoint", "")


def load_reference_cluttered(path: Optional[Path] = None) -> VisionTransformer:
    """The trained reference ViT for cluttered Fashion-MNIST in eval mode, from ``path`` (default: the
    repository's ``checkpoints/reference-cluttered.pt``; it is not in the wheel)."""
    path = Path(path) if path is not None else REFERENCE_CLUTTERED_CHECKPOINT
    conv_stem = path.is_file() and CONV_STEM_KEY in read_state_dict(path)
    return _load_trained(create_reference_cluttered(conv_stem), path, REFERENCE_CLUTTERED_CHECKPOINT,
                         "reference cluttered-Fashion-MNIST checkpoint (in the repository, not the wheel)", "cluttered")


def create_reference_segmentation_head() -> PatchSegmentationHead:
    """The segmentation head of the cluttered reference ViT, randomly initialised."""
    return PatchSegmentationHead(**REFERENCE_SEGMENTATION_KWARGS)


def load_reference_segmentation_head(path: Optional[Path] = None) -> PatchSegmentationHead:
    """The trained segmentation head of the cluttered reference ViT in eval mode, from ``path`` (default: the
    repository's ``checkpoints/reference-cluttered-segmentation.pt``)."""
    path = Path(path) if path is not None else REFERENCE_SEGMENTATION_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"segmentation head {path} does not exist; make it with python "
                                "scripts/train_segmentation_head.py (see docs/reference-model.md)")
    return load_weights(create_reference_segmentation_head(), path).eval()


def load_reference_cvt(path: Optional[Path] = None) -> nn.Module:
    """The trained reference CvT in eval mode, from ``path`` (default: the bundled checkpoint)."""
    return _load_trained(create_reference_cvt(), path, REFERENCE_CVT_CHECKPOINT, "reference CvT checkpoint", "cvt")


def load_reference_psvit(path: Optional[Path] = None) -> nn.Module:
    """The trained reference PS-ViT in eval mode, from ``path`` (default: the bundled checkpoint)."""
    return _load_trained(create_reference_psvit(), path, REFERENCE_PSVIT_CHECKPOINT, "reference PS-ViT checkpoint",
                         "psvit")


def load_reference_video(path: Optional[Path] = None) -> nn.Module:
    """The trained reference video model in eval mode, from ``path`` (default: the bundled checkpoint)."""
    return _load_trained(create_reference_video(), path, REFERENCE_VIDEO_CHECKPOINT, "reference video checkpoint",
                         "video")


def load_reference_xvit(path: Optional[Path] = None) -> nn.Module:
    """The trained reference XViT in eval mode, from ``path`` (default: the bundled checkpoint)."""
    return _load_trained(create_reference_xvit(), path, REFERENCE_XVIT_CHECKPOINT, "reference XViT checkpoint", "xvit")


def _load_trained(model: nn.Module, path: Optional[Path], bundled: Path, what: str, arch: str) -> nn.Module:
    """``model`` with the weights in ``path`` (default ``bundled``), in eval mode; a missing file gets the
    command that trains it (``scripts/train_reference.py --arch arch``)."""
    path = Path(path) if path is not None else bundled
    if not path.is_file():
        command = TRAINING_COMMAND.replace(".py", f".py --arch {arch}") if arch else TRAINING_COMMAND
        raise FileNotFoundError(f"{what} {path} does not exist; make it with {command}")
    return load_weights(model, path).eval()
