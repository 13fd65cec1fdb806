"""The adapter for Hugging Face CvT (``CvtModel``, ``CvtForImageClassification``): ATS in the last stage.

ATS block indices count the blocks of CvT's last stage, the one with the class token; the stages
before it and the last stage's convolutional embedding make the tokens that enter block 0. A
convolutional q/k/v projection needs the full token grid, and its strided keys and values pool
several tokens into one, so ATS can neither score tokens through it nor run it on the tokens it
kept. From the first patched block on, every block of the last stage therefore runs its linear
projections only, as the paper does ("no convolutional projection layers in stage 3"): ``ats.patch``
warns, naming them, and ``ats.last_stats(model).linear_blocks`` lists them. The model is then a
different function until it is fine-tuned (``ats train``); ``ats.KeepAllConfig`` is that function
without dropping any token. Blocks before the first patched one keep their convolutions.

The patched forward takes the original's arguments and returns its output class. A ``CvtModel``'s
``last_hidden_state`` is then the patch tokens [B, m, C] padded to the longest image (zeros on
padding), not a [B, C, H, W] grid; ``cls_token_value`` is the class token [B, 1, C].
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import BlockCost, ViTShape, conv_flops, conv_output_grid, conv_projection_block_flops, linear_flops
from ..method import Method
from ..packing import TokenBatch
from ..stats import ForwardRecord
from ..step import BlockParts
from .family import Family, PatchedModel, as_logits, masked_features, run_patched
from .hf import as_returned, class_names, fused_qkv, processor_config, processor_data_config

CLASSES = ("CvtModel", "CvtForImageClassification")


def _mlp(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return layer.output.dense(layer.intermediate(y))


def _mlp_flops(layer: nn.Module) -> int:
    return linear_flops(layer.intermediate) + linear_flops(layer.output.dense)


def _layer_flops(layer: nn.Module, grid: Tuple[int, int], prefix: int) -> int:
    """FLOPs of one CvT layer with its convolutional projections on a full grid of (rows, columns)."""
    attention = layer.attention.attention
    query = attention.convolution_projection_query.convolution_projection.convolution
    key = attention.convolution_projection_key.convolution_projection.convolution
    return conv_projection_block_flops(attention.embed_dim, _mlp_flops(layer), prefix, conv_output_grid(query, grid),
                                       conv_output_grid(key, grid), key.kernel_size[0])


class ATSCvtModel(PatchedModel):
    """Mixed in before a transformers CvT class by ``HuggingFaceCvT.patch``; ``CVT`` is the adapter."""

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        """The original forward's arguments and output class (see the module docstring for what differs)."""
        if output_hidden_states or (output_hidden_states is None and self.config.output_hidden_states):
            raise ValueError("output_hidden_states: a patched model cannot return hidden states: after an ATS block "
                             "each image has its own token count. Read ats.last_stats(model) for the tokens each "
                             "block kept, or ats.unpatch(model) for the full hidden states")
        if kwargs:
            raise TypeError(f"a patched model does not take {', '.join(sorted(kwargs))}; it takes pixel_values, "
                            "labels and return_dict (ats.unpatch(model) for the rest)")
        if pixel_values is None:
            raise ValueError("pass pixel_values, images [B, C, H, W]")
        batch = run_patched(self, CVT.embed(self, pixel_values), 0, tuple(pixel_values.shape[1:]))
        return as_returned(self, CVT.output(self, batch, labels), return_dict)

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return as_logits(CVT.output(self, batch, None))


class HuggingFaceCvT(Family):
    name = "Hugging Face " + ", ".join(CLASSES)
    mixin = ATSCvtModel
    models = CLASSES

    def base(self, model: nn.Module) -> nn.Module:
        return getattr(model, "cvt", model)

    def stages(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.base(model).encoder.stages

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        """Also warns that the blocks from ``config``'s first run their linear projections only."""
        if not model.config.cls_token[-1]:
            raise TypeError("this CvT has no class token in its last stage (config.cls_token[-1] is False); ATS "
                            "ranks tokens by the class token's attention, so it supports CvTs like CvT-13 and "
                            "CvT-21, whose last stage has one")
        if model.config.qkv_projection_method[-1] != "dw_bn":
            raise TypeError(f"qkv_projection_method {model.config.qkv_projection_method[-1]!r} in the last stage is "
                            "not supported; ATS supports CvT's depthwise-convolution projections ('dw_bn')")
        super().check(model, config, static)
        linear = self.linear_blocks(model, config)
        if config is not None and len(linear):
            warnings.warn(f"CvT: blocks {linear.start}..{linear.stop - 1} of the last stage now run their linear q/k/v "
                          "projections without the convolutions, which need every token; the model computes a "
                          "different function until it is fine-tuned (ats train), as in the paper",
                          stacklevel=4)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.stages(model)[-1].layers

    def linear_blocks(self, model: nn.Module, config: Optional[Method]) -> range:
        """The blocks that run without their convolutional projections under ``config``."""
        depth = len(self.blocks(model))
        return range(depth if config is None else config.first_block, depth)

    def run_blocks(self, model: nn.Module, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        """As ``Family.run_blocks``; the record names the blocks that ran their linear projections only."""
        batch, record = super().run_blocks(model, x, shape, start, input_size, stop)
        record.linear_blocks = tuple(self.linear_blocks(model, model._ats.config))
        return batch, record

    def grid(self, model: nn.Module, input_size: Sequence[int]) -> Tuple[int, int]:
        """The token grid (rows, columns) of the last stage for images of ``input_size`` (C, H, W)."""
        grid = tuple(input_size[1:])
        for stage in self.stages(model):
            grid = conv_output_grid(stage.embedding.convolution_embeddings.projection, grid)
        return grid

    def block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """Each block's parts (``parts_of``), the blocks that keep their convolutions with their own forward on the
        model's grid as ``dense``."""
        height, width = self.grid(model, input_size)
        linear = self.linear_blocks(model, model._ats.config if hasattr(model, "_ats") else None)
        return [replace(self.parts_of(layer), dense=None if index in linear else
                        partial(layer, height=height, width=width))
                for index, layer in enumerate(self.blocks(model))]

    def parts_of(self, layer: nn.Module) -> BlockParts:
        """The parts of a block run with its linear projections only."""
        attention = layer.attention.attention
        return BlockParts(norm1=layer.layernorm_before, norm2=layer.layernorm_after,
                          qkv=partial(fused_qkv, attention.projection_query, attention.projection_key,
                                      attention.projection_value),
                          num_heads=attention.num_heads, head_dim=attention.embed_dim // attention.num_heads,
                          scale=attention.scale, proj=layer.attention.output.dense, mlp=partial(_mlp, layer),
                          dense=None, training=layer.training, attn_drop=attention.dropout.p,
                          proj_drop=layer.attention.output.dropout, mlp_drop=layer.output.dropout,
                          drop_path1=layer.drop_path, drop_path2=layer.drop_path)

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        """The last stage's sizes; ``patch_embed_flops`` counts every stage before it and its embedding."""
        input_size = tuple(input_size) if input_size is not None else self.input_size(model)
        grid, stem = tuple(input_size[1:]), 0
        for stage in self.stages(model):
            projection = stage.embedding.convolution_embeddings.projection
            grid = conv_output_grid(projection, grid)
            stem += conv_flops(projection, grid)
            if stage is not self.stages(model)[-1]:
                stem += sum(_layer_flops(layer, grid, 0) for layer in stage.layers)
        layer = self.blocks(model)[0]
        classifier = getattr(model, "classifier", None)
        width = layer.attention.attention.embed_dim
        return ViTShape(embed_dim=width, attn_dim=width, head_dim=width // layer.attention.attention.num_heads,
                        mlp_flops=_mlp_flops(layer), depth=len(self.blocks(model)), num_patches=grid[0] * grid[1],
                        num_prefix_tokens=1, patch_embed_flops=stem,
                        head_flops=0 if classifier is None else linear_flops(classifier), grid_size=grid)

    def block_costs(self, model: nn.Module, shape: ViTShape, config: Optional[Method]) -> Dict[int, BlockCost]:
        """Blocks with their convolutions cost ``conv_projection_block_flops`` on the full grid."""
        costs = super().block_costs(model, shape, config)
        linear = self.linear_blocks(model, config)
        for index, layer in enumerate(self.blocks(model)):
            if index not in linear:
                flops = _layer_flops(layer, shape.grid_size, shape.num_prefix_tokens)
                costs[index] = partial(_constant, flops)
        return costs

    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        """(C, H, W): the reference model's, else the image processor's crop (CvT's configs name no size)."""
        pretrained = getattr(model, "pretrained_cfg", None)
        if pretrained:
            return tuple(pretrained["input_size"])
        size = processor_config(model).get("size") or {}
        side = size.get("shortest_edge") or size.get("height") or 224
        return model.config.num_channels, side, side

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        pretrained = getattr(model, "pretrained_cfg", None)
        if pretrained:
            config = {key: pretrained[key] for key in ("input_size", "mean", "std", "interpolation", "crop_pct",
                                                       "crop_mode")}
        else:
            config = processor_data_config(model, self.input_size(model))
        return {**config, "class_names": class_names(model)}

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's tokens [B, 1 + h w, C'], the class token first."""
        channels = model.config.num_channels
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"expected pixel_values of shape [B, {channels}, H, W] for this model, got "
                             f"{list(images.shape)}; preprocess them with the model's image processor")
        stages = self.stages(model)
        x = images.to(stages[0].embedding.convolution_embeddings.projection.weight.dtype)
        for stage in stages[:-1]:
            x, _ = stage(x)
        last = stages[-1]
        x = last.embedding(x).flatten(2).transpose(1, 2)
        return torch.cat([last.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def output(self, model: nn.Module, batch: TokenBatch, labels: Optional[torch.Tensor]):
        """The model's own output object from the packed tokens after the last block."""
        from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
        from transformers.models.cvt.modeling_cvt import BaseModelOutputWithCLSToken

        features = masked_features(batch, batch.rows)
        if not hasattr(model, "classifier"):
            return BaseModelOutputWithCLSToken(last_hidden_state=features[:, 1:], cls_token_value=features[:, :1])
        logits = model.classifier(model.layernorm(features[:, 0]))
        loss = None if labels is None else model.loss_function(labels, logits, model.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


def _constant(flops: int, n_in, n_out) -> int:
    return flops


CVT = HuggingFaceCvT()
