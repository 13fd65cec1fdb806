"""The adapter for Hugging Face transformers' DINOv3 ViT (``DINOv3ViTModel``): rotary embeddings that follow
the kept tokens.

Every block rotates each patch token's queries and keys by its patch position (rotary position embeddings,
the rotate-half layout); the class and register tokens are not rotated. The table is the model's own
(``rope_embeddings``, made once per forward for the input's patch grid, so any multiple of the patch size
works, and in train mode with transformers' random coordinate augmentation); after an ATS block each block's
rotation is gathered at the position each kept token came from (``step.Rotation``, as for timm's Eva). The
blocks are pre-norm with layer scale, a plain or gated MLP and per-image stochastic depth.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..step import BlockParts, Rotation
from .hf import (
    HuggingFaceFamily,
    Layout,
    PatchEmbedding,
    base_output,
    dense_forward,
    first_output,
    pair,
)

LAYOUTS = {"DINOv3ViTModel": Layout(None, base_output, interpolating=True)}


class HuggingFaceDINOv3(HuggingFaceFamily):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    layouts = LAYOUTS

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        base = self.base(model)
        return base.model.layer if hasattr(base, "model") else base.layer  # transformers 5.x; 4.x

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """The class token and the register tokens."""
        return 1 + self.base(model).config.num_register_tokens

    def patches(self, model: nn.Module) -> PatchEmbedding:
        config = self.base(model).config
        return PatchEmbedding(self.base(model).embeddings.patch_embeddings, pair(config.image_size),
                              pair(config.patch_size))

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] (H, W any multiple of the patch size) -> tokens [B, 1 + R + P, C']."""
        return self.base(model).embeddings(self.check_images(model, images, interpolate_pos_encoding))

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.base(model).norm

    def rope(self, model: nn.Module, input_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary embedding (cos, sin), each [P, d], for images of ``input_size`` (C, H, W)."""
        weight = self.patches(model).projection.weight
        return self.base(model).rope_embeddings(weight.new_empty(()).expand(1, *input_size))

    def forward_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """Every block's parts with this forward's rotation (and its own forward given it)."""
        cos, sin = self.rope(model, input_size)
        rotation = Rotation.from_table(torch.cat((sin, cos), dim=-1), half=True, prefix=self.num_prefix_tokens(model))
        return [replace(parts, rotation=rotation, dense=partial(first_output, dense_forward(layer),
                                                                position_embeddings=(cos, sin)))
                for parts, layer in zip(super().forward_parts(model, input_size), self.blocks(model))]


DINOV3 = HuggingFaceDINOv3()
