"""One ATS block step for every backbone: a pre-norm block run on a packed TokenBatch.

A family adapter (``ats.patch.timm``, ``ats.patch.hf``, ...) describes each of its blocks as
``BlockParts``; ``run_blocks`` then runs a model's blocks under a PatchConfig (ATS, EViT, both, or
token merging): blocks before the first patched one and any block while no image has padding run
the block's own forward; an ATS block scores, samples (and optionally fuses) tokens and runs
attention for the kept queries only; an EViT or merging block attends with every token and reduces
them before its MLP; later blocks mask padded keys. Where attention depends on positions (rotary
embeddings, relative position biases), each token's share is gathered at the position it came from.
Nothing here knows a family's module names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATSConfig, EViTConfig, MergeConfig, PatchConfig, SAINTConfig, TokenBudget, token_capacities
from .evit import FUSED_SOURCE, attentive_tokens, fuse_inattentive
from .merging import bipartite_soft_matching, fold, keep_distinct, nearest_kept, unit_vectors
from .packing import TokenBatch
from .profiling import region
from .saint import similar_tokens
from .sampling import (
    class_attention,
    cls_scores,
    inverse_transform_sample,
    masked_softmax_logits,
    released_attention,
    released_sample,
    self_attention_scores,
    top_up,
    topk_sample,
)
from .stats import BlockSampling, ForwardRecord

Layer = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class Rotation:
    """Rotary position embeddings of one block: each patch token's queries and keys turn by the angles of
    its patch position, wherever packing has moved the token; prefix tokens, padding and tokens that stand
    for no one position (EViT's fused token) do not turn.

    sin, cos: [P + 1, d], or per head [h, P + 1, d]: the P patch positions' values, then the identity
    (0 and 1); half: the rotate-half layout (channel i pairs with i + d/2), else interleaved pairs
    (2i with 2i + 1); prefix: the tokens before the patches in the original sequence.
    """

    sin: torch.Tensor
    cos: torch.Tensor
    half: bool
    prefix: int

    @classmethod
    def from_table(cls, table: torch.Tensor, half: bool, prefix: int) -> "Rotation":
        """table: [P, 2d] or [h, P, 2d], each position's sines then cosines (timm's layout)."""
        sin, cos = table.chunk(2, dim=-1)
        return cls(F.pad(sin, (0, 0, 0, 1)), F.pad(cos, (0, 0, 0, 1), value=1.0), half, prefix)

    def __call__(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Turn x [B, h, m, d], whose positions hold the tokens ``source`` [B, m] (``TokenBatch.source``)."""
        patch = source - self.prefix
        index = torch.where(patch >= 0, patch, self.sin.shape[-2] - 1)
        sin, cos = self._at(self.sin, index), self._at(self.cos, index)
        if self.half:
            first, second = x.chunk(2, dim=-1)
            turned = torch.cat((-second, first), dim=-1)
        else:
            turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return (x * cos + turned * sin).to(x.dtype)

    @staticmethod
    def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """values [P + 1, d] or [h, P + 1, d] at index [B, m] -> [B, 1 or h, m, d]."""
        if values.ndim == 2:
            return values[index].unsqueeze(1)
        return values[:, index].transpose(0, 1)


def pair_bias(bias: torch.Tensor, query_source: torch.Tensor, key_source: torch.Tensor) -> torch.Tensor:
    """A position bias [h, N0, N0] (by query and key index in the original token sequence) at the pairs of
    queries ``query_source`` [B, nq] and keys ``key_source`` [B, n] -> [B, h, nq, n]; 0 where either holds
    no position (padding, EViT's fused token)."""
    size = bias.shape[-1]
    padded = F.pad(bias, (0, 1, 0, 1)).flatten(1)
    queries = torch.where(query_source >= 0, query_source, size)
    keys = torch.where(key_source >= 0, key_source, size)
    pairs = queries.unsqueeze(2) * (size + 1) + keys.unsqueeze(1)
    return padded[:, pairs].transpose(0, 1)


@dataclass
class BlockParts:
    """The parts of one pre-norm block, wherever its family keeps them. The block computes

        x = x + drop_path1(ls1(proj_drop(proj(out_norm(attention(norm1(x))) * sigmoid(gate(norm1(x)))))))
        x = x + drop_path2(ls2(mlp_drop(mlp(norm2(x)))))

    qkv: normed rows [T, C] -> [T, 3A], the queries, keys and values side by side (heads in order);
    q_norm, k_norm: per-head norms on [B, h, n, d]; attn_drop: dropout on attention probabilities;
    drop_path1/2: stochastic-depth modules (anything with ``drop_prob`` and optionally ``scale_by_keep``),
    applied per image; dense: the block's own forward on a batch with no padding [B, N, C], or None
    where the block runs from these parts only (a CvT block without its convolutional projections);
    checkpoint: gradient checkpointing as the user turned it on for this block (called like
    ``torch.utils.checkpoint.checkpoint``), None when the block keeps its activations;
    rotation: rotary position embeddings of q and k by each token's original position (after the q/k
    norms), None without; position_bias: [h, N0, N0] added to the attention logit of each (query, key)
    pair of the model's original token sequence (prefix included), None without. With either, ``dense``
    runs only while the tokens are in their original order.
    """

    norm1: Layer
    qkv: Layer
    num_heads: int
    head_dim: int
    scale: float
    proj: Layer
    norm2: Layer
    mlp: Layer
    dense: Optional[Layer]
    training: bool = False
    attn_drop: float = 0.0
    q_norm: Layer = identity
    k_norm: Layer = identity
    out_norm: Layer = identity
    gate: Optional[Layer] = None
    proj_drop: Layer = identity
    ls1: Layer = identity
    drop_path1: Optional[nn.Module] = None
    mlp_drop: Layer = identity
    ls2: Layer = identity
    drop_path2: Optional[nn.Module] = None
    checkpoint: Optional[Callable] = None
    rotation: Optional[Rotation] = None
    position_bias: Optional[torch.Tensor] = None

    @property
    def positional(self) -> bool:
        """Whether attention depends on where each token came from (beyond what its features hold)."""
        return self.rotation is not None or self.position_bias is not None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, m, A] -> [B, h, m, d], a view."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def split_heads(self, qkv: torch.Tensor, source: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, m, 3A] of the tokens ``source`` [B, m] -> q, k, v each [B, h, m, d], with the q/k norms and the
        rotation applied."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return self.rotated(self.q_norm(q), source), self.rotated(self.k_norm(k), source), v

    def rotated(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Queries or keys [B, h, m, d] of the tokens ``source`` [B, m], turned by the rotation (if any)."""
        return x if self.rotation is None else self.rotation(x, source)


def run_blocks(blocks: Sequence[BlockParts], x: torch.Tensor, config: PatchConfig, num_prefix_tokens: int,
               has_cls: bool, start: int = 0, static: bool = False) -> Tuple[TokenBatch, ForwardRecord]:
    """Run ``blocks[start:]`` under ``config`` on the tokens x [B, N, C] that the first ``start`` blocks
    made (all N of them: no block before the first patched one drops any).

    static: give every block's output the width of its capacity (``token_capacities``: the most it can
    keep) instead of its largest kept count, so that the forward reads nothing on the host and compiles to one
    graph.
    Returns the packed tokens after the last block and what each block did.
    """
    if not 0 <= start <= config.first_block:
        raise ValueError(f"the blocks can start at 0..{config.first_block} (up to the first patched block) for "
                         f"{config.describe()}, got {start}")
    batch = TokenBatch.from_dense(x, keep_padding=config.packing == "padded", static=static)
    capacities = token_capacities(config, x.shape[1], num_prefix_tokens, len(blocks)) if static else None
    record = ForwardRecord(static=static)
    for index, parts in enumerate(blocks):
        record.enter(batch)
        if index >= start:
            step = run_block
            if parts.checkpoint is not None and torch.is_grad_enabled():
                step = partial(parts.checkpoint, run_block, use_reentrant=False)
            capacity = None if capacities is None else capacities[index]
            batch, sampling = step(parts, batch, config, index, num_prefix_tokens, has_cls, capacity)
            record.sampling.update(sampling)
        record.leave(batch)
    return batch, record


def run_block(parts: BlockParts, batch: TokenBatch, config: PatchConfig, index: int, num_prefix_tokens: int,
              has_cls: bool, capacity: Optional[int] = None) -> Tuple[TokenBatch, Dict[int, BlockSampling]]:
    """Run block ``index`` of a model under ``config``; returns its output and what it chose (if it
    samples or merges). capacity: the width of its output in static mode (None: adaptive). Side-effect
    free, so gradient checkpointing may run it again in the backward pass (with the same random numbers,
    so it samples the same tokens)."""
    record = ForwardRecord(static=batch.static)
    method = config.method_at(index)
    if isinstance(method, MergeConfig):
        batch = merge_block(parts, batch, method.r, num_prefix_tokens, record, index, capacity)
    elif isinstance(method, SAINTConfig):
        batch = saint_block(parts, batch, method, num_prefix_tokens, record, index, capacity)
    elif isinstance(method, EViTConfig):
        batch = evit_block(parts, batch, method.keep_rate, num_prefix_tokens, record, index, capacity)
    elif isinstance(method, ATSConfig):
        batch = ats_block(parts, batch, method.budgets[index], method, num_prefix_tokens, has_cls, record, index,
                          capacity)
    elif batch.is_dense and parts.dense is not None and (batch.in_source_order or not parts.positional):
        batch = batch.with_rows(parts.dense(batch.dense()).reshape(batch.rows.shape))
    else:
        batch = masked_block(parts, batch)
    return batch, record.sampling


def _attend(parts: BlockParts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of queries q [B, h, nq, d] over keys [B, h, n, d] -> [B, nq, A].

    bias: ``logit_bias`` of the queries over the keys' batch, or None.
    """
    dropout = parts.attn_drop if parts.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=parts.scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def logit_bias(parts: BlockParts, batch: TokenBatch, query_source: torch.Tensor) -> Optional[torch.Tensor]:
    """What attention adds to the logits of the queries ``query_source`` [B, nq] over the keys of ``batch``:
    its ``attention_mask`` ([B, 1, 1, n] bool or additive float, or None), plus in a block with a position
    bias that bias at each (query, key) pair (then [B, h, nq, n] float)."""
    mask = batch.attention_mask
    if parts.position_bias is None:
        return mask
    bias = pair_bias(parts.position_bias, query_source, batch.source)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask


def _key_bias(batch: TokenBatch) -> Optional[torch.Tensor]:
    """[B, n] the log size added to each key's logit, or None when every key counts once."""
    mask = batch.attention_mask
    return None if mask is None or mask.dtype == torch.bool else mask[:, 0, 0]


def attention_probabilities(parts: BlockParts, batch: TokenBatch, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention of every query q [B, h, m, d] over the keys k [B, h, m, d] of ``batch`` -> [B, h, m, m]."""
    if parts.position_bias is None:
        return masked_softmax_logits(q, k, parts.scale, batch.key_mask, _key_bias(batch))
    return ((q * parts.scale) @ k.transpose(-2, -1) + logit_bias(parts, batch, batch.source)).softmax(dim=-1)


def class_attention_of(parts: BlockParts, batch: TokenBatch, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The class token's (position 0's) attention over the keys k [B, h, m, d] of ``batch`` -> [B, h, m]."""
    if parts.position_bias is None:
        return class_attention(q.select(2, 0), k, parts.scale, batch.key_mask, _key_bias(batch))
    logits = (q.narrow(2, 0, 1) * parts.scale) @ k.transpose(-2, -1)
    return (logits + logit_bias(parts, batch, batch.source.narrow(1, 0, 1))).softmax(dim=-1).squeeze(2)


def per_image_drop_path(module: Optional[nn.Module], update: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Stochastic depth per image (not per row) on per-row updates [T, C]; freezes dropped class tokens."""
    drop_prob = getattr(module, "drop_prob", 0.0) if module is not None and module.training else 0.0
    if drop_prob > 0.0:
        keep_prob = 1.0 - drop_prob
        keep = update.new_empty(batch.batch_size).bernoulli_(keep_prob)
        if getattr(module, "scale_by_keep", True):
            keep = keep / keep_prob
        update = update * keep.index_select(0, batch.image_of_row)[:, None]
    live = batch.row_live
    return update if live is None else update * live


def _attention_update(parts: BlockParts, out: torch.Tensor, gate_input: Optional[torch.Tensor],
                      batch: TokenBatch) -> torch.Tensor:
    """The attention half's residual update from attention outputs [T, A]; gate_input: the normed
    inputs [T, C] of the same rows, used only by gated attention (None otherwise)."""
    out = parts.out_norm(out)
    if parts.gate is not None:
        out = out * parts.gate(gate_input).sigmoid()
    return per_image_drop_path(parts.drop_path1, parts.ls1(parts.proj_drop(parts.proj(out))), batch)


def _mlp_half(parts: BlockParts, batch: TokenBatch) -> TokenBatch:
    update = parts.ls2(parts.mlp_drop(parts.mlp(parts.norm2(batch.rows))))
    return batch.with_rows(batch.rows + per_image_drop_path(parts.drop_path2, update, batch))


def masked_block(parts: BlockParts, batch: TokenBatch) -> TokenBatch:
    """A standard block on a padded batch: valid rows through the linear layers, padded keys masked."""
    y = parts.norm1(batch.rows)
    q, k, v = parts.split_heads(batch.pad(parts.qkv(y)), batch.source)
    out = batch.unpad(_attend(parts, q, k, v, logit_bias(parts, batch, batch.source)))
    return _mlp_half(parts, batch.with_rows(batch.rows + _attention_update(parts, out, y, batch)))


@dataclass
class TokenChoice:
    """What an ATS block chose, over its input positions [B, m].

    keep: bool, the sampled tokens (patch tokens, and the class token when it is not enforced);
    patches: bool, the valid patch positions; scores: float, the significance scores;
    cls_attention: [B, h, m] the class token's attention (None without a class token);
    cls_live: [B] bool, whether the class token survives (None when it is enforced).
    """

    keep: torch.Tensor
    patches: torch.Tensor
    scores: torch.Tensor
    cls_attention: Optional[torch.Tensor]
    cls_live: Optional[torch.Tensor]


def choose_tokens(parts: BlockParts, batch: TokenBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  budget: TokenBudget, config: ATSConfig, prefix: int, has_cls: bool) -> TokenChoice:
    """Score the valid tokens and sample the ones to keep (steps 2-4 of ATS) in the block of ``parts``.

    q, k, v: [B, h, m, d] in the padded layout (padding is no key and no candidate).
    """
    patches = batch.patch_positions(prefix)
    candidates, cls_live = patches, None
    if not config.keep_cls:
        cls_live = batch.cls_live if batch.cls_live is not None else torch.ones_like(patches[:, 0])
        candidates = patches.clone()
        candidates[:, 0] = cls_live
    if config.score_for(has_cls) == "cls":
        cls_attention = class_attention_of(parts, batch, q, k)
        scored = released_attention(cls_attention, batch.key_mask) if config.sampler == "released" else cls_attention
        scores = cls_scores(scored, torch.linalg.vector_norm(v, dim=(1, 3)), candidates)
    else:
        attention = attention_probabilities(parts, batch, q, k)
        scores = self_attention_scores(attention, batch.key_mask, candidates)
        cls_attention = attention[:, :, 0] if has_cls else None

    keep = sample_positions(batch, scores, candidates, patches, budget, config, prefix, parts.training)
    if cls_live is not None:
        cls_live = keep[:, 0] & cls_live
    return TokenChoice(keep, patches, scores, cls_attention, cls_live)


def sample_positions(batch: TokenBatch, scores: torch.Tensor, candidates: torch.Tensor, patches: torch.Tensor,
                     budget: TokenBudget, config: ATSConfig, prefix: int, training: bool) -> torch.Tensor:
    """Step 4 of ATS with ``config``'s sampler: the positions to keep [B, m] bool, from the scores [B, m] of the
    candidates [B, m] (patches [B, m]: the valid patch positions, for ``min_kept``)."""
    common = batch.common_live_tokens
    samples = budget.samples(batch.live_tokens if common is None else common, config.min_tokens)
    if config.sampler == "topk":
        keep = topk_sample(scores, samples)
    elif config.sampler == "released":
        keep = released_sample(scores, candidates, budget.released_points(batch.num_source_tokens - prefix))
    else:
        keep = inverse_transform_sample(scores, samples, budget.max_samples(batch.width, config.min_tokens),
                                        config.stochastic and training)
    if config.min_kept:
        keep = top_up(keep, scores, config.kept_floor(patches.sum(dim=1)))
    return keep


def ats_block(parts: BlockParts, batch: TokenBatch, budget: TokenBudget, config: ATSConfig, prefix: int,
              has_cls: bool, record: ForwardRecord, index: int, capacity: Optional[int] = None) -> TokenBatch:
    """Score, sample and keep tokens, then run the block on the kept ones (selected queries only)."""
    y = parts.norm1(batch.rows)
    qkv = parts.qkv(y)
    q, k, v = parts.split_heads(batch.pad(qkv), batch.source)
    keys = batch  # the keys' tokens and sizes, as they are before fusing folds dropped tokens into kept ones
    with region("ats.score_and_sample"):
        choice = choose_tokens(parts, batch, q, k, v, budget, config, prefix, has_cls)
    if config.fuse or config.distinct:
        with region("ats.fuse"):
            unit = unit_vectors(k.mean(dim=1))
            if config.distinct:
                choice.keep = keep_distinct(unit, choice.keep, choice.patches, choice.scores, config.distinct,
                                            batch.static)
            if config.fuse:
                batch = _fold(batch, nearest_kept(unit, choice.keep, choice.patches, batch.static))
    keep = choice.keep
    keep.narrow(1, 0, prefix).fill_(True)  # every image's prefix tokens hold its first positions
    kept, rows_from = batch.select(keep, capacity=capacity)
    if choice.cls_live is not None:
        kept.cls_live = choice.cls_live
    record.record_sampling(index, batch.source, kept.source, choice.scores, choice.cls_attention)
    with region("ats.pack"):
        query_rows = qkv.narrow(-1, 0, qkv.shape[-1] // 3).index_select(0, rows_from)
        queries = parts.rotated(parts.q_norm(parts.heads(kept.pad(query_rows))), kept.source)
        gate_input = None if parts.gate is None else y.index_select(0, rows_from)
    out = kept.unpad(_attend(parts, queries, k, v, logit_bias(parts, keys, kept.source)))
    update = _attention_update(parts, out, gate_input, kept)
    return _mlp_half(parts, kept.with_rows(kept.rows + update))


def merge_block(parts: BlockParts, batch: TokenBatch, r: int, prefix: int, record: ForwardRecord,
                index: int, capacity: Optional[int] = None) -> TokenBatch:
    """The token-merging baseline: attention over all tokens, merge r of them, MLP on the rest. The
    tokens leave in ToMe's order: prefix, the unmerged tokens of set A, then set B."""
    y = parts.norm1(batch.rows)
    q, k, v = parts.split_heads(batch.pad(parts.qkv(y)), batch.source)
    out = batch.unpad(_attend(parts, q, k, v, logit_bias(parts, batch, batch.source)))
    batch = batch.with_rows(batch.rows + _attention_update(parts, out, y, batch))
    positions = torch.arange(batch.width, device=y.device)
    patches = batch.patch_positions(prefix)
    target, side_b = bipartite_soft_matching(k.mean(dim=1), r, patches)
    batch = _fold(batch, target)
    kept, _ = batch.select(batch.position_mask & (target == positions), last=side_b, capacity=capacity)
    record.record_sampling(index, batch.source, kept.source, None, None)
    return _mlp_half(parts, kept)


def saint_block(parts: BlockParts, batch: TokenBatch, config: SAINTConfig, prefix: int, record: ForwardRecord,
                index: int, capacity: Optional[int] = None) -> TokenBatch:
    """SAINT: attention over all tokens, drop each image's redundant tokens of set A (``ats.saint``), MLP on
    the rest. The tokens leave in the authors' order: prefix, the kept A tokens by descending redundancy,
    then set B (an image that drops none keeps its order)."""
    y = parts.norm1(batch.rows)
    q, k, v = parts.split_heads(batch.pad(parts.qkv(y)), batch.source)
    out = batch.unpad(_attend(parts, q, k, v, logit_bias(parts, batch, batch.source)))
    batch = batch.with_rows(batch.rows + _attention_update(parts, out, y, batch))
    drop, order, last = similar_tokens(k.mean(dim=1), batch.patch_positions(prefix), config.threshold, config.k,
                                       config.gamma, batch.static)
    rows_from = batch.rows_at(order)
    ordered = replace(batch, rows=batch.rows.index_select(0, rows_from), source=batch.source.gather(1, order),
                      sizes=None if batch.sizes is None else batch.sizes.index_select(0, rows_from),
                      in_source_order=False)
    kept, _ = ordered.select((batch.position_mask & ~drop).gather(1, order), last=last, capacity=capacity)
    record.record_sampling(index, batch.source, kept.source, None, None)
    return _mlp_half(parts, kept)


def evit_block(parts: BlockParts, batch: TokenBatch, keep_rate: float, prefix: int, record: ForwardRecord,
               index: int, capacity: Optional[int] = None) -> TokenBatch:
    """EViT: attention over all tokens, then keep the attentive patch tokens, fuse the rest into one
    token after them, and run the MLP on what is left."""
    y = parts.norm1(batch.rows)
    q, k, v = parts.split_heads(batch.pad(parts.qkv(y)), batch.source)
    out = batch.unpad(_attend(parts, q, k, v, logit_bias(parts, batch, batch.source)))
    batch = batch.with_rows(batch.rows + _attention_update(parts, out, y, batch))
    cls_attention = class_attention_of(parts, batch, q, k).mean(1)
    patches = batch.patch_positions(prefix)
    keep = attentive_tokens(cls_attention, patches, keep_rate)
    inattentive = patches & ~keep
    fused, fused_size = fuse_inattentive(batch.pad(batch.rows), batch.padded_sizes(), cls_attention, inattentive)
    slot = inattentive & (inattentive.long().cumsum(dim=1) == 1)  # the first inattentive position holds it
    kept, _ = batch.select(keep | slot | (batch.position_mask & ~patches), last=slot, capacity=capacity)
    if keep_rate < 1.0:
        kept = _with_fused_token(kept, inattentive.any(dim=1), fused, fused_size)
    record.record_sampling(index, batch.source, kept.source, cls_attention, cls_attention)
    return _mlp_half(parts, kept)


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


def _fold(batch: TokenBatch, target: torch.Tensor) -> TokenBatch:
    """Size-weighted average of the tokens sharing a target position [B, m]; sizes follow."""
    sizes = batch.sizes if batch.sizes is not None else batch.rows.new_ones(batch.rows.shape[0])
    rows, sizes = fold(batch.rows, sizes, batch.rows_at(target))
    return batch.with_rows(rows, sizes)
