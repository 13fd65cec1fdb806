"""What a patched forward did: tokens per block, GFLOPs per image, the tokens each ATS block kept.

The forward only keeps references to tensors it made anyway; everything below is computed when
it is first read, so statistics cost the forward nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from .flops import BlockCost, ViTShape, vit_flops


class BlockSampling(NamedTuple):
    """One ATS (or merging) block's choice. source_*: [B, m] original token index, -1 on padding;
    scores: [B, m_before]; cls_attention: [B, m_before], or per head [B, h, m_before]."""

    source_before: torch.Tensor
    source_after: torch.Tensor
    scores: Optional[torch.Tensor]
    cls_attention: Optional[torch.Tensor]


@dataclass
class ATSStats:
    """Statistics of one forward of a patched model (tensors detached, on the model's device).

    tokens: [B, depth] long, valid tokens (prefix included) each block took in, per image.
    tokens_out: [B, depth] long, valid tokens each block emitted.
    gflops: [B] float, GFLOPs each image cost (the paper's convention).
    kept: ATS (or merging) block index -> [B, m] long, the patch-grid indices (row-major, prefix
        tokens apart) of the patch tokens the block kept, ascending, -1 on padding.
    scores: ATS block index -> [B, num_patches] float, the significance scores over the patch grid
        (0 for patches dropped earlier).
    cls_attention: ATS block index -> [B, num_patches] float, the class token's attention over the
        patch grid, averaged over heads (0 for patches dropped earlier); empty without a class token.
    grid_size: the patch grid (rows, columns).
    linear_blocks: the blocks that ran linear q/k/v projections in place of the model's convolutional
        ones (CvT); empty for other families.
    points: [B, num_patches, 2] float, (x, y) in input pixels where each patch token was sampled, for
        models that choose their token positions (PS-ViT); None for models on a patch grid.
    """

    shape: ViTShape
    block_costs: Mapping[int, BlockCost]
    tokens_in: List[torch.Tensor]
    tokens_emitted: List[torch.Tensor]
    sampling: Dict[int, BlockSampling]
    linear_blocks: Tuple[int, ...] = ()
    points: Optional[torch.Tensor] = None

    @property
    def grid_size(self) -> tuple:
        return self.shape.grid_size

    @cached_property
    def tokens(self) -> torch.Tensor:
        return torch.stack(self.tokens_in, dim=1)

    @cached_property
    def tokens_out(self) -> torch.Tensor:
        return torch.stack(self.tokens_emitted, dim=1)

    @cached_property
    def gflops(self) -> torch.Tensor:
        return (vit_flops(self.shape, self.tokens, self.tokens_out, self.block_costs) / 1e9).float()

    @cached_property
    def kept(self) -> Dict[int, torch.Tensor]:
        prefix = self.shape.num_prefix_tokens
        kept = {}
        for index, block in self.sampling.items():
            source = block.source_after[:, prefix:]
            kept[index] = torch.where(source >= prefix, source - prefix, -1)
        return kept

    @cached_property
    def scores(self) -> Dict[int, torch.Tensor]:
        return {index: self._on_grid(block.scores, block.source_before)
                for index, block in self.sampling.items() if block.scores is not None}

    @cached_property
    def cls_attention(self) -> Dict[int, torch.Tensor]:
        return {index: self._on_grid(_head_mean(block.cls_attention), block.source_before)
                for index, block in self.sampling.items() if block.cls_attention is not None}

    def kept_counts(self, block: int) -> torch.Tensor:
        """[B] long, patch tokens kept by ATS block ``block``."""
        return (self.kept[block] >= 0).sum(dim=1)

    def _on_grid(self, values: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Per-position values [B, m] -> the patch grid [B, num_patches] (0 where no token was)."""
        num_tokens = self.shape.num_tokens
        grid = values.new_zeros(values.shape[0], num_tokens + 1)
        grid.scatter_(1, source.masked_fill(source < 0, num_tokens), values)
        return grid[:, self.shape.num_prefix_tokens:num_tokens]


@dataclass
class ForwardRecord:
    """Collects what an ATSStats needs during one forward."""

    tokens_in: List[torch.Tensor] = field(default_factory=list)
    tokens_out: List[torch.Tensor] = field(default_factory=list)
    sampling: Dict[int, BlockSampling] = field(default_factory=dict)

    @torch.compiler.disable
    def record_sampling(self, index: int, source_before: torch.Tensor, source_after: torch.Tensor,
                        scores: Optional[torch.Tensor], cls_attention: Optional[torch.Tensor]) -> None:
        """Keep what block ``index`` chose. scores: [B, m_before] or None; cls_attention: [B, m_before],
        per head [B, h, m_before] (averaged when read), or None.

        Not compiled: torch.compile would make one graph per block index for a dictionary write."""
        self.sampling[index] = BlockSampling(source_before, source_after, _detached(scores), _detached(cls_attention))

    def finish(self, shape: ViTShape, block_costs: Mapping[int, BlockCost]) -> ATSStats:
        return ATSStats(shape, block_costs, self.tokens_in, self.tokens_out, self.sampling)


def _head_mean(attention: torch.Tensor) -> torch.Tensor:
    """[B, h, m] per-head attention -> its mean over heads [B, m]; [B, m] as it is."""
    return attention.mean(dim=1) if attention.ndim == 3 else attention


def _detached(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.detach() if tensor is not None and tensor.requires_grad else tensor
