"""ATS on timm's VisionTransformer: patch a model in place, unpatch to restore it.

The patched model swaps its class for a subclass whose ``forward_features`` runs the blocks on a
packed TokenBatch: blocks before the first ATS block, and any block while no image has padding,
are timm's own; an ATS block samples tokens; later blocks mask padded keys. No weight changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..config import ATSConfig, MergeConfig, TokenBudget
from ..flops import ViTShape, block_flops
from ..merging import bipartite_soft_matching, cosine_similarity, fold, keep_distinct, nearest_kept
from ..packing import TokenBatch
from ..profiling import region
from ..sampling import (
    class_attention,
    cls_scores,
    inverse_transform_sample,
    masked_softmax_logits,
    self_attention_scores,
    top_up,
    topk_sample,
)
from ..stats import ATSStats, ForwardRecord

SUPPORTED_POOLS = ("token", "avg", "")
PatchConfig = Union[ATSConfig, MergeConfig]


@dataclass
class ATSState:
    """What a patched model carries: its config, its original class, the last forward's stats."""

    config: PatchConfig
    original_class: Type[nn.Module]
    shape: ViTShape
    last_stats: Optional[ATSStats] = None
    pool_weights: Optional[torch.Tensor] = None


def patch_timm(model: VisionTransformer, config: PatchConfig) -> VisionTransformer:
    """Apply ATS (or the merging baseline) to a timm VisionTransformer in place; re-patching replaces
    the config."""
    check_patchable(model, config)
    state: Optional[ATSState] = getattr(model, "_ats", None)
    original = state.original_class if state is not None else type(model)
    model._ats = ATSState(config=config, original_class=original, shape=ViTShape.from_model(model))
    model.__class__ = _patched_class(original)
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Restore the model's original class; its forward is then exactly the unpatched one."""
    state: Optional[ATSState] = getattr(model, "_ats", None)
    if state is None:
        raise ValueError("this model is not patched with ATS; nothing to unpatch")
    model.__class__ = state.original_class
    del model._ats
    return model


def check_patchable(model: nn.Module, config: PatchConfig) -> None:
    """Raise TypeError/ValueError naming why ATS cannot run on this model with this config."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"ats.patch supports timm VisionTransformer models (DeiT, ViT, ...), got "
                        f"{type(model).__name__}; create the model with timm.create_model('deit_small_patch16_224')")
    for index, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"block {index} is a {type(block).__name__} with {type(block.attn).__name__}; "
                            "ATS supports timm's pre-norm Block with its standard Attention")
    if model.attn_pool is not None or model.global_pool not in SUPPORTED_POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported; ATS works with "
                        "'token' or 'avg' pooling")
    depth = len(model.blocks)
    if isinstance(config, MergeConfig):
        if config.first >= depth:
            raise ValueError(f"merging from block {config.first} is outside this model's {depth} blocks")
        return
    outside = [index for index in config.budgets if index >= depth]
    if outside:
        raise ValueError(f"ATS block indices {outside} lie outside this model's {depth} blocks (0..{depth - 1}); "
                         f"use ATSConfig.multi_stage(rho, depth={depth}) or smaller indices")
    has_cls = model.cls_token is not None
    if config.score == "cls" and not has_cls:
        raise ValueError("this model has no class token, so score='cls' cannot rank its tokens; "
                         "use ATSConfig(..., score='self_attention')")
    if not config.keep_cls and not has_cls:
        raise ValueError("keep_cls=False needs a class token to drop; this model has none")


def last_stats_timm(model: nn.Module) -> ATSStats:
    state: Optional[ATSState] = getattr(model, "_ats", None)
    if state is None:
        raise ValueError("this model is not patched with ATS; call ats.patch(model, config) first")
    if state.last_stats is None:
        raise ValueError("no forward has run since the model was patched; run model(images) first")
    return state.last_stats


def upper_bound_flops(shape: ViTShape, config: Optional[PatchConfig]) -> float:
    """FLOPs per image when every sample is a distinct token (the most a patched forward can cost)."""
    costs = {} if config is None else config.block_costs(shape)
    total = shape.patch_embed_flops + shape.head_flops
    n = shape.num_tokens
    for index in range(shape.depth):
        n_out = n if index not in costs else _most_tokens_out(config, index, n, shape.num_prefix_tokens)
        total += costs[index](n, n_out) if index in costs else block_flops(shape, n, n)
        n = n_out
    return total


def _most_tokens_out(config: PatchConfig, index: int, n: int, prefix: int) -> int:
    if isinstance(config, MergeConfig):
        patches = n - prefix
        return n - min(config.r, (patches + 1) // 2) if patches >= 2 else n
    if config.distinct:
        return n
    samples = max(config.budgets[index].max_samples(n, config.min_tokens), config.kept_floor(n - prefix))
    return min(n, prefix + samples)


class ATSVisionTransformer:
    """Mixed in before a timm VisionTransformer class by ``patch_timm``."""

    _ats: ATSState

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, m, C'], valid tokens first, zeros on padding."""
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model takes no attn_mask or is_causal: ATS makes its own masks; "
                             "ats.unpatch(model) to use them")
        return self.forward_tokens(embed_tokens(self, x))

    def forward_tokens(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run the blocks from ``start`` on: x [B, N, C'] are the tokens the blocks before ``start``
        made, all N of them (blocks before the first patched one drop none; an evaluation of several
        configs computes them once). Returns normalised tokens [B, m, C'], zeros on padding."""
        config, shape = self._ats.config, self._ats.shape
        if not 0 <= start <= config.first_block:
            raise ValueError(f"forward_tokens can start at blocks 0..{config.first_block} (up to the first patched "
                             f"block) for {config.describe()}, got {start}")
        has_cls = self.cls_token is not None
        merging = isinstance(config, MergeConfig)
        batch = TokenBatch.from_dense(x, keep_padding=not merging and config.packing == "padded")
        record = ForwardRecord()
        for index, block in enumerate(self.blocks):
            record.tokens_in.append(batch.live_tokens)
            if index < start:
                pass
            elif merging and index >= config.first:
                batch = _merge_block(block, batch, config.r, shape.num_prefix_tokens, record, index)
            elif not merging and index in config.budgets:
                batch = _ats_block(block, batch, config.budgets[index], config, shape.num_prefix_tokens, has_cls,
                                   record, index)
            elif batch.is_dense:
                batch = batch.with_rows(block(batch.dense()).reshape(batch.rows.shape))
            else:
                batch = _masked_block(block, batch)
            record.tokens_out.append(batch.live_tokens)
        self._ats.last_stats = record.finish(shape, config.block_costs(shape), tuple(self.patch_embed.grid_size))
        self._ats.pool_weights = batch.padded_sizes() * batch.position_mask
        x = batch.pad(self.norm(batch.rows))
        return x if batch.full else x.masked_fill(~batch.position_mask[..., None], 0.0)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling; the mean is taken over valid tokens only, each weighted by its size."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type != "avg":
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weights = self._ats.pool_weights[:, start:, None]
        return (x[:, start:] * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


_PATCHED_CLASSES: Dict[type, type] = {}


def _patched_class(base: type) -> type:
    if base not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[base] = type(f"ATS{base.__name__}", (ATSVisionTransformer, base), {})
    return _PATCHED_CLASSES[base]


def embed_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] -> the tokens entering block 0, [B, N, C'] (patch and position embedding,
    prefix tokens, patch dropout, pre-norm: the start of timm's forward_features), for any timm
    VisionTransformer, patched or not."""
    _check_images(model, images)
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def run_first_blocks(model: VisionTransformer, images: torch.Tensor, count: int) -> torch.Tensor:
    """The tokens [B, N, C'] after the first ``count`` blocks, run as in the unpatched model (the
    blocks before a patched model's first patched block are exactly these)."""
    x = embed_tokens(model, images)
    for block in model.blocks[:count]:
        x = block(x)
    return x


def logits_from_block(model: VisionTransformer, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of ``model`` (patched or not) from ``run_first_blocks(model, images, start)``: the same as
    ``model(images)``, without running the first ``start`` blocks again."""
    if hasattr(model, "_ats"):
        return model.forward_head(model.forward_tokens(tokens, start))
    return model.forward_head(model.norm(model.blocks[start:](tokens)))


def _check_images(model: VisionTransformer, x: torch.Tensor) -> None:
    channels = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != (height, width):
        raise ValueError(f"expected images of shape [B, {channels}, {height}, {width}] for this model, got "
                         f"{list(x.shape)}; resize and normalise them with the model's data config "
                         "(timm.data.resolve_data_config(model=model))")


def _heads(x: torch.Tensor, attn: Attention) -> torch.Tensor:
    """[B, m, A] -> [B, h, m, d], a view."""
    return x.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)


def _split_heads(qkv: torch.Tensor, attn: Attention) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, m, 3A] -> q, k, v each [B, h, m, d], with the block's q/k norms applied."""
    q, k, v = qkv.chunk(3, dim=-1)
    return attn.q_norm(_heads(q, attn)), attn.k_norm(_heads(k, attn)), _heads(v, attn)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of queries q [B, h, nq, d] over keys [B, h, n, d] -> [B, nq, A].

    mask: TokenBatch.attention_mask of the keys' batch ([B, 1, 1, n] bool or additive float), or None.
    """
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _drop_path(module: nn.Module, update: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Stochastic depth per image (not per row) on per-row updates [T, C]; freezes dropped class tokens."""
    if isinstance(module, DropPath) and module.training and module.drop_prob > 0.0:
        keep_prob = 1.0 - module.drop_prob
        keep = update.new_empty(batch.batch_size).bernoulli_(keep_prob)
        if module.scale_by_keep:
            keep = keep / keep_prob
        update = update * keep.index_select(0, batch.image_of_row)[:, None]
    live = batch.row_live
    return update if live is None else update * live


def _attention_update(block: Block, out: torch.Tensor, gate_input: Optional[torch.Tensor],
                      batch: TokenBatch) -> torch.Tensor:
    """The attention half's residual update from attention outputs [T, A]; gate_input: the normed
    inputs [T, C] of the same rows, used only by gated attention (None otherwise)."""
    attn = block.attn
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(gate_input).sigmoid()
    return _drop_path(block.drop_path1, block.ls1(attn.proj_drop(attn.proj(out))), batch)


def _mlp_half(block: Block, batch: TokenBatch) -> TokenBatch:
    update = block.ls2(block.mlp(block.norm2(batch.rows)))
    return batch.with_rows(batch.rows + _drop_path(block.drop_path2, update, batch))


def _masked_block(block: Block, batch: TokenBatch) -> TokenBatch:
    """A standard block on a padded batch: valid rows through the linear layers, padded keys masked."""
    y = block.norm1(batch.rows)
    q, k, v = _split_heads(batch.pad(block.attn.qkv(y)), block.attn)
    out = batch.unpad(_attend(block.attn, q, k, v, batch.attention_mask))
    return _mlp_half(block, batch.with_rows(batch.rows + _attention_update(block, out, y, batch)))


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


def _choose_tokens(batch: TokenBatch, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                   budget: TokenBudget, config: ATSConfig, prefix: int, has_cls: bool,
                   training: bool) -> TokenChoice:
    """Score the valid tokens and sample the ones to keep (steps 2-4 of ATS).

    qkv: [T, 3A] the batch's rows through the qkv projection; q, k: [B, h, m, d] in the padded layout.
    """
    key_mask, mask = batch.key_mask, batch.attention_mask
    positions = torch.arange(batch.width, device=q.device)
    patches = batch.position_mask & (positions >= prefix)
    candidates, cls_live = patches, None
    if not config.keep_cls:
        cls_live = batch.cls_live if batch.cls_live is not None else torch.ones_like(patches[:, 0])
        candidates = candidates.clone()
        candidates[:, 0] = cls_live
    key_bias = None if mask is None or mask.dtype == torch.bool else mask[:, 0, 0]
    if config.score == "cls":
        cls_attention = class_attention(q[:, :, 0], k.transpose(1, 2), scale, key_mask, key_bias)
        value_norm = torch.linalg.vector_norm(qkv.chunk(3, dim=-1)[2], dim=-1, keepdim=True)
        scores = cls_scores(cls_attention, batch.pad(value_norm)[..., 0], candidates)
    else:
        attention = masked_softmax_logits(q, k, scale, key_mask, key_bias)
        scores = self_attention_scores(attention, key_mask, candidates)
        cls_attention = attention[:, :, 0] if has_cls else None

    samples = budget.samples(batch.live_tokens, config.min_tokens)
    if config.sampler == "topk":
        keep = topk_sample(scores, samples)
    else:
        keep = inverse_transform_sample(scores, samples, budget.max_samples(batch.width, config.min_tokens),
                                        config.stochastic and training)
    if config.min_kept:
        keep = top_up(keep, scores, config.kept_floor(patches.sum(dim=1)))
    if cls_live is not None:
        cls_live = keep[:, 0] & cls_live
    return TokenChoice(keep, patches, scores, cls_attention, cls_live)


def _ats_block(block: Block, batch: TokenBatch, budget: TokenBudget, config: ATSConfig, prefix: int,
               has_cls: bool, record: ForwardRecord, index: int) -> TokenBatch:
    """Score, sample and keep tokens, then run the block on the kept ones (selected queries only)."""
    attn = block.attn
    y = block.norm1(batch.rows)
    qkv = attn.qkv(y)
    q, k, v = _split_heads(batch.pad(qkv), attn)
    mask = batch.attention_mask
    with region("ats.score_and_sample"):
        choice = _choose_tokens(batch, qkv, q, k, attn.scale, budget, config, prefix, has_cls, block.training)
    if config.fuse or config.distinct:
        with region("ats.fuse"):
            similarity = cosine_similarity(k.mean(dim=1))
            if config.distinct:
                choice.keep = keep_distinct(similarity, choice.keep, choice.patches, choice.scores, config.distinct)
            if config.fuse:
                batch = _fold(batch, nearest_kept(similarity, choice.keep, choice.patches))
    prefix_tokens = batch.position_mask & ~choice.patches
    kept, rows_from = batch.select(choice.keep | prefix_tokens)
    if choice.cls_live is not None:
        kept.cls_live = choice.cls_live
    cls_attention = None if choice.cls_attention is None else choice.cls_attention.mean(1)
    record.record_sampling(index, batch.source, kept.source, choice.scores, cls_attention)
    with region("ats.pack"):
        query_rows = qkv.chunk(3, dim=-1)[0].index_select(0, rows_from)
        queries = attn.q_norm(_heads(kept.pad(query_rows), attn))
        gate_input = None if attn.gate is None else y.index_select(0, rows_from)
    out = kept.unpad(_attend(attn, queries, k, v, mask))
    update = _attention_update(block, out, gate_input, kept)
    return _mlp_half(block, kept.with_rows(kept.rows + update))


def _merge_block(block: Block, batch: TokenBatch, r: int, prefix: int, record: ForwardRecord,
                 index: int) -> TokenBatch:
    """The token-merging baseline: attention over all tokens, merge r of them, MLP on the rest."""
    attn = block.attn
    y = block.norm1(batch.rows)
    q, k, v = _split_heads(batch.pad(attn.qkv(y)), attn)
    out = batch.unpad(_attend(attn, q, k, v, batch.attention_mask))
    batch = batch.with_rows(batch.rows + _attention_update(block, out, y, batch))
    positions = torch.arange(batch.width, device=y.device)
    patches = batch.position_mask & (positions >= prefix)
    target = bipartite_soft_matching(k.mean(dim=1), r, patches)
    batch = _fold(batch, target)
    kept, _ = batch.select(batch.position_mask & (target == positions))
    record.record_sampling(index, batch.source, kept.source, None, None)
    return _mlp_half(block, kept)


def _fold(batch: TokenBatch, target: torch.Tensor) -> TokenBatch:
    """Size-weighted average of the tokens sharing a target position [B, m]; sizes follow."""
    x, sizes = fold(batch.pad(batch.rows), batch.padded_sizes(), target)
    return batch.with_rows(batch.unpad(x), batch.unpad(sizes[..., None])[:, 0])
