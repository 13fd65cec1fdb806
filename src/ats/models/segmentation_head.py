"""A small dense head on a ViT's token map: class per patch from the full grid of tokens.

It reads what a segmentation or depth head reads from an unpatched ViT, every position in the original
order ``[B, prefix + H * W, C]``, so a patched model with ``restore`` feeds it unchanged. Each patch token is
read with the class token beside it (DPT's "project" readout), then a 3 x 3 convolution over the grid and a
1 x 1 one give each patch's class logits.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class PatchSegmentationHead(nn.Module):
    """Token map [B, prefix + H * W, C] (the class token first) -> class logits per patch [B, classes, H, W].

    Args:
        embed_dim: C, the tokens' width.
        num_classes: the classes per patch (background included).
        grid_size: (H, W), the patch grid.
        num_prefix_tokens: the tokens before the patches (class token first, then registers or distillation).
        hidden: the channels of the 3 x 3 convolution.
    """

    def __init__(self, embed_dim: int, num_classes: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 1,
                 hidden: int = 64) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.mix = nn.Conv2d(2 * embed_dim, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.classify = nn.Conv2d(hidden, num_classes, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, columns = self.grid_size
        patches = tokens[:, self.num_prefix_tokens:]
        if patches.shape[1] != rows * columns:
            raise ValueError(f"expected {rows * columns} patch tokens after {self.num_prefix_tokens} prefix tokens, "
                             f"got {patches.shape[1]}: the head needs the full grid (ats.patch with restore)")
        readout = torch.cat((patches, tokens[:, :1].expand_as(patches)), dim=-1)
        grid = readout.transpose(1, 2).unflatten(-1, (rows, columns))
        return self.classify(self.act(self.mix(grid)))

    def flops(self) -> int:
        """FLOPs per image (one multiply-add = one FLOP, as ``ats.flops`` counts)."""
        rows, columns = self.grid_size
        return (self.mix.weight.numel() + self.classify.weight.numel()) * rows * columns
