"""The adapter for open_clip's ``VisionTransformer`` (the image tower ``model.visual`` of CLIP ViT-B/32, B/16, L/14,
the quickgelu configs, CoCa, ...).

Its ``ResidualAttentionBlock`` is a pre-norm block on ``nn.MultiheadAttention`` (q, k and v from one fused input
projection); the patched forward embeds (``conv1``, class embedding, positions, ``ln_pre``), runs the blocks through
the shared step and pools as open_clip does over each image's valid tokens: the class token (``'tok'``), the size-
weighted mean of the valid patch tokens (``'avg'``), or the attentional pooler with padding masked and each token's
key weighed by its size. ``output_tokens`` returns the patch tokens padded with zeros (``ats.last_stats(model)``
says how many each image kept). ``model.encode_image`` of a CLIP whose ``visual`` is patched runs ATS.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..flops import ViTShape, attention_pool_token_flops, conv_flops, linear_flops, patch_grid
from ..method import Method
from ..packing import TokenBatch
from ..step import BlockParts
from .family import Family, PatchedModel, check_block_types, check_image_size, masked_features, run_patched, valid_mean


def in_projection(attn: nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
    """The queries, keys and values [T, 3C] of normed rows [T, C], from the fused input projection."""
    return F.linear(y, attn.in_proj_weight, attn.in_proj_bias)


def _sequence_first(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block of a transformer that is not batch first, on x [B, N, C]."""
    return block(x.transpose(0, 1)).transpose(0, 1)


def _pooler(pool: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionalPooler`` on features x [B, m, C] whose tokens weigh ``weights`` [B, m] (each token's
    size, 0 on padding): its queries attend over the valid tokens, proportionally to their size."""
    x = pool.ln_k(x)
    queries = pool.ln_q(pool.query).unsqueeze(0).expand(x.shape[0], -1, -1)
    return pool.attn(queries, x, x, key_padding_mask=weights.log().to(x.dtype), need_weights=False)[0]


def _pooler_flops(pool: nn.Module) -> Tuple[int, int]:
    """An attentional pooler's FLOPs per image (its queries' projections in and out) and per token it reads (its
    key and value projections and the queries' attention)."""
    attn, queries = pool.attn, pool.query.shape[0]
    width = attn.embed_dim
    kv = 2 * attn.kdim * width
    return queries * 2 * width * width, attention_pool_token_flops(kv, queries, width)


class ATSOpenCLIPVisionTransformer(PatchedModel):
    """Mixed in before open_clip's VisionTransformer; ``OPEN_CLIP`` is the adapter."""

    def forward(self, x: torch.Tensor):
        """Images [B, 3, H, W] -> the pooled embedding [B, D] (and the padded tokens with ``output_tokens``)."""
        pooled, tokens = OPEN_CLIP.pool(self, run_patched(self, OPEN_CLIP.embed(self, x), 0, tuple(x.shape[1:])))
        if self.proj is not None:
            pooled = pooled @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        pooled, _ = OPEN_CLIP.pool(self, batch)
        return pooled if self.proj is None else pooled @ self.proj


class OpenCLIPVisionTransformer(Family):
    name = "open_clip VisionTransformer (CLIP ViT-B/32, B/16, L/14, quickgelu, CoCa)"
    mixin = ATSOpenCLIPVisionTransformer
    models = ("open_clip.transformer.VisionTransformer",)

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        check_block_types(model.transformer.resblocks, {ResidualAttentionBlock: ()},
                          "open_clip's ResidualAttentionBlock (not the custom blocks of block_type='custom')")
        for index, block in enumerate(model.transformer.resblocks):
            attn = block.attn
            if hasattr(block, "ln_1_kv") or not attn._qkv_same_embed_dim or attn.bias_k is not None \
                    or attn.add_zero_attn:
                raise TypeError(f"block {index}'s attention is not a plain self-attention (cross-attention, separate "
                                "key/value sizes, extra key bias or zero attention); ATS supports open_clip's "
                                "self-attention blocks")
        super().check(model, config, static)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.transformer.resblocks

    def block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        function = checkpoint if model.transformer.grad_checkpointing else None
        return [replace(self.parts_of(model, block), checkpoint=function) for block in self.blocks(model)]

    def parts_of(self, model: nn.Module, block: nn.Module) -> BlockParts:
        attn = block.attn
        heads = attn.num_heads
        dense = block if model.transformer.batch_first else partial(_sequence_first, block)
        return BlockParts(norm1=block.ln_1, qkv=partial(in_projection, attn), num_heads=heads,
                          head_dim=attn.embed_dim // heads, scale=(attn.embed_dim // heads) ** -0.5,
                          proj=attn.out_proj, norm2=block.ln_2, mlp=block.mlp, dense=dense, training=block.training,
                          attn_drop=attn.dropout, ls1=block.ls_1, ls2=block.ls_2)

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        grid = patch_grid(model.image_size, model.patch_size, input_size)
        block = model.transformer.resblocks[0]
        width = block.attn.embed_dim
        head_flops, token_flops = 0, 0
        for pool in (getattr(model, "attn_pool", None), getattr(model, "attn_pool_contrastive", None)):
            if pool is not None:
                flops, per_token = _pooler_flops(pool)
                head_flops, token_flops = head_flops + flops, token_flops + per_token
        if model.proj is not None:
            head_flops += model.proj.shape[0] * model.proj.shape[1]
        return ViTShape(embed_dim=width, attn_dim=width, head_dim=width // block.attn.num_heads,
                        mlp_flops=linear_flops(block.mlp), depth=len(model.transformer.resblocks),
                        num_patches=grid[0] * grid[1], num_prefix_tokens=1,
                        patch_embed_flops=conv_flops(model.conv1, grid), head_flops=head_flops, grid_size=grid,
                        head_token_flops=token_flops)

    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        return (model.conv1.in_channels, *model.image_size)

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] of the model's size -> tokens [B, 1 + P, C]: ``_embeds`` without patch dropout."""
        check_image_size(images, self.input_size(model), "preprocess them with the transform open_clip gives with it")
        if model.training and not isinstance(model.patch_dropout, nn.Identity):
            raise ValueError("patch dropout (patch_dropout > 0) in train mode is not supported with ATS: it drops "
                             "tokens before the blocks; create the model with patch_dropout=0")
        x = model.conv1(images).flatten(2).transpose(1, 2)
        cls = model.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + model.positional_embedding.to(x.dtype)
        return model.ln_pre(x)

    def pool(self, model: nn.Module, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """open_clip's ``_pool`` over each image's valid tokens -> (pooled [B, D], tokens [B, m, D])."""
        weights = model._ats.pool_weights
        if model.attn_pool is not None:
            if model.attn_pool_contrastive is not None:
                x = masked_features(batch, model.ln_post(batch.rows))
                tokens = _pooler(model.attn_pool, x, weights)
                if model.attn_pool_type == "parallel":
                    return _pooler(model.attn_pool_contrastive, x, weights), tokens
                return model.attn_pool_contrastive(tokens), tokens
            x = model.ln_post(_pooler(model.attn_pool, masked_features(batch, batch.rows), weights))
            return model._global_pool(x)
        late_norm = model.final_ln_after_pool
        x = masked_features(batch, batch.rows if late_norm else model.ln_post(batch.rows))
        if model.pool_type == "avg":
            pooled, tokens = valid_mean(x, weights, 1), x[:, 1:]
        elif model.pool_type == "tok":
            pooled, tokens = x[:, 0], x[:, 1:]
        else:
            pooled = tokens = x
        return (model.ln_post(pooled) if late_norm else pooled), tokens

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        """open_clip's ``preprocess_cfg`` (resize the shorter side, centre crop) as timm's data config."""
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        cfg = getattr(model, "preprocess_cfg", None) or {}
        return dict(input_size=self.input_size(model), mean=tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
                    std=tuple(cfg.get("std", OPENAI_DATASET_STD)), interpolation=cfg.get("interpolation", "bicubic"),
                    crop_pct=1.0, crop_mode="center", class_names=None)


OPEN_CLIP = OpenCLIPVisionTransformer()
