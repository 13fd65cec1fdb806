"""EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need") on plain tensors.

After a block's attention, keep the ``ceil(keep_rate * patches)`` patch tokens the class token
attends to most (its attention averaged over heads) and fuse the inattentive rest into one token,
their attention-weighted average, which holds as many patches as they did. Shapes: B images,
n token positions (some may be padding), C channels.
"""
from __future__ import annotations

import math
from typing import Union

import torch

from .sampling import times_fraction, topk_sample

#: The ``source`` of a fused token: it stands for several patches, none of them in particular.
FUSED_SOURCE = -2


def attentive_count(patches_in: Union[int, torch.Tensor], keep_rate: float) -> Union[int, torch.Tensor]:
    """The attentive tokens kept of ``patches_in`` valid patch tokens, ceil(keep_rate * n) in float64: [B] long
    for [B], an int for an int."""
    if isinstance(patches_in, int):
        return math.ceil(patches_in * keep_rate)
    return times_fraction(patches_in, keep_rate, round_up=True)


def attentive_tokens(cls_attention: torch.Tensor, patches: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """The attentive patch tokens -> keep mask [B, n] bool.

    cls_attention: [B, n] the class token's attention averaged over heads; patches: [B, n] bool, the
    valid patch positions (the only candidates). Ties go to the earlier position.
    """
    scores = torch.where(patches, cls_attention.to(torch.float64) + 1.0, 0.0)  # every patch > 0, even at 0 attention
    return topk_sample(scores, attentive_count(patches.sum(dim=1), keep_rate))


def fuse_inattentive(x: torch.Tensor, sizes: torch.Tensor, cls_attention: torch.Tensor,
                     inattentive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused token of each image -> (x [B, C], size [B]).

    x: [B, n, C] tokens; sizes: [B, n] patches each token holds; cls_attention: [B, n] the weights;
    inattentive: [B, n] bool, the tokens to fuse. x is ``sum_i a_i x_i / sum_i a_i`` over them and
    size their total size; an image with nothing to fuse gets zeros.
    """
    weights = cls_attention.masked_fill(~inattentive, 0.0).to(x.dtype)
    fused = (weights[..., None] * x).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return fused, (sizes * inattentive).sum(dim=1)
