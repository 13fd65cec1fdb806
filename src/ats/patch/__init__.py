"""Integrations of ATS into model families: one adapter module per family, and the lookup of a
model's family. A new pre-norm family is one ``Family`` subclass (see ``family.py``) added to FAMILIES."""
import torch
from torch import nn

from .cvt import CVT
from .family import Family
from .hf import HF
from .psvit import PSVIT
from .timesformer import TIMESFORMER
from .timm import TIMM
from .xvit import XVIT

FAMILIES = (TIMM, HF, CVT, PSVIT, TIMESFORMER, XVIT)


def family_of(model: nn.Module) -> Family:
    """The adapter of ``model``'s family (patched or not); TypeError naming the supported ones otherwise."""
    cls = model._ats.original_class if hasattr(model, "_ats") else type(model)
    for family in FAMILIES:
        if family.owns(cls):
            return family
    supported = "; ".join(family.name for family in FAMILIES)
    raise TypeError(f"ATS does not support {cls.__module__}.{cls.__name__}; it supports {supported}. For timm, "
                    "create e.g. timm.create_model('deit_small_patch16_224'); for transformers, e.g. "
                    "ViTForImageClassification.from_pretrained(...)")


def as_logits(output) -> torch.Tensor:
    """A forward's class logits: the tensor a timm model returns, or a transformers output's ``logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def takes_clips(model: nn.Module) -> bool:
    """Whether ``model`` (patched or not) classifies video clips [B, T, C, H, W] rather than images."""
    return len(family_of(model).input_size(model)) == 4
