"""Adaptive Token Sampling (ATS) for pretrained vision transformers.

    import timm, ats
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    ats.patch(model, ats.ATSConfig.multi_stage(rho=1.0))
    logits = model(images)
    ats.last_stats(model).gflops

The same calls work on Hugging Face ViT, DeiT, DINOv2 and CvT models (``from ats.patch import FAMILIES``
lists the supported families). ``ats.EViTConfig`` runs EViT instead, ``ats.StackedConfig`` EViT and
ATS in separate blocks of one model, ``ats.MergeConfig`` the token-merging baseline, and
``ats.KeepAllConfig`` drops nothing (on CvT: the linear-projection model ATS needs, without sampling).
"""
from typing import Optional, Sequence

from torch import nn

from .config import (
    PATCH_CONFIGS,
    ATSConfig,
    EViTConfig,
    KeepAllConfig,
    MergeConfig,
    PatchConfig,
    StackedConfig,
    TokenBudget,
)
from .patch import family_of
from .patch.family import last_stats, unpatch, upper_bound_flops
from .stats import ATSStats

__version__ = "0.1.0"
__all__ = ["ATSConfig", "ATSStats", "EViTConfig", "KeepAllConfig", "MergeConfig", "PatchConfig", "StackedConfig",
           "TokenBudget", "calibrate", "gflops", "is_patched", "last_stats", "patch", "unpatch"]


def patch(model: nn.Module, config: PatchConfig) -> nn.Module:
    """Apply ATS (or EViT, both stacked, or the token-merging baseline) to ``model`` in place and
    return it; patching again replaces the config."""
    if not isinstance(config, PATCH_CONFIGS):
        raise TypeError(f"config must be an ats.ATSConfig (or EViTConfig, StackedConfig, MergeConfig, "
                        f"KeepAllConfig), got {type(config).__name__}; e.g. ats.ATSConfig.multi_stage(rho=1.0)")
    return family_of(model).patch(model, config)


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_ats")


def gflops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> float:
    """Analytic GFLOPs per image: of an unpatched model, or the upper bound of a patched one.

    input_size: (C, H, W); defaults to the model's own.
    """
    family = family_of(model)
    shape = family.shape(model, input_size)
    config = model._ats.config if is_patched(model) else None
    return upper_bound_flops(shape, config, family.block_costs(model, shape, config)) / 1e9


def calibrate(model: nn.Module, loader, gflops: Optional[float] = None, fraction: Optional[float] = None,
              method: str = "fuse-distinct", **options):
    """The config of ``method`` whose mean GFLOPs per image on ``loader``'s (images, labels) batches is
    within 2% of ``gflops``, or of ``fraction`` of the unpatched model's: a ``Calibration`` whose
    ``.config`` goes to ``ats.patch``. Methods: "fuse-distinct" (the default), "ats", "topk",
    "evit", "merge"; options and errors: ``ats.calibration.calibrate``."""
    from .calibration import calibrate as search

    return search(model, loader, gflops=gflops, fraction=fraction, method=method, **options)
