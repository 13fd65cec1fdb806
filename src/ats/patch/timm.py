"""ATS on timm's VisionTransformer: patch a model in place, unpatch to restore it.

The patched model swaps its class for a subclass whose ``forward_features`` runs the blocks on a
packed TokenBatch: blocks before the first ATS block, and any block while no image has padding,
are timm's own; an ATS block samples tokens; later blocks mask padded keys. No weight changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..config import ATSConfig, TokenBudget
from ..flops import ViTShape, block_flops, dense_flops
from ..packing import TokenBatch
from ..sampling import (
    cls_scores,
    inverse_transform_sample,
    masked_softmax_logits,
    self_attention_scores,
    top_up,
    topk_sample,
)
from ..stats import ATSStats, ForwardRecord

SUPPORTED_POOLS = ("token", "avg", "")


@dataclass
class ATSState:
    """What a patched model carries: its config, its original class, the last forward's stats."""

    config: ATSConfig
    original_class: Type[nn.Module]
    shape: ViTShape
    last_stats: Optional[ATSStats] = None
    lengths: Optional[torch.Tensor] = None


def patch_timm(model: VisionTransformer, config: ATSConfig) -> VisionTransformer:
    """Apply ATS to a timm VisionTransformer in place (re-patching replaces the config)."""
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


def check_patchable(model: nn.Module, config: ATSConfig) -> None:
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


def upper_bound_flops(model: VisionTransformer, shape: ViTShape, config: Optional[ATSConfig]) -> int:
    """FLOPs per image when no sampled token is a duplicate (the most a patched forward can cost)."""
    if config is None:
        return dense_flops(shape)
    total = shape.patch_embed_flops + shape.head_flops
    n = shape.num_tokens
    for index in range(shape.depth):
        budget = config.budgets.get(index)
        if budget is None:
            total += block_flops(shape, n, n)
            continue
        samples = max(budget.max_samples(n, config.min_tokens), config.min_kept)
        n_out = min(n, shape.num_prefix_tokens + samples)
        total += block_flops(shape, n, n_out, config.score)
        n = n_out
    return total


class ATSVisionTransformer:
    """Mixed in before a timm VisionTransformer class by ``patch_timm``."""

    _ats: ATSState

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, m, C'], valid tokens first, zeros on padding."""
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model takes no attn_mask or is_causal: ATS makes its own masks; "
                             "ats.unpatch(model) to use them")
        _check_images(self, x)
        config, shape = self._ats.config, self._ats.shape
        has_cls = self.cls_token is not None
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        batch = TokenBatch.from_dense(x, keep_padding=config.packing == "padded")
        record = ForwardRecord(shape.num_prefix_tokens, shape.num_tokens)
        for index, block in enumerate(self.blocks):
            record.tokens_in.append(batch.live_tokens)
            budget = config.budgets.get(index)
            if budget is not None:
                batch = _ats_block(block, batch, budget, config, has_cls, record, index)
            elif batch.is_dense:
                batch = batch.with_rows(block(batch.dense()).reshape(batch.rows.shape))
            else:
                batch = _masked_block(block, batch)
            record.tokens_out.append(batch.live_tokens)
        scores = {index: config.score for index in config.budgets}
        self._ats.last_stats = record.finish(shape, scores, tuple(self.patch_embed.grid_size))
        self._ats.lengths = batch.lengths
        return batch.pad(self.norm(batch.rows))

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling, with the mean taken over valid tokens only."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type != "avg":
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        lengths = self._ats.lengths
        valid = (torch.arange(x.shape[1], device=x.device) < lengths[:, None])[:, start:, None]
        return (x[:, start:] * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


_PATCHED_CLASSES: Dict[type, type] = {}


def _patched_class(base: type) -> type:
    if base not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[base] = type(f"ATS{base.__name__}", (ATSVisionTransformer, base), {})
    return _PATCHED_CLASSES[base]


def _check_images(model: VisionTransformer, x: torch.Tensor) -> None:
    channels = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != (height, width):
        raise ValueError(f"expected images of shape [B, {channels}, {height}, {width}] for this model, got "
                         f"{list(x.shape)}; resize and normalise them with the model's data config "
                         "(timm.data.resolve_data_config(model=model))")


def _split_heads(qkv: torch.Tensor, attn: Attention) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, m, 3A] -> q, k, v each [B, h, m, d], with the block's q/k norms applied."""
    batch, width, _ = qkv.shape
    q, k, v = qkv.reshape(batch, width, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of queries q [B, h, nq, d] over keys [B, h, n, d] -> [B, nq, A]."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
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


def _attention_update(block: Block, out: torch.Tensor, y: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """The attention half's residual update from attention outputs [T, A] and normed inputs y [T, C]."""
    attn = block.attn
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(y).sigmoid()
    return _drop_path(block.drop_path1, block.ls1(attn.proj_drop(attn.proj(out))), batch)


def _mlp_half(block: Block, batch: TokenBatch) -> TokenBatch:
    update = block.ls2(block.mlp(block.norm2(batch.rows)))
    return batch.with_rows(batch.rows + _drop_path(block.drop_path2, update, batch))


def _masked_block(block: Block, batch: TokenBatch) -> TokenBatch:
    """A standard block on a padded batch: valid rows through the linear layers, padded keys masked."""
    y = block.norm1(batch.rows)
    q, k, v = _split_heads(batch.pad(block.attn.qkv(y)), block.attn)
    out = batch.unpad(_attend(block.attn, q, k, v, batch.key_mask))
    return _mlp_half(block, batch.with_rows(batch.rows + _attention_update(block, out, y, batch)))


def _ats_block(block: Block, batch: TokenBatch, budget: TokenBudget, config: ATSConfig, has_cls: bool,
               record: ForwardRecord, index: int) -> TokenBatch:
    """Score, sample and keep tokens, then run the block on the kept ones (selected queries only)."""
    attn = block.attn
    prefix = record.num_prefix_tokens
    width = batch.width
    y = block.norm1(batch.rows)
    q, k, v = _split_heads(batch.pad(attn.qkv(y)), attn)
    key_mask = batch.key_mask
    positions = torch.arange(width, device=y.device)
    candidates = batch.position_mask & (positions >= prefix)
    if not config.keep_cls:
        cls_live = batch.cls_live if batch.cls_live is not None else torch.ones_like(batch.lengths, dtype=torch.bool)
        candidates[:, 0] = cls_live
    if config.score == "cls":
        cls_attention = masked_softmax_logits(q[:, :, :1], k, attn.scale, key_mask)[:, :, 0]
        scores = cls_scores(cls_attention, v, candidates)
    else:
        attention = masked_softmax_logits(q, k, attn.scale, key_mask)
        scores = self_attention_scores(attention, key_mask, candidates)
        cls_attention = attention[:, :, 0] if has_cls else None

    samples = budget.samples(batch.live_tokens, config.min_tokens)
    if config.sampler == "topk":
        keep = topk_sample(scores, samples)
    else:
        stochastic = config.stochastic and block.training
        keep = inverse_transform_sample(scores, samples, budget.max_samples(width, config.min_tokens), stochastic)
    if config.min_kept:
        keep = top_up(keep, scores, config.min_kept)
    if not config.keep_cls:
        cls_live = keep[:, 0] & cls_live
    keep = keep | (batch.position_mask & (positions < prefix))

    kept, selected, rows_from = batch.select(keep)
    if not config.keep_cls:
        kept.cls_live = cls_live
    record.record_sampling(index, batch, kept, scores, None if cls_attention is None else cls_attention.mean(1))
    gather = selected[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
    out = kept.unpad(_attend(attn, q.gather(2, gather), k, v, key_mask))
    update = _attention_update(block, out, y.index_select(0, rows_from), kept)
    return _mlp_half(block, kept.with_rows(kept.rows + update))
