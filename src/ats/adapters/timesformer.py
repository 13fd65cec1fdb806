"""The adapter for Hugging Face TimeSformer (``TimesformerModel``, ``TimesformerForVideoClassification``).

Clips are pixel_values [B, T, C, H, W] at the model's own frames and size. By attention type:

- ``divided_space_time``: ATS keeps tubes, one set of spatial positions per clip shared by all frames
  (``ats.tubes``); token counts and ``ats.last_stats(model)`` are per clip and in positions, ``kept``
  indexes the frame's patch grid; GFLOPs are per clip.
- ``joint_space_time``: every block attends over all space-time tokens, so ATS samples among them as for
  an image; token j >= 1 is patch ``(j - 1) // T`` of frame ``(j - 1) % T`` (TimeSformer's order).
- ``space_only``: frames are independent and transformers classifies each one (logits [B * T, classes]);
  ATS samples per frame, and statistics are per frame (a clip costs the sum of its frames).

The patched forward returns the model's own output class; ``last_hidden_state`` is padded (zeros on
padding) in TimeSformer's token order. Hidden states and attention maps are refused, as for images.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..flops import BlockCost, ViTShape, conv_flops, divided_block_flops, linear_flops, patch_grid
from ..method import Method
from ..packing import TokenBatch
from ..stats import ForwardRecord
from ..step import BlockParts
from ..tubes import TubeBlockParts, check_tube_config, from_tubes, run_tube_blocks, to_tubes, tube_block_options
from .family import Family, PatchedModel, as_logits, cached_block_parts, masked_features, run_patched
from .hf import (
    HF,
    as_returned,
    class_names,
    classifier_output,
    dense_forward,
    processor_data_config,
    refuse_unsupported,
)

BASES = {"TimesformerModel": None, "TimesformerForVideoClassification": "timesformer"}
DIVIDED = "divided_space_time"


def _mlp(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return layer.output(layer.intermediate(y))


def _first_output(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    return forward(x)[0]


def clip_data_config(model: nn.Module, input_size: Sequence[int]) -> dict:
    """Per-frame preprocessing of a video model taking clips of ``input_size`` (frames, channels, height,
    width): the config the model declares (as the reference video model does), else its image processor's,
    with ``num_frames``."""
    frames, *image_size = input_size
    declared = getattr(model, "pretrained_cfg", None)
    config = dict(declared) if declared else processor_data_config(model, tuple(image_size))
    return {**config, "input_size": tuple(image_size), "num_frames": frames, "class_names": class_names(model)}


class ATSTimesformer(PatchedModel):
    """Mixed in before a TimeSformer class by ``TimesformerFamily.patch``; ``TIMESFORMER`` is the adapter."""

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs):
        """The original forward's arguments and output class (see the module docstring for what differs)."""
        refuse_unsupported(self, None, None, output_attentions, output_hidden_states, kwargs)
        if pixel_values is None:
            raise ValueError("pass pixel_values, clips [B, T, C, H, W]")
        batch = run_patched(self, TIMESFORMER.embed(self, pixel_values), 0, tuple(pixel_values.shape[1:]))
        return as_returned(self, TIMESFORMER.output(self, batch, labels), return_dict)

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return as_logits(TIMESFORMER.output(self, batch, None))


class TimesformerFamily(Family):
    name = "Hugging Face " + ", ".join(BASES)
    mixin = ATSTimesformer
    models = tuple(BASES)

    def base(self, model: nn.Module) -> nn.Module:
        """The TimesformerModel inside ``model`` (or ``model`` itself)."""
        original = model._ats.original_class if hasattr(model, "_ats") else type(model)
        attribute = BASES[original.__name__]
        return model if attribute is None else getattr(model, attribute)

    def attention_type(self, model: nn.Module) -> str:
        return model.config.attention_type

    def frames(self, model: nn.Module) -> int:
        return model.config.num_frames

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.base(model).encoder.layer

    def block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[Union[BlockParts, TubeBlockParts]]:
        """Divided space-time blocks as ``TubeBlockParts``; joint or space-only ones, standard pre-norm blocks."""
        if self.attention_type(model) == DIVIDED:
            return [self.tube_parts(model, layer) for layer in self.blocks(model)]
        return [replace(self.parts_of(layer), checkpoint=HF.checkpoint_function(model, layer))
                for layer in self.blocks(model)]

    def parts_of(self, layer: nn.Module) -> BlockParts:
        """A joint or space-only block: a standard pre-norm block."""
        attention = layer.attention.attention
        return BlockParts(norm1=layer.layernorm_before, qkv=attention.qkv, num_heads=attention.num_heads,
                          head_dim=attention.qkv.in_features // attention.num_heads, scale=attention.scale,
                          proj=layer.attention.output, norm2=layer.layernorm_after, mlp=partial(_mlp, layer),
                          dense=partial(_first_output, dense_forward(layer)), training=layer.training,
                          attn_drop=attention.attn_drop.p, drop_path1=layer.drop_path, drop_path2=layer.drop_path)

    def tube_parts(self, model: nn.Module, layer: nn.Module) -> TubeBlockParts:
        """A divided space-time block."""
        attention, temporal = layer.attention.attention, layer.temporal_attention
        return TubeBlockParts(
            temporal_norm=layer.temporal_layernorm, temporal_qkv=temporal.attention.qkv, temporal_proj=temporal.output,
            temporal_dense=layer.temporal_dense, norm1=layer.layernorm_before, qkv=attention.qkv,
            proj=layer.attention.output, norm2=layer.layernorm_after, mlp=partial(_mlp, layer),
            num_heads=attention.num_heads, head_dim=attention.qkv.in_features // attention.num_heads,
            scale=attention.scale, training=layer.training, attn_drop=attention.attn_drop.p,
            drop_path=layer.drop_path, checkpoint=HF.checkpoint_function(model, layer))

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        super().check(model, config, static)
        if config is not None and self.attention_type(model) == DIVIDED:
            check_tube_config(config, len(self.blocks(model)), "divided space-time attention",
                              "or a TimeSformer with attention_type='joint_space_time'", static)

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        """Sizes per clip (divided, joint) or per frame (space-only); ``num_patches`` counts positions
        (divided, space-only) or space-time tokens (joint)."""
        if input_size is not None and tuple(input_size) != self.input_size(model):
            raise ValueError(f"this TimeSformer takes clips of {self.input_size(model)} (frames, channels, height, "
                             f"width), got {tuple(input_size)}")
        frames, channels, height, width = self.input_size(model)
        patches = self.base(model).embeddings.patch_embeddings
        grid = patch_grid(patches.image_size, patches.patch_size)
        layer = self.blocks(model)[0]
        attention_type = self.attention_type(model)
        per_clip = frames if attention_type != "space_only" else 1
        positions = grid[0] * grid[1] * (frames if attention_type == "joint_space_time" else 1)
        head = getattr(model, "classifier", None)
        return ViTShape(embed_dim=model.config.hidden_size, attn_dim=layer.attention.attention.qkv.out_features // 3,
                        head_dim=model.config.hidden_size // model.config.num_attention_heads,
                        mlp_flops=linear_flops(layer.intermediate) + linear_flops(layer.output),
                        depth=len(self.blocks(model)), num_patches=positions, num_prefix_tokens=1,
                        patch_embed_flops=per_clip * conv_flops(patches.projection, grid),
                        head_flops=0 if head is None else linear_flops(head), grid_size=grid)

    def block_costs(self, model: nn.Module, shape: ViTShape, config: Optional[Method]) -> Dict[int, BlockCost]:
        if self.attention_type(model) != DIVIDED:
            return super().block_costs(model, shape, config)
        frames = self.frames(model)
        return {index: partial(divided_block_flops, shape, frames, **tube_block_options(config, index))
                for index in range(shape.depth)}

    def input_size(self, model: nn.Module) -> Tuple[int, int, int, int]:
        """(frames, channels, height, width) the model takes."""
        config = model.config
        return config.num_frames, config.num_channels, config.image_size, config.image_size

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        return clip_data_config(model, self.input_size(model))

    def embed(self, model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, C, H, W] -> the tokens entering block 0: tubes [B, 1 + P, T * C'] under divided attention
        (``ats.tubes``), else TimeSformer's [B, 1 + P * T, C'] (joint) or [B * T, 1 + P, C'] (space-only)."""
        expected = self.input_size(model)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(f"expected pixel_values of shape [B, {', '.join(map(str, expected))}] (clips of "
                             f"{expected[0]} frames) for this TimeSformer, got {list(clips.shape)}; sample "
                             f"{expected[0]} frames per clip and preprocess them with the model's image processor")
        embeddings = self.base(model).embeddings
        tokens = embeddings(clips.to(embeddings.patch_embeddings.projection.weight.dtype))
        return to_tubes(tokens, self.frames(model)) if self.attention_type(model) == DIVIDED else tokens

    def run_blocks(self, model: nn.Module, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        """As ``Family.run_blocks``; under divided attention on tubes (``ats.tubes``): rows are tubes [R, T * C]."""
        if self.attention_type(model) != DIVIDED:
            return super().run_blocks(model, x, shape, start, input_size, stop)
        parts = cached_block_parts(self, model, input_size)[:stop]
        return run_tube_blocks(parts, x, self.frames(model), model._ats.config, start)

    def features(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        """The final layer norm's output, padded, in TimeSformer's token order."""
        norm = self.base(model).layernorm
        if self.attention_type(model) != DIVIDED:
            return masked_features(batch, norm(batch.rows))
        frames = self.frames(model)
        rows = norm(batch.rows.unflatten(-1, (frames, -1))).flatten(1)
        return from_tubes(masked_features(batch, rows), frames)

    def output(self, model: nn.Module, batch: TokenBatch, labels: Optional[torch.Tensor]):
        """The model's own output object from the packed tokens after the last block."""
        features = self.features(model, batch)
        if self.base(model) is model:
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=features)
        return classifier_output(model, model.classifier(features[:, 0]), labels)


TIMESFORMER = TimesformerFamily()
