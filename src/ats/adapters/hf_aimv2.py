"""The adapter for Hugging Face transformers' AIMv2 vision model (``Aimv2VisionModel``).

Pre-norm blocks with RMSNorm and a SwiGLU MLP (``rms_norm1``, ``attention``, ``rms_norm2``, ``ffn``), no class token,
so its ATS blocks score tokens by ``self_attention`` (``score="auto"``), as for SigLIP. Its head pools with one
learnt query over the tokens (``Aimv2AttentionPoolingHead``); patched, that query attends over each image's valid
tokens only, adding ``log(size)`` to each token's logit where tokens were fused. The ``native`` checkpoints
(``is_native``) add a 2-D sine-cosine position embedding made for the input's grid, so they take any multiple of the
patch size; the others a learnt one at their own size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from ..flops import attention_pool_token_flops, linear_flops
from .hf import HuggingFaceFamily, Layout, PatchEmbedding, pair


def attention_pool(head: nn.Module, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AIMv2's attention-pool head on features [B, m, C] whose tokens weigh ``weights`` [B, m] (each token's size,
    0 on padding) -> [B, C]: its learnt query attends over the valid tokens, proportionally to their size."""
    batch, _, channels = features.shape
    heads = head.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, n, C] -> [B, heads, n, C / heads]
        return x.unflatten(-1, (heads, channels // heads)).transpose(1, 2)

    query = split(head.cls_token.expand(batch, -1, -1))
    bias = weights.log()[:, None, None, :].to(features.dtype)
    pooled = scaled_dot_product_attention(query, split(head.k_proj(features)), split(head.v_proj(features)), bias)
    return head.output_proj(pooled.transpose(1, 2).flatten(2)[:, 0])


def _output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
            labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled = attention_pool(base.head, features, weights) if base.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


LAYOUTS = {"Aimv2VisionModel": Layout(None, _output)}


class HuggingFaceAIMv2(HuggingFaceFamily):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    layouts = LAYOUTS

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.encoder.layers

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def patches(self, model: nn.Module) -> PatchEmbedding:
        return PatchEmbedding(model.embeddings.patch_embed, pair(model.config.image_size),
                              pair(model.config.patch_size))

    def head_flops(self, model: nn.Module) -> Tuple[int, int]:
        """The pool's output projection per image; its keys, values and attention per token
        (``flops.attention_pool_token_flops``)."""
        if not model.use_head:
            return 0, 0
        head = model.head
        kv_flops = linear_flops(head.k_proj) + linear_flops(head.v_proj)
        return linear_flops(head.output_proj), attention_pool_token_flops(kv_flops, 1, head.hidden_size)

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, C']: H, W the model's own size, or any multiple of the patch size for
        a native model (``is_native``: its position embedding is made for the grid)."""
        if interpolate_pos_encoding and not model.config.is_native:
            raise ValueError("this Aimv2VisionModel has a learnt position embedding for its own image size, which it "
                             "does not resample; resize the images to it, or load a native checkpoint")
        return model.embeddings(self.check_images(model, images, model.config.is_native))

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.rms_norm


AIMV2 = HuggingFaceAIMv2()
