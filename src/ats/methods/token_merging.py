"""The token-merging baseline (ToMe, Bolya et al. 2023): in every block from the first, merge ``r`` patch tokens
into their most similar ones after attention (``MergeConfig``, ``merge_block``)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Dict, List, Optional

import torch

from ..flops import BlockCost, ViTShape, merge_block_flops
from ..merging import bipartite_soft_matching
from ..method import BlockContext, FromBlock
from ..packing import TokenBatch
from ..step import BlockParts, attention_half, fold_tokens, mlp_half


@dataclass(frozen=True)
class MergeConfig(FromBlock):
    """The token-merging baseline (ToMe): in every block from ``first`` on, merge ``r`` patch tokens
    into their most similar ones after attention (bipartite soft matching, size-weighted average,
    proportional attention). The class and other prefix tokens never merge."""

    summary: ClassVar[str] = "ToMe token merging, the merging baseline"

    r: int
    first: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a whole number >= 1 (tokens merged per block), got {self.r!r}")
        super().__post_init__()

    def patched_blocks(self, depth: int) -> List[int]:
        return list(range(self.first, depth))

    def method_at(self, index: int) -> Optional["MergeConfig"]:
        return self if index >= self.first else None

    def check_model(self, depth: int, has_cls: bool) -> None:
        if self.first >= depth:
            raise ValueError(f"merging from block {self.first} is outside this model's {depth} blocks")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return n - min(self.r, (n - prefix) // 2)

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        return {index: partial(merge_block_flops, shape) for index in self.patched_blocks(shape.depth)}

    def describe(self) -> str:
        return f"merge r={self.r}" + (f" from block {self.first}" if self.first else "")

    def run_block(self, parts: BlockParts, batch: TokenBatch, context: BlockContext) -> TokenBatch:
        return merge_block(parts, batch, self.r, context)


def merge_block(parts: BlockParts, batch: TokenBatch, r: int, context: BlockContext) -> TokenBatch:
    """The token-merging baseline: attention over all tokens, merge r of them, MLP on the rest. The
    tokens leave in ToMe's order: prefix, the unmerged tokens of set A, then set B."""
    attended, _, k = attention_half(parts, batch)
    positions = torch.arange(attended.width, device=k.device)
    patches = attended.patch_positions(context.prefix)
    target, side_b = bipartite_soft_matching(k.mean(dim=1), r, patches)
    batch = fold_tokens(attended, target)
    keep = batch.position_mask & (target == positions)
    kept, _ = batch.select(keep, last=side_b, capacity=context.capacity)
    context.record.record_sampling(context.index, batch.source, kept.source, None, None)
    context.record.record_dropped(attended, keep, patches, k, target)
    return mlp_half(parts, kept)
