"""Adaptive Token Sampling (ATS) for pretrained vision transformers.

    import timm, ats
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    ats.patch(model, ats.ATSConfig.multi_stage(rho=1.0))
    logits = model(images)
    ats.last_stats(model).gflops

The same calls work on Hugging Face ViT, DeiT, DINOv2 and CvT models (``from ats.adapters import FAMILIES``
lists the supported families). ``ats.EViTConfig`` runs EViT instead, ``ats.StackedConfig`` EViT and
ATS in separate blocks of one model, ``ats.MergeConfig`` the token-merging baseline, ``ats.SAINTConfig``
the similarity-aware pruning baseline (SAINT), and ``ats.KeepAllConfig`` drops nothing (on CvT: the
linear-projection model ATS needs, without sampling).

Layout, imports running downward only: ``ats.commands`` (the CLI) -> this module and ``ats.calibration``
(the public API) -> ``ats.reference`` (the reference models) -> ``ats.adapters`` (one adapter per model family)
-> ``ats.models`` (architectures written here) -> ``ats.data`` (data sets) -> ``ats.methods`` (one module per
method, and ``tubes``) -> the step (``method``, ``stats``, ``step``) -> the algorithm on plain tensors
(``sampling``, ``packing``, ``merging``, ``evit``, ``saint``, ``flops``, ``profiling``).
"""
import sys
import types
import warnings

from . import adapters
from .adapters import gflops, is_patched, last_stats, patch, unpatch
from .calibration import Calibration, calibrate
from .methods import *  # noqa: F403  the registered methods (ats.methods.METHODS), TokenBudget, PatchConfig
from .methods import __all__ as _methods
from .stats import ATSStats

__version__ = "0.1.0"
__all__ = ["ATSStats", "Calibration", *_methods, "calibrate", "gflops", "is_patched", "last_stats", "patch", "unpatch"]


class _DeprecatedPatchPackage(types.ModuleType):
    """``ats.patch`` as a package (``from ats.patch import FAMILIES``), renamed ``ats.adapters``: an alias that
    warns, removed in the next release. ``ats.patch`` itself is the function."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn("the package ats.patch is now ats.adapters (ats.patch is the function); the alias goes in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return getattr(adapters, name)


sys.modules[f"{__name__}.patch"] = _DeprecatedPatchPackage(f"{__name__}.patch")
