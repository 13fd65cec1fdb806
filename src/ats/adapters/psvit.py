"""The adapter for the library's own PS-ViT (``ats.models.psvit.PSViT``): ATS in its vision transformer module.

The stem and the progressive sampler make the tokens that enter block 0 (a class token, then the
sampled tokens); the blocks after them are timm's pre-norm ``Block``, so they run the shared ATS step
as any timm ViT's do. The patched ``forward_features`` returns the padded, normalised tokens;
``ats.last_stats(model).points`` has where each image's patch tokens were sampled, in input pixels.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..flops import ViTShape, block_flops, linear_flops, stem_flops
from ..method import Method
from ..models.psvit import PSViT
from ..packing import TokenBatch
from ..step import BlockParts
from .family import Family, PatchedModel, check_block_types, masked_features, run_patched
from .timm import TIMM

IMAGENET_DEFAULTS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                         crop_pct=0.875, crop_mode="center")


def declared_data_config(model: nn.Module) -> Dict[str, Any]:
    """The preprocessing a model of the library's own declares (``pretrained_cfg``, as the reference models do),
    else ImageNet's; no class names."""
    declared = getattr(model, "pretrained_cfg", None) or {}
    return {**IMAGENET_DEFAULTS, **{key: declared[key] for key in IMAGENET_DEFAULTS if key in declared},
            "class_names": None}


class ATSPSViT(PatchedModel):
    """Mixed in before ``PSViT``; ``PSVIT`` is the adapter."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, m, D], valid tokens first, zeros on padding."""
        tokens, points = self.sample_tokens(images)
        batch = run_patched(self, PSVIT.with_class_token(self, tokens), 0, tuple(images.shape[1:]))
        self._ats.last_stats.points = points * (self.img_size / self.feature_size)
        return masked_features(batch, self.norm(batch.rows))

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return self.forward_head(masked_features(batch, self.norm(batch.rows)))


class PSViTFamily(Family):
    name = "ats.models.psvit.PSViT"
    mixin = ATSPSViT
    models = (PSViT,)

    def check(self, model: PSViT, config: Optional[Method] = None, static: bool = False) -> None:
        check_block_types(model.blocks, {Block: ()}, "timm's pre-norm Block")
        super().check(model, config, static)

    def blocks(self, model: PSViT) -> Sequence[nn.Module]:
        return model.blocks

    def block_parts(self, model: PSViT, input_size: Sequence[int]) -> List[BlockParts]:
        return [TIMM.layer_parts(block) for block in model.blocks]

    def shape(self, model: PSViT, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        """The vision transformer module's sizes; ``patch_embed_flops`` counts the stem and the sampler:
        its encoder layers (standard blocks on N tokens), the position encoding, the bilinear sampling
        (4 multiply-adds per channel and point) and the offset heads."""
        if input_size is not None and tuple(input_size) != self.input_size(model):
            raise ValueError(f"PSViT takes {self.input_size(model)} images only, got {tuple(input_size)}")
        block = model.blocks[0]
        shape = ViTShape(embed_dim=model.embed_dim, attn_dim=block.attn.qkv.out_features // 3,
                         head_dim=block.attn.head_dim, mlp_flops=linear_flops(block.mlp), depth=len(model.blocks),
                         num_patches=model.num_points ** 2, num_prefix_tokens=1, patch_embed_flops=0,
                         head_flops=linear_flops(model.head), grid_size=(model.num_points, model.num_points))
        stem = stem_flops(model.stem, (model.img_size, model.img_size))[0]
        n, sampler = shape.num_patches, model.sampler
        per_point = 4 * model.embed_dim + linear_flops(sampler.pos_embed)
        sampling = len(sampler.blocks) * (n * per_point + block_flops(shape, n, n))
        sampling += n * sum(linear_flops(head) for head in sampler.offset_heads)
        return ViTShape(**{**shape.__dict__, "patch_embed_flops": stem + sampling})

    def input_size(self, model: PSViT) -> Tuple[int, int, int]:
        return model.in_chans, model.img_size, model.img_size

    def data_config(self, model: PSViT) -> Dict[str, Any]:
        return {**declared_data_config(model), "input_size": self.input_size(model)}

    def with_class_token(self, model: PSViT, tokens: torch.Tensor) -> torch.Tensor:
        """Sampled tokens [B, N, D] -> the blocks' input [B, 1 + N, D]."""
        return torch.cat((model.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)

    def embed(self, model: PSViT, images: torch.Tensor) -> torch.Tensor:
        return self.with_class_token(model, model.sample_tokens(images)[0])


PSVIT = PSViTFamily()
