"""Named regions of the forward pass that torch.profiler reports, so ATS's own cost can be measured.

    with torch.profiler.profile() as trace:
        model(images)
    # events "ats.score_and_sample", "ats.fuse", "ats.pack": their inclusive CPU time is ATS's overhead

Outside a profiler, and under torch.compile, a region is a no-op (one flag check), so the forward
pays nothing for it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
from torch.profiler import record_function

#: The regions the forward pass marks: everything ATS adds to a plain ViT forward.
REGIONS = ("ats.score_and_sample", "ats.fuse", "ats.pack")


def region(name: str) -> ContextManager:
    """``with region("ats.pack"): ...`` labels the enclosed ops for torch.profiler (no-op otherwise)."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return nullcontext()
    return record_function(name)
