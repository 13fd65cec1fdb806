"""The adapter for Hugging Face transformers' BEiT and Data2Vec-Vision (``BeitModel``,
``BeitForImageClassification``, ``Data2VecVisionModel``, ``Data2VecVisionForImageClassification``):
relative position biases gathered at the kept tokens' positions.

Each block adds to every attention logit a learnt bias indexed by the pair of positions (query, key), the
class token's row and column included, from its own table and the model's shared one. The biases are the
model's own modules' (made once per forward for the input's patch grid, so any multiple of the patch size
works); after an ATS block each block's bias is gathered at the rows and columns of the positions the kept
tokens came from (``step.pair_bias``, as for timm's Beit), in the class token's attention that scores the
tokens too. The pooler's mean (``use_mean_pooling``) reads each image's valid patch tokens, by size.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..step import BlockParts
from .family import valid_mean
from .hf import (
    HuggingFaceFamily,
    Layout,
    PatchEmbedding,
    classifier_output,
    dense_forward,
    first_output,
    pair,
)


def pooled(base: nn.Module, features: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
    """The pooler's output: the mean of the valid patch tokens by size through its layer norm
    (``use_mean_pooling``), else the class token; None without a pooler."""
    pooler = base.pooler
    if pooler is None:
        return None
    return features[:, 0] if pooler.layernorm is None else pooler.layernorm(valid_mean(features, weights, 1))


def _beit_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                 labels: Optional[torch.Tensor]):
    from transformers.models.beit.modeling_beit import BeitModelOutputWithPooling

    return BeitModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled(base, features, weights))


def _data2vec_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                     labels: Optional[torch.Tensor]):
    from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionModelOutputWithPooling

    return Data2VecVisionModelOutputWithPooling(last_hidden_state=features,
                                                pooler_output=pooled(base, features, weights))


def _classifier_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                       prefix: int, labels: Optional[torch.Tensor]):
    return classifier_output(model, model.classifier(pooled(base, features, weights)), labels)


LAYOUTS = {
    "BeitModel": Layout(None, _beit_output, interpolating=True),
    "BeitForImageClassification": Layout("beit", _classifier_output, interpolating=True),
    "Data2VecVisionModel": Layout(None, _data2vec_output, interpolating=True),
    "Data2VecVisionForImageClassification": Layout("data2vec_vision", _classifier_output, interpolating=True),
}


def _bias(module: Optional[nn.Module], window: Sequence[int]) -> Optional[torch.Tensor]:
    """A relative position bias module's bias [1, h, N, N] for a patch grid ``window`` (rows, columns), or None
    for no module."""
    return None if module is None else module(tuple(window), dim_size=1 + window[0] * window[1])


def _sum(first: Optional[torch.Tensor], second: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return first if second is None else second if first is None else first + second


class HuggingFaceBeit(HuggingFaceFamily):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    layouts = LAYOUTS

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        base = self.base(model)
        return base.layers if hasattr(base, "layers") else base.encoder.layer  # BEiT; Data2Vec-Vision

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def patches(self, model: nn.Module) -> PatchEmbedding:
        patches = self.base(model).embeddings.patch_embeddings
        return PatchEmbedding(patches.projection, pair(patches.image_size), pair(patches.patch_size))

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] (H, W any multiple of the patch size) -> tokens [B, 1 + P, C']."""
        return first_output(self.base(model).embeddings, self.check_images(model, images, interpolate_pos_encoding))

    def own_bias_module(self, layer: nn.Module) -> Optional[nn.Module]:
        """A layer's own relative position bias module (BEiT from transformers 5.18 on: on the layer; Data2Vec-Vision,
        and BEiT before: on its attention), or None."""
        if hasattr(layer, "relative_position_bias"):
            return layer.relative_position_bias
        return getattr(layer.attention.attention, "relative_position_bias", None)

    def shared_bias_module(self, model: nn.Module) -> Optional[nn.Module]:
        base = self.base(model)
        if hasattr(base, "shared_position_bias"):
            return base.shared_position_bias
        return getattr(base.encoder, "relative_position_bias", None)

    def layer_forward(self, model: nn.Module, layer: nn.Module, shared: Optional[torch.Tensor],
                      resolution: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A layer's own forward on [B, N, C], given the shared bias [1, h, N, N] (or None) and the input's
        resolution (H, W), from which it makes its own bias."""
        keyword = "attention_mask" if hasattr(self.base(model), "shared_position_bias") else "relative_position_bias"
        return partial(first_output, dense_forward(layer), resolution=tuple(resolution), **{keyword: shared})

    def forward_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """Every block's parts with this forward's position bias (its own plus the shared one) and its own
        forward."""
        window = self.grid(model, input_size)
        shared = _bias(self.shared_bias_module(model), window)
        all_parts = []
        for parts, layer in zip(super().forward_parts(model, input_size), self.blocks(model)):
            bias = _sum(_bias(self.own_bias_module(layer), window), shared)
            parts = replace(parts, dense=self.layer_forward(model, layer, shared, input_size[1:]))
            all_parts.append(parts if bias is None else replace(parts, position_bias=bias[0]))
        return all_parts


HF_BEIT = HuggingFaceBeit()
