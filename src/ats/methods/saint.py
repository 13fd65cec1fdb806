"""SAINT (Jeddi et al. 2025, similarity-aware token pruning), training-free: after attention, each image drops the
tokens of one alternating set that have enough close matches in the other (``SAINTConfig``, ``saint_block``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar, Dict, Tuple

from ..flops import BlockCost, ViTShape, merge_block_flops
from ..method import BlockContext, Method, check_blocks_inside, checked_blocks
from ..packing import TokenBatch
from ..saint import similar_tokens
from ..step import BlockParts, attention_half, mlp_half

#: SAINT's settings (Jeddi et al. 2025, its code's defaults): K matches, gamma, and the first half of 12 blocks.
SAINT_K = 5
SAINT_GAMMA = 10.0
SAINT_BLOCKS = tuple(range(6))


@dataclass(frozen=True)
class SAINTConfig(Method):
    """SAINT (Jeddi et al. 2025, "Similarity-Aware Token Pruning"), training-free: in each of ``blocks``,
    after attention, the patch tokens alternate between sets A and B, and each image drops as many A tokens
    as it has A tokens with at least ``k`` B tokens whose keys (averaged over heads) are ``threshold``
    similar (cosine) or more; it drops those most redundant (``ats.saint``; ``gamma`` weighs how close the
    matches are against how many there are). Nothing is merged; the prefix tokens always stay. The default
    blocks are the first half of a 12-block model (the authors' setting): ``first_half`` for other depths.
    Each image drops its own count (the authors' code drops the batch mean from every image, docs/method.md).
    """

    summary: ClassVar[str] = "SAINT: drop the tokens with enough close matches, the pruning baseline"

    threshold: float
    k: int = SAINT_K
    gamma: float = SAINT_GAMMA
    blocks: Tuple[int, ...] = SAINT_BLOCKS

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be a cosine similarity in (0, 1] (the B tokens at least this similar to "
                             f"an A token count as its matches), got {self.threshold!r}; try 0.9 to 0.97")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a whole number >= 1 (the matches that make an A token droppable), got "
                             f"{self.k!r}; SAINT's default is {SAINT_K}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (
                0.0 <= self.gamma < math.inf):
            raise ValueError(f"gamma must be a finite number >= 0 (how much closer matches outrank more matches), "
                             f"got {self.gamma!r}; SAINT's default is {SAINT_GAMMA:g}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "blocks", checked_blocks(self.blocks, "SAINT", SAINT_BLOCKS))

    @classmethod
    def first_half(cls, threshold: float, depth: int = 12, **options) -> "SAINTConfig":
        """SAINT in blocks ``0 .. depth // 2 - 1``, the first half of a model of ``depth`` blocks (at least block 0)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be the model's number of blocks (>= 1), got {depth!r}")
        return cls(threshold, blocks=tuple(range(max(depth // 2, 1))), **options)

    def check_model(self, depth: int, has_cls: bool) -> None:
        check_blocks_inside(self.blocks, depth, "SAINT", f"; use SAINTConfig.first_half(threshold, depth={depth})")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return n

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        """A SAINT block does a merging block's work: attention over all tokens, set A against set B, the MLP
        on the tokens kept."""
        return {index: partial(merge_block_flops, shape) for index in self.blocks}

    def describe(self) -> str:
        blocks = self.blocks
        if len(blocks) > 1 and blocks == tuple(range(blocks[0], blocks[-1] + 1)):
            where = f"blocks {blocks[0]}..{blocks[-1]}"
        else:
            where = f"block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"
        return f"SAINT threshold={self.threshold:g} (K={self.k}, gamma={self.gamma:g}) @ {where}"

    def run_block(self, parts: BlockParts, batch: TokenBatch, context: BlockContext) -> TokenBatch:
        return saint_block(parts, batch, self, context)


def saint_block(parts: BlockParts, batch: TokenBatch, config: SAINTConfig, context: BlockContext) -> TokenBatch:
    """SAINT: attention over all tokens, drop each image's redundant tokens of set A (``ats.saint``), MLP on
    the rest. The tokens leave in the authors' order: prefix, the kept A tokens by descending redundancy,
    then set B (an image that drops none keeps its order)."""
    batch, _, k = attention_half(parts, batch)
    patches = batch.patch_positions(context.prefix)
    drop, order, last = similar_tokens(k.mean(dim=1), patches, config.threshold, config.k, config.gamma, batch.static)
    rows_from = batch.rows_at(order)
    ordered = replace(batch, rows=batch.rows.index_select(0, rows_from), source=batch.source.gather(1, order),
                      sizes=None if batch.sizes is None else batch.sizes.index_select(0, rows_from),
                      in_source_order=False)
    keep = batch.position_mask & ~drop
    kept, _ = ordered.select(keep.gather(1, order), last=last, capacity=context.capacity)
    context.record.record_sampling(context.index, batch.source, kept.source, None, None)
    context.record.record_dropped(batch, keep, patches, k)
    return mlp_half(parts, kept)


