"""The adapter for torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``,
``vit_h_14``, and the convolutional-stem configs): pre-norm ``EncoderBlock``s on ``nn.MultiheadAttention``.

The patched forward runs ``_process_input``, the class token, the position embedding and its dropout, the blocks
through the shared step, the encoder's final norm and the heads on the class token.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import ViTShape, linear_flops, patch_grid, stem_flops
from ..method import Method
from ..packing import TokenBatch
from ..step import BlockParts
from .family import Family, PatchedModel, check_block_types, check_image_size, masked_features, run_patched
from .open_clip import in_projection

IMAGENET_CONFIG = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
                       crop_pct=224 / 256, crop_mode="center")


class ATSTorchvisionViT(PatchedModel):
    """Mixed in before torchvision's VisionTransformer; ``TORCHVISION`` is the adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> class logits [B, classes]."""
        return self.ats_logits(run_patched(self, TORCHVISION.embed(self, x), 0, tuple(x.shape[1:])))

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return self.heads(masked_features(batch, self.encoder.ln(batch.rows))[:, 0])


class TorchvisionViT(Family):
    name = "torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14)"
    mixin = ATSTorchvisionViT
    models = ("torchvision.models.vision_transformer.VisionTransformer",)

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        from torchvision.models.vision_transformer import EncoderBlock

        check_block_types(self.blocks(model), {EncoderBlock: ()}, "torchvision's EncoderBlock")
        super().check(model, config, static)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.encoder.layers

    def block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        return [self.parts_of(block) for block in self.blocks(model)]

    def parts_of(self, block: nn.Module) -> BlockParts:
        attn = block.self_attention
        heads = attn.num_heads
        return BlockParts(norm1=block.ln_1, qkv=partial(in_projection, attn), num_heads=heads,
                          head_dim=attn.embed_dim // heads, scale=(attn.embed_dim // heads) ** -0.5,
                          proj=attn.out_proj, proj_drop=block.dropout, norm2=block.ln_2, mlp=block.mlp, dense=block,
                          training=block.training, attn_drop=attn.dropout)

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        size = (model.image_size, model.image_size)
        grid = patch_grid(size, (model.patch_size, model.patch_size), input_size)
        attn = self.blocks(model)[0].self_attention
        return ViTShape(embed_dim=model.hidden_dim, attn_dim=attn.embed_dim, head_dim=attn.embed_dim // attn.num_heads,
                        mlp_flops=linear_flops(self.blocks(model)[0].mlp), depth=len(self.blocks(model)),
                        num_patches=grid[0] * grid[1], num_prefix_tokens=1,
                        patch_embed_flops=stem_flops(model.conv_proj, size)[0], head_flops=linear_flops(model.heads),
                        grid_size=grid)

    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        return 3, model.image_size, model.image_size

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] of the model's size -> tokens [B, 1 + P, C], the position embedding added."""
        check_image_size(images, self.input_size(model), "preprocess them with the weights' transforms (e.g. "
                         "ViT_B_16_Weights.DEFAULT.transforms())")
        x = model._process_input(images)
        x = torch.cat((model.class_token.expand(x.shape[0], -1, -1), x), dim=1)
        return model.encoder.dropout(x + model.encoder.pos_embedding)

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        """ImageNet's preprocessing at the model's size (torchvision's weights' transforms), no class names."""
        return {**IMAGENET_CONFIG, "input_size": self.input_size(model), "class_names": None}


TORCHVISION = TorchvisionViT()
