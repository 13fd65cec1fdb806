"""What a patched forward did: tokens per block, GFLOPs per image, the tokens each ATS block kept."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch

from .flops import BlockCost, ViTShape, vit_flops
from .packing import TokenBatch


@dataclass
class ATSStats:
    """Statistics of one forward of a patched model (all tensors detached, on the model's device).

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
    """

    tokens: torch.Tensor
    tokens_out: torch.Tensor
    gflops: torch.Tensor
    kept: Dict[int, torch.Tensor]
    scores: Dict[int, torch.Tensor]
    cls_attention: Dict[int, torch.Tensor]
    grid_size: tuple

    def kept_counts(self, block: int) -> torch.Tensor:
        """[B] long, patch tokens kept by ATS block ``block``."""
        return (self.kept[block] >= 0).sum(dim=1)


@dataclass
class ForwardRecord:
    """Collects an ATSStats during one forward."""

    num_prefix_tokens: int
    num_tokens: int
    tokens_in: List[torch.Tensor] = field(default_factory=list)
    tokens_out: List[torch.Tensor] = field(default_factory=list)
    kept: Dict[int, torch.Tensor] = field(default_factory=dict)
    scores: Dict[int, torch.Tensor] = field(default_factory=dict)
    cls_attention: Dict[int, torch.Tensor] = field(default_factory=dict)

    def record_sampling(self, index: int, before: TokenBatch, after: TokenBatch, scores: Optional[torch.Tensor],
                        cls_attention: Optional[torch.Tensor]) -> None:
        """Keep what block ``index`` saw and chose. scores, cls_attention: [B, m_before] or None."""
        prefix = self.num_prefix_tokens
        source = after.source[:, prefix:]
        self.kept[index] = torch.where(source >= prefix, source - prefix, -1).detach()
        if scores is not None:
            self.scores[index] = _on_grid(scores, before.source, self.num_tokens)[:, prefix:]
        if cls_attention is not None:
            self.cls_attention[index] = _on_grid(cls_attention, before.source, self.num_tokens)[:, prefix:]

    def finish(self, shape: ViTShape, block_costs: Mapping[int, BlockCost], grid_size: tuple) -> ATSStats:
        tokens_in = torch.stack(self.tokens_in, dim=1)
        tokens_out = torch.stack(self.tokens_out, dim=1)
        gflops = (vit_flops(shape, tokens_in, tokens_out, block_costs) / 1e9).float()
        return ATSStats(tokens_in, tokens_out, gflops, self.kept, self.scores, self.cls_attention, grid_size)


def _on_grid(values: torch.Tensor, source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Scatter per-position values [B, m] to the original token sequence [B, num_tokens]."""
    grid = values.new_zeros(values.shape[0], num_tokens + 1)
    index = source.masked_fill(source < 0, num_tokens)
    return grid.scatter_(1, index, values.detach())[:, :num_tokens]
