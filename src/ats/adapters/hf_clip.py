"""The adapter for Hugging Face transformers' CLIP and SigLIP vision towers.

CLIP (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPForImageClassification``) puts a
layer norm before its blocks and returns their output unnormed; its pooled output is the class token
through the post-layernorm (and the projection). SigLIP (``SiglipVisionModel``,
``SiglipForImageClassification``) has no class token, so its ATS blocks score tokens by ``self_attention``
(``score="auto"``); its attention-pool head (``SiglipMultiheadAttentionPoolingHead``) attends over each
image's valid tokens only, padding masked, adding ``log(size)`` to each token's logit where tokens were
fused, as timm's attention pool does (``ats.adapters.timm``). ``SiglipForImageClassification`` classifies the
mean of the valid tokens by size instead; its tower's attention pool, whose output it discards, is not run.
Both blocks are pre-norm (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``). Before transformers
5.x, ``CLIPVisionModel`` and ``SiglipVisionModel`` keep the tower in ``vision_model``.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import attention_pool_token_flops, linear_flops
from ..step import BlockParts
from .family import valid_mean
from .hf import (
    HuggingFaceFamily,
    Layout,
    PatchEmbedding,
    classifier_output,
    dense_forward,
    first_output,
    layer_parts,
    pair,
)


def attention_pool(head: nn.Module, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention-pool head on features [B, m, C] whose tokens weigh ``weights`` [B, m] (each token's
    size, 0 on padding) -> [B, C]: its probe attends over the valid tokens, proportionally to their size."""
    probe = head.probe.expand(features.shape[0], -1, -1)
    pooled = head.attention(probe, features, features, key_padding_mask=weights.log(), need_weights=False)[0]
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def _clip_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                 labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=base.post_layernorm(features[:, 0]))


def _clip_projection_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                            prefix: int, labels: Optional[torch.Tensor]):
    from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

    embeds = model.visual_projection(base.post_layernorm(features[:, 0]))
    return CLIPVisionModelOutput(image_embeds=embeds, last_hidden_state=features)


def _clip_classifier_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                            prefix: int, labels: Optional[torch.Tensor]):
    """CLIP's classifier: the mean of the patch tokens (valid ones, by size)."""
    return classifier_output(model, model.classifier(valid_mean(features, weights, prefix)), labels)


def siglip_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                  labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled = attention_pool(base.head, features, weights) if base.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


def siglip_classifier_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                             prefix: int, labels: Optional[torch.Tensor]):
    """SigLIP's classifier: the mean of all tokens (valid ones, by size)."""
    return classifier_output(model, model.classifier(valid_mean(features, weights)), labels)


LAYOUTS = {
    "CLIPVisionModel": Layout(None, _clip_output),
    "CLIPVisionModelWithProjection": Layout("vision_model", _clip_projection_output),
    "CLIPForImageClassification": Layout("vision_model", _clip_classifier_output),
    "SiglipVisionModel": Layout(None, siglip_output),
    "SiglipForImageClassification": Layout("vision_model", siglip_classifier_output),
}


class VisionTowers(HuggingFaceFamily):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    layouts = LAYOUTS

    def base(self, model: nn.Module) -> nn.Module:
        """The tower: the model, its ``vision_model`` (CLIPVisionModel and SiglipVisionModel before transformers
        5.x) or the ``vision_model`` of that."""
        base = super().base(model)
        return getattr(base, "vision_model", base)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.base(model).encoder.layers

    def parts_of(self, layer: nn.Module) -> BlockParts:
        """Its parts, its own forward given no masks (CLIP's layer takes a causal mask before transformers 5.x)."""
        masks = dict.fromkeys(name for name in ("attention_mask", "causal_attention_mask")
                              if name in inspect.signature(type(layer).forward).parameters)
        return layer_parts(layer, dense=partial(first_output, dense_forward(layer), **masks))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """CLIP's class token; SigLIP has none."""
        return int(hasattr(self.base(model).embeddings, "class_embedding"))

    def patches(self, model: nn.Module) -> PatchEmbedding:
        embeddings = self.base(model).embeddings
        return PatchEmbedding(embeddings.patch_embedding, pair(embeddings.image_size), pair(embeddings.patch_size))

    def head_flops(self, model: nn.Module) -> Tuple[int, int]:
        """CLIP's projection or classifier, SigLIP's classifier; SigLIP's attention pool: the probe's query, the
        output projection and the MLP per image, each token's key, value and attention
        (``flops.attention_pool_token_flops``)."""
        head = getattr(self.base(model), "head", None)
        if head is None or self.layout(model).output is not siglip_output:
            return super().head_flops(model)
        width = head.attention.embed_dim
        return width * width + linear_flops(head), attention_pool_token_flops(2 * width * width, 1, width)

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, C'] (CLIP: after its pre-layernorm); H, W the model's own size,
        or with ``interpolate_pos_encoding`` any multiple of the patch size."""
        images = self.check_images(model, images, interpolate_pos_encoding)
        base = self.base(model)
        tokens = base.embeddings(images, interpolate_pos_encoding=interpolate_pos_encoding)
        return base.pre_layrnorm(tokens) if hasattr(base, "pre_layrnorm") else tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        """CLIP: none (its post-layernorm is for the pooled class token only); SigLIP: its post-layernorm."""
        base = self.base(model)
        return nn.Identity() if hasattr(base, "pre_layrnorm") else base.post_layernorm


TOWERS = VisionTowers()
