"""The block step every backbone and every method shares: a pre-norm block run on a packed TokenBatch.

A family adapter (``ats.adapters``) describes each of its blocks as ``BlockParts``; ``run_blocks`` then runs a
model's blocks under a config (an ``ats.method.Method``): a block the config changes runs the method's own
``run_block`` (``ats.methods``: ATS samples and attends with the kept queries only, EViT, merging and SAINT
attend with every token and reduce them before the MLP); the others run the block's own forward while no image
has padding, else ``masked_block``, which masks padded keys. The pieces methods build their blocks from are here:
``attention_half``, ``attend``, ``attention_update``, ``mlp_half``, ``fold_tokens``, the class token's attention.
Where attention depends on positions (rotary embeddings, relative position biases), each token's share is
gathered at the position it came from. Nothing here knows a family's module names or a method's rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .merging import fold, restore_rule
from .method import BlockContext, Method, token_capacities
from .packing import TokenBatch
from .sampling import class_attention, masked_softmax_logits
from .stats import ForwardRecord

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


def run_blocks(blocks: Sequence[BlockParts], x: torch.Tensor, config: Method, num_prefix_tokens: int,
               has_cls: bool, start: int = 0, static: bool = False, taps: Tuple[int, ...] = (),
               lengths: Optional[torch.Tensor] = None) -> Tuple[TokenBatch, ForwardRecord]:
    """Run ``blocks[start:]`` under ``config`` on the tokens x [B, N, C] that the first ``start`` blocks
    made (all N of them: no block before the first patched one drops any; or with ``lengths`` [B] long each image's
    first ``lengths[i]``, padding after them, for a model that takes images of their own token counts).

    static: give every block's output the width of its capacity (``token_capacities``: the most it can
    keep) instead of its largest kept count, so that the forward reads nothing on the host and compiles to one
    graph. taps: the blocks whose output the record keeps (``ForwardRecord.outputs``), for intermediate features
    and hidden states (``start - 1``: the tokens x).
    Returns the packed tokens after the last block and what each block did (under ``config.restore``, also what
    restores the tokens each block dropped: ``ForwardRecord.token_map``).
    """
    if not 0 <= start <= config.first_block:
        raise ValueError(f"the blocks can start at 0..{config.first_block} (up to the first patched block) for "
                         f"{config.describe()}, got {start}")
    batch = TokenBatch.from_dense(x, keep_padding=config.packing == "padded", static=static)
    if lengths is not None:
        batch = batch.with_lengths(lengths)
    capacities = token_capacities(config, x.shape[1], num_prefix_tokens, len(blocks)) if static else None
    record = ForwardRecord(static=static, restore=restore_rule(config.restore), taps=tuple(taps))
    record.tap(start - 1, batch)  # the tokens entering block ``start``: the embeddings when it is 0
    for index, parts in enumerate(blocks):
        record.enter(batch)
        if index >= start and batch.batch_size:  # an empty batch passes through every block as it is
            step = run_block
            if parts.checkpoint is not None and torch.is_grad_enabled():
                step = partial(parts.checkpoint, run_block, use_reentrant=False)
            capacity = None if capacities is None else capacities[index]
            batch, block_record = step(parts, batch, config, index, num_prefix_tokens, has_cls, capacity)
            record.absorb(block_record)
            record.tap(index, batch)
        record.leave(batch)
    return batch, record


def run_block(parts: BlockParts, batch: TokenBatch, config: Method, index: int, num_prefix_tokens: int,
              has_cls: bool, capacity: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
    """Run block ``index`` of a model under ``config``: the method's ``run_block`` where it changes the block,
    else the block as it is; returns its output and its own record of what it chose (if it samples or merges, and
    what restores the tokens it dropped). capacity: the
    width of its output in static mode (None: adaptive). Side-effect free, so gradient checkpointing may run it
    again in the backward pass (with the same random numbers, so it samples the same tokens)."""
    record = ForwardRecord(static=batch.static, restore=restore_rule(config.restore))
    method = config.method_at(index)
    if method is not None:
        batch = method.run_block(parts, batch, BlockContext(index, num_prefix_tokens, has_cls, record, capacity))
    elif batch.is_dense and parts.dense is not None and (batch.in_source_order or not parts.positional):
        batch = batch.with_rows(parts.dense(batch.dense()).reshape(batch.rows.shape))
    else:
        batch = masked_block(parts, batch)
    return batch, record


def attend(parts: BlockParts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


def attention_update(parts: BlockParts, out: torch.Tensor, gate_input: Optional[torch.Tensor],
                      batch: TokenBatch) -> torch.Tensor:
    """The attention half's residual update from attention outputs [T, A]; gate_input: the normed
    inputs [T, C] of the same rows, used only by gated attention (None otherwise)."""
    out = parts.out_norm(out)
    if parts.gate is not None:
        out = out * parts.gate(gate_input).sigmoid()
    return per_image_drop_path(parts.drop_path1, parts.ls1(parts.proj_drop(parts.proj(out))), batch)


def mlp_half(parts: BlockParts, batch: TokenBatch) -> TokenBatch:
    update = parts.ls2(parts.mlp_drop(parts.mlp(parts.norm2(batch.rows))))
    return batch.with_rows(batch.rows + per_image_drop_path(parts.drop_path2, update, batch))


def attention_half(parts: BlockParts, batch: TokenBatch) -> Tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """The attention half of a block with every token as a query: ``batch`` after its residual update, and the
    queries and keys [B, h, m, d] it attended with (the methods that reduce tokens after attention read them)."""
    y = parts.norm1(batch.rows)
    q, k, v = parts.split_heads(batch.pad(parts.qkv(y)), batch.source)
    out = batch.unpad(attend(parts, q, k, v, logit_bias(parts, batch, batch.source)))
    return batch.with_rows(batch.rows + attention_update(parts, out, y, batch)), q, k


def masked_block(parts: BlockParts, batch: TokenBatch) -> TokenBatch:
    """A standard block on a padded batch: valid rows through the linear layers, padded keys masked."""
    return mlp_half(parts, attention_half(parts, batch)[0])


def fold_tokens(batch: TokenBatch, target: torch.Tensor) -> TokenBatch:
    """Size-weighted average of the tokens sharing a target position [B, m]; sizes follow."""
    sizes = batch.sizes if batch.sizes is not None else batch.rows.new_ones(batch.rows.shape[0])
    rows, sizes = fold(batch.rows, sizes, batch.rows_at(target))
    return batch.with_rows(rows, sizes)
