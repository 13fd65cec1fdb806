"""Integrations of ATS into model families: one adapter module per family (a ``Family``: a description of the
model), the lookup of a model's family, and the calls that patch a model through it (``ats.patch``,
``ats.unpatch``, ``ats.gflops``) or run a patched model from a block on (``tokens_before``, ``logits_from``). A new
pre-norm family is one ``Family`` subclass (see ``family.py`` and ``timm.py``) added to FAMILIES."""
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import methods
from ..flops import ViTShape, linear_flops
from ..methods import PatchConfig, method_list
from ..stats import ATSStats
from . import family as described
from .beit import BEIT, RELPOS
from .cvt import CVT
from .eva import EVA
from .family import Family, as_logits, named, owns, patch_with, run_patched, upper_bound_flops
from .hf import HF
from .hf_aimv2 import AIMV2
from .hf_beit import HF_BEIT
from .hf_clip import TOWERS
from .hf_dinov3 import DINOV3
from .hf_siglip2 import SIGLIP2
from .hf_video import HF_VIDEO
from .open_clip import OPEN_CLIP
from .psvit import PSVIT
from .timesformer import TIMESFORMER
from .timm import TIMM
from .torchvision import TORCHVISION
from .xvit import XVIT

FAMILIES = (TIMM, EVA, BEIT, RELPOS, HF, TOWERS, SIGLIP2, DINOV3, AIMV2, HF_BEIT, HF_VIDEO, CVT, PSVIT, TIMESFORMER,
            XVIT, OPEN_CLIP, TORCHVISION)
__all__ = ["FAMILIES", "Family", "as_logits", "data_config", "depth_of", "family_of", "gflops", "is_patched",
           "last_stats", "logits_from", "patch", "takes_clips", "tokens_before", "unpatch"]


#: Why ATS refuses a windowed-attention hierarchy (Swin).
_WINDOWED = ("each token attends only within its local window (shifted between blocks) and patch merging halves the "
             "grid between stages, so there is no global class-token attention to rank tokens by, and dropping "
             "tokens breaks the windows")
_SAM = ("most of its blocks attend within windows, and its neck is convolutional over the whole token grid; dropping "
        "tokens breaks both")
#: Classes ATS refuses, with why: by module and name, or a transformers class by its name.
REFUSED = {
    "timm.models.cait.Cait": "its class token joins only in the class-attention blocks after the patch blocks, so "
                             "no patch block has a class token to score tokens with, and its patch blocks mix heads "
                             "before the softmax (talking-heads attention)",
    "timm.models.vision_transformer_sam.VisionTransformerSAM": _SAM,
    "SamModel": _SAM,
    "SamVisionModel": _SAM,
    "SwinModel": _WINDOWED,
    "SwinForImageClassification": _WINDOWED,
    "Swinv2Model": _WINDOWED,
    "Swinv2ForImageClassification": _WINDOWED,
    "PixtralVisionModel": "it packs the patches of several images into one sequence, each attending within its own "
                          "image through a block-diagonal mask with 2-D rotary embeddings per image; ATS takes each "
                          "image as its own sequence (as Siglip2VisionModel's padded ones)",
    "Aimv2Model": "it is the joint image-text model; patch its image tower, ats.patch(model.vision_model, config), "
                  "which ATS runs, and get_image_features runs it",
    "timm.models.naflexvit.NaFlexVit": "it packs images of their own patch counts itself (NaFlex: variable "
                                       "resolution and aspect, its own patch masks and position embeddings from "
                                       "per-patch coordinates), which ATS's packing does not yet combine with",
}


#: Wrappers whose forward runs a model ATS takes (by class): the attribute holding it, and the wrapper's own head
#: (None: none) after it. ``ats.patch``, ``unpatch``, ``gflops``, ``last_stats`` and ``is_patched`` take the wrapper.
WRAPPERS = {"open_clip.timm_model.TimmModel": ("trunk", "head")}


def unwrapped(model: nn.Module) -> Tuple[nn.Module, int]:
    """The model ATS patches for ``model``: itself, or the one a wrapper runs (``WRAPPERS``: open_clip's timm towers,
    e.g. SigLIP's ``model.visual``, run their ``trunk``); and the multiply-adds per image of the wrapper's head."""
    for name, (inner, head) in WRAPPERS.items():
        if named(type(model), name):
            return getattr(model, inner), 0 if head is None else linear_flops(getattr(model, head))
    return model, 0


def family_of(model: nn.Module) -> Family:
    """The adapter of ``model``'s family (patched or not); TypeError naming the supported ones otherwise."""
    cls = model._ats.original_class if hasattr(model, "_ats") else type(model)
    for family in FAMILIES:
        if owns(family, cls):
            return family
    name = f"{cls.__module__}.{cls.__name__}"
    for refused, reason in REFUSED.items():
        if named(cls, refused):
            raise TypeError(f"ATS does not support {name}: {reason}")
    supported = "; ".join(family.name for family in FAMILIES)
    raise TypeError(f"ATS does not support {cls.__module__}.{cls.__name__}; it supports {supported}. For timm, "
                    "create e.g. timm.create_model('deit_small_patch16_224'); for transformers, e.g. "
                    "ViTForImageClassification.from_pretrained(...)")


def patch(model: nn.Module, config: PatchConfig, static: bool = False) -> nn.Module:
    """Apply ATS (or EViT, both stacked, or the token-merging baseline) to ``model`` in place and
    return it; patching again replaces the config.

    static: run every block at a width fixed in advance (its capacity: the most tokens it can keep, from the
    config and the input size), kept tokens first and the rest masked, so that the forward reads nothing from
    the device on the host and ``torch.compile(model, fullgraph=True)`` makes one graph (one image at a time on
    a GPU, CUDA graphs). It keeps the same tokens as the adaptive mode and costs the capacity's GFLOPs.
    """
    if not isinstance(config, methods.METHODS):
        raise TypeError(f"config must be one of {method_list('ats.')}; got {type(config).__name__}, e.g. use "
                        "ats.ATSConfig.multi_stage(rho=1.0)")
    if not isinstance(static, bool):
        raise TypeError(f"static must be True or False, got {static!r}")
    inner, _ = unwrapped(model)
    patch_with(family_of(inner), inner, config, static)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's original class (a wrapper's: the model it runs); its forward is then exactly the
    unpatched one."""
    described.unpatch(unwrapped(model)[0])
    return model


def is_patched(model: nn.Module) -> bool:
    return hasattr(unwrapped(model)[0], "_ats")


def last_stats(model: nn.Module) -> ATSStats:
    """Statistics of the last forward of a patched model (tokens per block, GFLOPs per image with a wrapper's head,
    ...)."""
    inner, head_flops = unwrapped(model)
    stats = described.last_stats(inner)
    return replace(stats, shape=with_head(stats.shape, head_flops)) if head_flops else stats


def gflops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> float:
    """Analytic GFLOPs per image: of an unpatched model, or the upper bound of a patched one.

    input_size: (C, H, W); defaults to the model's own.
    """
    model, head_flops = unwrapped(model)
    family = family_of(model)
    family.check(model)
    shape = family.shape(model, input_size)
    config = model._ats.config if hasattr(model, "_ats") else None
    return upper_bound_flops(with_head(shape, head_flops), config, family.block_costs(model, shape, config)) / 1e9


def with_head(shape: ViTShape, head_flops: int) -> ViTShape:
    """``shape`` with a wrapper's head of ``head_flops`` multiply-adds per image after the model's own."""
    return replace(shape, head_flops=shape.head_flops + head_flops)


def tokens_before(model: nn.Module, images: torch.Tensor, count: int) -> torch.Tensor:
    """The tokens after the first ``count`` blocks of a patched model on ``images``, all of them (``count`` at most
    its config's first block, so none is dropped): computed once, they start the forward of every config whose
    first block is ``count`` or later (``logits_from``)."""
    family = model._ats.family
    input_size = tuple(images.shape[1:])
    return run_patched(model, family.embed(model, images), 0, input_size, stop=count).dense()


def logits_from(model: nn.Module, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """The class logits of a patched model on the images whose ``tokens_before(model, images, start)`` are
    ``tokens``: the same as ``as_logits(model(images))``, without running the first ``start`` blocks again."""
    return model.ats_logits(run_patched(model, tokens, start, model._ats.family.input_size(model)))


def takes_clips(model: nn.Module) -> bool:
    """Whether ``model`` (patched or not) classifies video clips [B, T, C, H, W] rather than images."""
    return len(family_of(model).input_size(model)) == 4


def depth_of(model: nn.Module) -> int:
    """The number of blocks of ``model`` (patched or not), the blocks a config's indices count."""
    return len(family_of(model).blocks(model))


def data_config(model: nn.Module) -> Dict[str, Any]:
    """What the data layer (``ats.data``) reads of ``model``: its family's ``data_config`` (preprocessing,
    ``class_names``, ``num_frames`` for a video model) and ``test_set``, the bundled data set a model trained here
    declares (``pretrained_cfg``), else None."""
    declared = getattr(model, "pretrained_cfg", None) or {}
    return {**family_of(model).data_config(model), "test_set": declared.get("test_set")}
