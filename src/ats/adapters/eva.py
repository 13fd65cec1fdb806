"""The adapter for timm's Eva: EVA-02, DINOv3, the RoPE ViTs (axial and mixed, with or without absolute
position embeddings) and Perception Encoder.

These models rotate each patch token's queries and keys by its patch position (rotary position
embeddings), in every block. After an ATS block the tokens are packed, so each block's rotation is
gathered at the position each kept token came from (``TokenBatch.source``, ``step.Rotation``); prefix
tokens are not rotated, as in timm. The rest is a pre-norm block: q/k norms, an optional norm of the
attention output, SwiGLU MLPs, layer scale; the pooling (mean, max, class token or the attention pool)
reads each image's valid tokens only.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from ..flops import ViTShape, linear_flops, stem_flops
from ..method import Method
from ..packing import TokenBatch
from ..stats import ForwardRecord
from ..step import BlockParts, Rotation
from .family import Family, cached_block_parts, check_block_types, run_parts
from .timm import (
    ATSTimmModel,
    TimmViT,
    attention_pool,
    attention_pool_flops,
    check_attention_pool,
    layer_scale,
    pool_valid_tokens,
    qkv_with_biases,
)


class ATSEva(ATSTimmModel):
    """Mixed in before timm's Eva class; ``EVA`` is the adapter."""

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling over each image's valid tokens (the attention pool reads the prefix tokens too)."""
        weights = self._ats.pool_weights
        if self.attn_pool is not None:
            return attention_pool(self.attn_pool, x, weights)
        return pool_valid_tokens(x, self.global_pool if pool_type is None else pool_type, weights,
                                 self.num_prefix_tokens)


class TimmEva(TimmViT):
    name = "timm Eva (EVA-02, DINOv3, RoPE ViT, Perception Encoder)"
    mixin = ATSEva
    models = (Eva,)

    def check(self, model: Eva, config: Optional[Method] = None, static: bool = False) -> None:
        check_block_types(model.blocks, {EvaBlock: (EvaAttention, AttentionRope)}, "timm's pre-norm EvaBlock with "
                          "EvaAttention or AttentionRope (not the post-norm blocks of use_post_norm=True)")
        for index, block in enumerate(model.blocks):
            attn = block.attn
            if getattr(attn, "num_kv_groups", 1) > 1:
                raise TypeError(f"block {index} uses grouped-query attention (num_kv_heads); ATS supports "
                                "blocks whose keys and values have as many heads as their queries")
            if attn.gate is not None:
                raise TypeError(f"block {index} has gated attention (gated_attn=True), which ATS does not support")
        check_attention_pool(model.attn_pool)
        Family.check(self, model, config, static)

    def layer_parts(self, block: EvaBlock) -> BlockParts:
        attn = block.attn
        return BlockParts(norm1=block.norm1, qkv=partial(qkv_with_biases, attn), num_heads=attn.num_heads,
                          head_dim=attn.head_dim, scale=attn.scale, proj=attn.proj, norm2=block.norm2, mlp=block.mlp,
                          dense=block, training=block.training, attn_drop=attn.attn_drop.p, q_norm=attn.q_norm,
                          k_norm=attn.k_norm, out_norm=attn.norm, proj_drop=attn.proj_drop,
                          ls1=partial(layer_scale, block, "gamma_1"), drop_path1=block.drop_path1,
                          ls2=partial(layer_scale, block, "gamma_2"), drop_path2=block.drop_path2)

    def shape(self, model: Eva, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        grid = self.grid(model, input_size)
        attn = model.blocks[0].attn
        pool_flops, pool_token_flops = attention_pool_flops(model.attn_pool)
        head_flops = linear_flops(model.head) if isinstance(model.head, nn.Linear) else 0
        return ViTShape(embed_dim=model.embed_dim, attn_dim=attn.num_heads * attn.head_dim, head_dim=attn.head_dim,
                        mlp_flops=linear_flops(model.blocks[0].mlp), depth=len(model.blocks),
                        num_patches=grid[0] * grid[1], num_prefix_tokens=model.num_prefix_tokens,
                        patch_embed_flops=stem_flops(model.patch_embed.proj, self.image_size(model, input_size))[0],
                        head_flops=pool_flops + head_flops, grid_size=grid, head_token_flops=pool_token_flops,
                        has_class_token=model.cls_token is not None)

    def embed(self, model: Eva, images: torch.Tensor) -> torch.Tensor:
        """Patch and absolute position embedding, prefix tokens and pre-norm: the start of timm's
        forward_features, for a patched or unpatched model (its rotary embeddings: ``rotations``)."""
        self.checked_input_size(model, images)
        if model.patch_drop is not None and model.training:
            raise ValueError("patch dropout (patch_drop_rate > 0) in train mode is not supported with ATS: it "
                             "drops tokens before the blocks; create the model with patch_drop_rate=0")
        tokens, _ = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(tokens)

    def rope_tables(self, model: Eva, input_size: Optional[Sequence[int]] = None) -> List[Optional[torch.Tensor]]:
        """Each block's rotary table for images of ``input_size`` (default the model's): [P, 2d], or per head
        [h, P, 2d] for mixed RoPE (sines then cosines of the P patch positions), as timm's forward makes it;
        None for a model without rotary embeddings."""
        rope = model.rope
        if rope is None:
            return [None] * len(model.blocks)
        if model.dynamic_img_size or not hasattr(rope, "feat_shape"):
            table = rope.get_embed(shape=list(self.grid(model, input_size)))
        else:
            table = rope.get_embed()
        return list(table.unbind(0)) if model.rope_mixed else [table] * len(model.blocks)

    def run_blocks(self, model: Eva, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        """``step.run_blocks`` with each block's rotation of this forward (and its own forward given it)."""
        parts = cached_block_parts(self, model, input_size)[:stop]
        tables = self.rope_tables(model, input_size)
        parts = [part if table is None else replace(
            part, rotation=Rotation.from_table(table, block.attn.rotate_half, block.attn.num_prefix_tokens),
            dense=partial(block, rope=table)) for part, table, block in zip(parts, tables, model.blocks)]
        return run_parts(model, parts, x, shape, start)


EVA = TimmEva()
