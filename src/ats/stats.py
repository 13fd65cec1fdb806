"""What a patched forward did: tokens per block, GFLOPs per image, the tokens each ATS block kept.

The forward only keeps references to tensors it made anyway; everything below is computed when
it is first read, so statistics cost the forward nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from .flops import BlockCost, ViTShape, vit_flops
from .merging import DroppedTokens, dropped_tokens, restore_tokens

if TYPE_CHECKING:
    from .packing import TokenBatch


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
    gflops: [B] float, GFLOPs each image cost (the paper's convention); in static mode what the forward
        computed, every block at its capacity (``widths``), whatever the tokens kept.
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
    widths: in static mode, the tokens each block computed on (in, out) per block: its capacities; else None.
    """

    shape: ViTShape
    block_costs: Mapping[int, BlockCost]
    tokens_in: List[torch.Tensor]
    tokens_emitted: List[torch.Tensor]
    sampling: Dict[int, BlockSampling]
    linear_blocks: Tuple[int, ...] = ()
    points: Optional[torch.Tensor] = None
    widths: Optional[Tuple[List[int], List[int]]] = None

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
        tokens, tokens_out = self.tokens, self.tokens_out
        if self.widths is not None:
            tokens, tokens_out = (torch.tensor(widths, device=tokens.device).expand_as(tokens)
                                  for widths in self.widths)
        return (vit_flops(self.shape, tokens, tokens_out, self.block_costs) / 1e9).float()

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
    """Collects what an ATSStats needs during one forward; static: the forward runs in static mode (its
    blocks' widths are recorded for the FLOP count, and the whole record compiles with the forward).

    restore: the method's restore rule (``merging.restore_tokens``), None when token outputs hold the kept tokens
    only; dropped: what each block that dropped tokens left for restoring them, in block order; taps: the blocks whose
    output the forward keeps in ``outputs`` (block index -> its packed tokens and how many entries of ``dropped``
    precede it), for intermediate features and hidden states.
    """

    static: bool = False
    restore: Optional[str] = None
    dropped: List[DroppedTokens] = field(default_factory=list)
    taps: Tuple[int, ...] = ()
    outputs: Dict[int, Tuple["TokenBatch", int]] = field(default_factory=dict)
    tokens_in: List[torch.Tensor] = field(default_factory=list)
    tokens_out: List[torch.Tensor] = field(default_factory=list)
    widths_in: List[int] = field(default_factory=list)
    widths_out: List[int] = field(default_factory=list)
    sampling: Dict[int, BlockSampling] = field(default_factory=dict)
    linear_blocks: Tuple[int, ...] = ()

    def enter(self, batch: "TokenBatch") -> None:
        """Note the tokens entering the next block."""
        self.tokens_in.append(batch.live_tokens)
        self.widths_in.append(batch.width)

    def leave(self, batch: "TokenBatch") -> None:
        """Note the tokens the block emitted."""
        self.tokens_out.append(batch.live_tokens)
        self.widths_out.append(batch.width)

    def record_sampling(self, index: int, source_before: torch.Tensor, source_after: torch.Tensor,
                        scores: Optional[torch.Tensor], cls_attention: Optional[torch.Tensor]) -> None:
        """Keep what block ``index`` chose. scores: [B, m_before] or None; cls_attention: [B, m_before],
        per head [B, h, m_before] (averaged when read), or None."""
        record = _record_sampling if self.static else _record_sampling_eagerly
        record(self.sampling, index, source_before, source_after, scores, cls_attention)

    def record_dropped(self, before: "TokenBatch", keep: torch.Tensor, movable: torch.Tensor, keys: torch.Tensor,
                       target: Optional[torch.Tensor] = None) -> None:
        """Keep what restoring the tokens a block drops needs (nothing without ``restore``). before: the tokens
        where the block drops them; keep, movable: [B, m] bool over its positions, the dropped ones being movable
        and not kept; keys: [B, h, m, d] the block's keys; target: [B, m] the position each token was
        folded into, None where the block folds nothing (``merging.dropped_tokens``)."""
        if self.restore is not None:
            self.dropped.append(dropped_tokens(self.restore, before.pad(before.rows), before.source, keep, movable,
                                               keys, target, self.static))

    def absorb(self, block: "ForwardRecord") -> None:
        """Take in what one block's own record collected (``step.run_block``)."""
        self.sampling.update(block.sampling)
        self.dropped.extend(block.dropped)

    def tap(self, index: int, batch: "TokenBatch") -> None:
        """Keep the tokens block ``index`` emitted, if it is one of ``taps``."""
        if index in self.taps:
            self.outputs[index] = (batch, len(self.dropped))

    def token_map(self, batch: "TokenBatch", layer: Callable[[torch.Tensor], torch.Tensor],
                  dropped: Optional[int] = None) -> torch.Tensor:
        """The tokens of ``batch`` through a per-token ``layer`` (a final norm): [B, m, C'], zeros on padding, or
        under ``restore`` the full map [B, N0, C'] in the original order, restored from the first ``dropped``
        entries of ``dropped`` (default all) before the layer."""
        if self.restore is None:
            tokens = batch.pad(layer(batch.rows))
            return tokens if batch.full else tokens * batch.position_mask.unsqueeze(-1)
        tokens = batch.pad(batch.rows)
        return layer(restore_tokens(tokens, batch.source, self.dropped[:dropped], batch.num_source_tokens))

    def finish(self, shape: ViTShape, block_costs: Mapping[int, BlockCost]) -> ATSStats:
        widths = (self.widths_in, self.widths_out) if self.static else None
        return ATSStats(shape, block_costs, self.tokens_in, self.tokens_out, self.sampling, self.linear_blocks,
                        widths=widths)


def _record_sampling(sampling: Dict[int, BlockSampling], index: int, source_before: torch.Tensor,
                     source_after: torch.Tensor, scores: Optional[torch.Tensor],
                     cls_attention: Optional[torch.Tensor]) -> None:
    sampling[index] = BlockSampling(source_before, source_after, _detached(scores), _detached(cls_attention))


#: ``_record_sampling`` left to eager mode in the adaptive forward, which torch.compile splits into graphs anyway:
#: inlined there, a dictionary write would make one graph per block index.
_record_sampling_eagerly = torch.compiler.disable(_record_sampling)


def _head_mean(attention: torch.Tensor) -> torch.Tensor:
    """[B, h, m] per-head attention -> its mean over heads [B, m]; [B, m] as it is."""
    return attention.mean(dim=1) if attention.ndim == 3 else attention


def _detached(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.detach() if tensor is not None and tensor.requires_grad else tensor
