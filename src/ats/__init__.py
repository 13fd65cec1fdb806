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
import importlib
import importlib.util
import sys
import types
import warnings
from typing import List

__version__ = "0.1.0"

#: The public API by the module that holds it, imported on first use so that importing ``ats`` (and ``ats --help``)
#: loads neither torch nor timm; the registered methods (``ats.methods.__all__``) join it when ``ats.methods`` loads.
_API = {"ATSStats": "stats", "Calibration": "calibration", "calibrate": "calibration", "gflops": "adapters",
        "is_patched": "adapters", "last_stats": "adapters", "patch": "adapters", "unpatch": "adapters"}


def _methods() -> List[str]:
    return list(importlib.import_module(f"{__name__}.methods").__all__)


def __getattr__(name: str):
    if name == "__all__":
        return sorted([*_API, *_methods()])
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    elif not name.startswith("_") and name in _methods():
        value = getattr(importlib.import_module(f"{__name__}.methods"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a subpackage or module: ats.adapters, ats.flops, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted([*globals(), *_API, *_methods()])


class _DeprecatedPatchPackage(types.ModuleType):
    """``ats.patch`` as a package (``from ats.patch import FAMILIES``), renamed ``ats.adapters``: an alias that
    warns, removed in the next release. ``ats.patch`` itself is the function."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn("the package ats.patch is now ats.adapters (ats.patch is the function); the alias goes in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"{__package__}.adapters"), name)


sys.modules[f"{__name__}.patch"] = _DeprecatedPatchPackage(f"{__name__}.patch")
