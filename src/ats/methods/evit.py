"""EViT (Liang et al., ICLR 2022): after attention, keep the patch tokens the class token attends to most and fuse
the rest into one token (``EViTConfig``, ``evit_block``)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar, Dict, Tuple

import torch

from ..evit import FUSED_SOURCE, attentive_count, attentive_tokens, fuse_inattentive
from ..flops import BlockCost, ViTShape, evit_block_flops
from ..method import BlockContext, Method, check_blocks_inside, checked_blocks
from ..packing import TokenBatch
from ..step import BlockParts, attention_half, class_attention_of, mlp_half

#: EViT's defaults (Liang et al. 2022, DeiT-S): blocks 3, 6 and 9 (0-based), keeping 70% of the patch tokens.
EVIT_BLOCKS = (3, 6, 9)
EVIT_KEEP_RATE = 0.7


@dataclass(frozen=True)
class EViTConfig(Method):
    """EViT (Liang et al., ICLR 2022): in each of ``blocks``, after attention, keep the
    ``ceil(keep_rate * patch tokens)`` patch tokens with the highest class-token attention (averaged
    over heads) and fuse the rest into one token, their attention-weighted average, placed after the
    kept ones; it holds their patches (its size), which later attention counts like ``fuse`` does.
    The class token always stays. Stack it with an ATSConfig in other blocks: ``StackedConfig``."""

    summary: ClassVar[str] = "EViT: keep the attentive tokens, fuse the rest into one"

    keep_rate: float = EVIT_KEEP_RATE
    blocks: Tuple[int, ...] = EVIT_BLOCKS

    def __post_init__(self) -> None:
        if isinstance(self.keep_rate, bool) or not isinstance(self.keep_rate, (int, float)) or not (
                0.0 < self.keep_rate <= 1.0):
            raise ValueError(f"keep_rate must lie in (0, 1] (the share of patch tokens an EViT block keeps), got "
                             f"{self.keep_rate!r}; EViT's default is {EVIT_KEEP_RATE}")
        object.__setattr__(self, "keep_rate", float(self.keep_rate))
        object.__setattr__(self, "blocks", checked_blocks(self.blocks, "EViT", EVIT_BLOCKS))

    def check_model(self, depth: int, has_cls: bool) -> None:
        check_blocks_inside(self.blocks, depth, "EViT")
        if not has_cls:
            raise ValueError("EViT ranks tokens by the class token's attention and this model has no class token")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        kept = attentive_count(n - prefix, self.keep_rate)
        return prefix + kept + (kept < n - prefix)

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        return {index: partial(evit_block_flops, shape) for index in self.blocks}

    def describe(self) -> str:
        return f"EViT keep_rate={self.keep_rate:g} @ blocks {', '.join(map(str, self.blocks))}"

    def run_block(self, parts: BlockParts, batch: TokenBatch, context: BlockContext) -> TokenBatch:
        return evit_block(parts, batch, self.keep_rate, context)


def evit_block(parts: BlockParts, batch: TokenBatch, keep_rate: float, context: BlockContext) -> TokenBatch:
    """EViT: attention over all tokens, then keep the attentive patch tokens, fuse the rest into one
    token after them, and run the MLP on what is left."""
    batch, q, k = attention_half(parts, batch)
    cls_attention = class_attention_of(parts, batch, q, k).mean(1)
    patches = batch.patch_positions(context.prefix)
    keep = attentive_tokens(cls_attention, patches, keep_rate)
    inattentive = patches & ~keep
    fused, fused_size = fuse_inattentive(batch.pad(batch.rows), batch.padded_sizes(), cls_attention, inattentive)
    slot = inattentive & (inattentive.long().cumsum(dim=1) == 1)  # the first inattentive position holds it
    kept, _ = batch.select(keep | slot | (batch.position_mask & ~patches), last=slot, capacity=context.capacity)
    if keep_rate < 1.0:
        kept = _with_fused_token(kept, inattentive.any(dim=1), fused, fused_size)
    context.record.record_sampling(context.index, batch.source, kept.source, cls_attention, cls_attention)
    context.record.record_dropped(batch, keep, patches, k)
    return mlp_half(parts, kept)


def _with_fused_token(batch: TokenBatch, has_fused: torch.Tensor, fused: torch.Tensor,
                      fused_size: torch.Tensor) -> TokenBatch:
    """Write the fused token x [B, C] of size [B] over the last token of each image where has_fused [B];
    it stands for several patches, no one position (source FUSED_SOURCE)."""
    last = batch.last_rows
    rows = batch.rows.index_copy(0, last, torch.where(has_fused[:, None], fused, batch.rows.index_select(0, last)))
    sizes = batch.sizes if batch.sizes is not None else rows.new_ones(rows.shape[0])
    sizes = sizes.index_copy(0, last, torch.where(has_fused, fused_size.to(sizes.dtype), sizes.index_select(0, last)))
    end = (batch.lengths - 1)[:, None]
    source = batch.source.scatter(1, end, torch.where(has_fused[:, None], FUSED_SOURCE, batch.source.gather(1, end)))
    return replace(batch, rows=rows, sizes=sizes, source=source)


