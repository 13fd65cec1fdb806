"""The Hugging Face transformers adapters: what they share, and the adapter for the ViT-shaped classes.

Shared by every transformers family (``HuggingFaceFamily``): the patched ``forward``, which takes the
original's arguments and returns its output class (embeddings, ``ats.step.run_blocks``, the final norm,
then the model's own head); where an encoder layer keeps its parts in each of the layouts transformers'
vision models use, in 4.x (from ``MIN_TRANSFORMERS`` on) and 5.x releases (``layer_parts``); the checks, the
preprocessing and the class names.
``last_hidden_state`` is padded to the longest image (zeros on padding; ``ats.last_stats(model)`` gives
each image's token count), and a mean over tokens covers valid tokens only, weighted by their size.
Hidden states are refused (their sizes differ per image) unless the config restores the dropped tokens
(``restore``): then ``last_hidden_state``, ``hidden_states`` and DINOv2's backbone feature maps are the full grid
in the original order, and the classifiers still read the kept tokens. Attention maps are refused.

``HF`` is the adapter for ViT, DeiT (with or without its distillation head), DINOv2 and DINOv2 with
registers, I-JEPA (no class token), ViT-MAE (with ``mask_ratio=0``) and ViT-MSN, as base models or image
classifiers. transformers is imported only when a model of it is met.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import ViTShape, conv_flops, linear_flops, patch_grid
from ..method import Method
from ..packing import TokenBatch
from ..stats import ForwardRecord
from ..step import BlockParts
from ..step import identity as no_norm
from .family import (
    Family,
    PatchedModel,
    as_logits,
    cached_block_parts,
    fit_channels,
    masked_features,
    run_parts,
    run_patched,
    tapped_maps,
    token_map,
    valid_mean,
)

#: PIL resampling filters (as image processor configs store them) by timm's interpolation names.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Linear heads after the final norm, on the model or its base model.
HEAD_MODULES = ("classifier", "cls_classifier", "distillation_classifier", "visual_projection", "pooler")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
#: The oldest transformers release the adapters support (CI tests requirements-transformers4.txt's and
#: requirements-ci.txt's). Up to 5.17, ViT, DeiT, DINOv2, BEiT, ... keep q/k/v as ``attention.attention.query``
#: and their MLP as ``intermediate`` and ``output.dense``; from 5.18 on as ``attention.q_proj`` and ``mlp``.
MIN_TRANSFORMERS = "4.46"


def pair(size) -> Tuple[int, int]:
    """A size given as one int or a pair -> (height, width)."""
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def classifier_output(model: nn.Module, logits: torch.Tensor, labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import ImageClassifierOutput

    loss = None if labels is None else model.loss_function(labels, logits, model.config)
    return ImageClassifierOutput(loss=loss, logits=logits)


def base_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                 labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if hasattr(base, "pooler"):  # ViT, DeiT, I-JEPA: their optional pooler
        pooled = None if base.pooler is None else base.pooler(features)
    else:  # DINOv2: the class token
        pooled = features[:, 0]
    return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


def sequence_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                    labels: Optional[torch.Tensor]):
    """The final features alone (ViT-MSN)."""
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=features)


def class_token_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                        prefix: int, labels: Optional[torch.Tensor]):
    return classifier_output(model, model.classifier(features[:, 0]), labels)


def _class_and_mean_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                           prefix: int, labels: Optional[torch.Tensor]):
    """DINOv2's classifier: the class token beside the mean of the patch tokens (valid ones, by size)."""
    mean = valid_mean(features, weights, prefix)
    return classifier_output(model, model.classifier(torch.cat([features[:, 0], mean], dim=1)), labels)


def _mean_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                 labels: Optional[torch.Tensor]):
    """I-JEPA's classifier: the mean of all tokens (valid ones, by size)."""
    return classifier_output(model, model.classifier(valid_mean(features, weights)), labels)


def _backbone_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                     labels: Optional[torch.Tensor]):
    """DINOv2's backbone: the feature map of each of its ``out_features`` stages (the embeddings, then each layer's
    output, restored to the full grid; through the final norm with ``apply_layernorm``, as [B, C, H, W] without the
    prefix tokens with ``reshape_hidden_states``), and every stage's hidden states."""
    from transformers.modeling_outputs import BackboneOutput

    maps = tapped_maps(model, no_norm)
    hidden_states = tuple(maps[index] for index in sorted(maps))
    rows, columns = model._ats.last_stats.grid_size
    feature_maps = []
    for stage, hidden in zip(model.stage_names, hidden_states):
        if stage in model.out_features:
            if model.config.apply_layernorm:
                hidden = model.layernorm(hidden)
            if model.config.reshape_hidden_states:
                hidden = hidden[:, prefix:].unflatten(1, (rows, columns)).permute(0, 3, 1, 2).contiguous()
            feature_maps.append(hidden)
    return BackboneOutput(feature_maps=tuple(feature_maps), hidden_states=hidden_states)


def _mae_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                labels: Optional[torch.Tensor]):
    """ViT-MAE's output with nothing masked: a mask of zeros, the identity as ``ids_restore``."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEModelOutput

    batch, patches = features.shape[0], base.embeddings.patch_embeddings.num_patches
    mask = features.new_zeros(batch, patches)
    ids_restore = torch.arange(patches, device=features.device).expand(batch, patches)
    return ViTMAEModelOutput(last_hidden_state=features, mask=mask, ids_restore=ids_restore)


def _teacher_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                    labels: Optional[torch.Tensor]):
    from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

    if labels is not None:
        raise TypeError("DeiTForImageClassificationWithTeacher takes no labels (transformers computes no loss "
                        "for it); compute the loss from its logits")
    cls_logits = model.cls_classifier(features[:, 0])
    distillation_logits = model.distillation_classifier(features[:, 1])
    return DeiTForImageClassificationWithTeacherOutput(logits=(cls_logits + distillation_logits) / 2,
                                                       cls_logits=cls_logits, distillation_logits=distillation_logits)


@dataclass(frozen=True)
class Layout:
    """Where one transformers class keeps things. base: the attribute holding the base model (None:
    the model is its own base); output: builds the class's output from the final features
    (model, base, features [B, m, C], weights [B, m], prefix, labels); interpolating: its embeddings
    take any multiple of the patch size (DINOv2's resample the position embedding, rotary and relative
    ones need none), else only with ``interpolate_pos_encoding=True``; stages: the output reads every block's
    output (a backbone's feature maps), so the class needs a config that restores the dropped tokens."""

    base: Optional[str]
    output: Callable
    interpolating: bool = False
    stages: bool = False


LAYOUTS = {
    "ViTModel": Layout(None, base_output),
    "ViTForImageClassification": Layout("vit", class_token_output),
    "DeiTModel": Layout(None, base_output),
    "DeiTForImageClassification": Layout("deit", class_token_output),
    "DeiTForImageClassificationWithTeacher": Layout("deit", _teacher_output),
    "Dinov2Model": Layout(None, base_output, interpolating=True),
    "Dinov2Backbone": Layout(None, _backbone_output, interpolating=True, stages=True),
    "Dinov2ForImageClassification": Layout("dinov2", _class_and_mean_output, interpolating=True),
    "Dinov2WithRegistersModel": Layout(None, base_output, interpolating=True),
    "Dinov2WithRegistersForImageClassification": Layout("dinov2_with_registers", _class_and_mean_output,
                                                        interpolating=True),
    "IJepaModel": Layout(None, base_output),
    "IJepaForImageClassification": Layout("ijepa", _mean_output),
    "ViTMAEModel": Layout(None, _mae_output),
    "ViTMSNModel": Layout(None, sequence_output),
    "ViTMSNForImageClassification": Layout("vit", class_token_output),
}


def fused_qkv(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, y: torch.Tensor,
              q_bias: Optional[torch.Tensor] = None, v_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Queries, keys and values of normed rows [T, C] from three separate projections (plus separate query and
    value biases [A], where a layer keeps them apart from its projections) -> [T, 3A]."""
    q, v = q_proj(y), v_proj(y)
    if q_bias is not None:
        q, v = q + q_bias, v + v_bias
    return torch.cat([q, k_proj(y), v], dim=-1)


def _checkpointed(layer: nn.Module) -> bool:
    return getattr(layer, "gradient_checkpointing", False) and layer.training


def dense_forward(layer: nn.Module) -> Callable[..., torch.Tensor]:
    """The layer itself; under gradient checkpointing its forward without transformers' checkpointing
    wrapper, since run_blocks checkpoints every block the same way."""
    if not _checkpointed(layer):
        return layer
    forward = type(layer).forward
    return partial(getattr(forward, "__wrapped__", forward), layer)


def first_output(forward: Callable[..., object], x: torch.Tensor, **kwargs) -> torch.Tensor:
    """The hidden states [B, N, C] a layer returns, alone or first in a tuple."""
    output = forward(x, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class Attention:
    """A transformers self-attention's projections and sizes, whatever its layout names them."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    proj: nn.Module
    proj_drop: nn.Module
    num_heads: int
    head_dim: int
    scale: float
    dropout: float
    q_bias: Optional[torch.Tensor] = None
    v_bias: Optional[torch.Tensor] = None


def attention_of(layer: nn.Module) -> Attention:
    """The self-attention of an encoder layer in each layout transformers' vision models use: ``self_attn``
    with ``out_proj`` (CLIP, SigLIP); ``attention`` with ``q_proj .. o_proj`` (ViT, DeiT, DINOv2, DINOv3,
    I-JEPA, ViT-MAE, ViViT, BEiT from transformers 5.18 on) or ``.. out_proj`` (AIMv2); ``attention.attention``
    with ``query, key, value`` and ``attention.output.dense`` (Data2Vec-Vision, VideoMAE; ViT, DeiT, DINOv2, ...
    before 5.18; VideoMAE before 5.x keeps its query and value biases apart, as ``q_bias`` and ``v_bias``)."""
    if hasattr(layer, "self_attn"):
        attn = layer.self_attn
        return Attention(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, nn.Identity(), attn.num_heads,
                         attn.head_dim, attn.scale, attn.dropout)
    attn = layer.attention
    if hasattr(attn, "q_proj"):
        heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
        dropout = attn.attention_dropout if hasattr(attn, "attention_dropout") else attn.dropout
        proj, scale = (attn.o_proj, attn.scaling) if hasattr(attn, "o_proj") else (attn.out_proj, attn.scale)  # AIMv2
        return Attention(attn.q_proj, attn.k_proj, attn.v_proj, proj, getattr(layer, "dropout", nn.Identity()),
                         heads, attn.head_dim, scale, dropout)
    inner, output = attn.attention, attn.output
    dropout = inner.dropout.p if isinstance(getattr(inner, "dropout", None), nn.Dropout) else inner.dropout_prob
    head_dim = inner.attention_head_size
    return Attention(inner.query, inner.key, inner.value, output.dense, output.dropout, inner.num_attention_heads,
                     head_dim, getattr(inner, "scaling", 1 / math.sqrt(head_dim)), dropout,
                     getattr(inner, "q_bias", None), getattr(inner, "v_bias", None))


def _mlp_module(layer: nn.Module) -> Optional[nn.Module]:
    """A layer's MLP as one module (``mlp``; AIMv2's ``ffn``), or None where it keeps it as ``intermediate`` and
    ``output.dense`` (Data2Vec-Vision, VideoMAE)."""
    return layer.mlp if hasattr(layer, "mlp") else getattr(layer, "ffn", None)


def _bert_mlp(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The MLP of a layer that keeps it as ``intermediate`` and ``output.dense`` (its residual left out)."""
    return layer.output.dense(layer.intermediate(y))


def _layer_scale(scale, x: torch.Tensor) -> torch.Tensor:
    return scale * x


def _scale_of(layer: nn.Module, module: str, parameter: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer's layer scale: its module ``module`` (DINOv2, DINOv3), or its tensor ``parameter`` (BEiT,
    Data2Vec-Vision; a float 1.0 or None where it has none), or nothing."""
    if hasattr(layer, module):
        return getattr(layer, module)
    scale = getattr(layer, parameter, None)
    return partial(_layer_scale, scale) if isinstance(scale, torch.Tensor) else nn.Identity()


def layer_parts(layer: nn.Module, dense: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> BlockParts:
    """The parts of a transformers pre-norm encoder layer (``attention_of`` names the layouts); dense: its own
    forward on [B, N, C] (default: the layer called on the hidden states alone)."""
    attn = attention_of(layer)
    if hasattr(layer, "layer_norm1"):  # CLIP, SigLIP
        norm1, norm2 = layer.layer_norm1, layer.layer_norm2
    elif hasattr(layer, "norm1"):  # DINOv2, DINOv3
        norm1, norm2 = layer.norm1, layer.norm2
    elif hasattr(layer, "rms_norm1"):  # AIMv2
        norm1, norm2 = layer.rms_norm1, layer.rms_norm2
    else:
        norm1, norm2 = layer.layernorm_before, layer.layernorm_after
    mlp = _mlp_module(layer)
    if mlp is not None:
        mlp_drop = getattr(layer, "dropout", nn.Identity())
    else:  # Data2Vec-Vision, VideoMAE
        mlp, mlp_drop = partial(_bert_mlp, layer), layer.output.dropout
    drop_path = getattr(layer, "drop_path", None)
    qkv = partial(fused_qkv, attn.q, attn.k, attn.v, q_bias=attn.q_bias, v_bias=attn.v_bias)
    return BlockParts(norm1=norm1, qkv=qkv, num_heads=attn.num_heads,
                      head_dim=attn.head_dim, scale=attn.scale, proj=attn.proj, norm2=norm2, mlp=mlp,
                      dense=dense or partial(first_output, dense_forward(layer)), training=layer.training,
                      attn_drop=attn.dropout, proj_drop=attn.proj_drop, mlp_drop=mlp_drop,
                      ls1=_scale_of(layer, "layer_scale1", "lambda_1"), drop_path1=drop_path,
                      ls2=_scale_of(layer, "layer_scale2", "lambda_2"), drop_path2=drop_path)


def layer_sizes(layer: nn.Module) -> Tuple[int, int, int]:
    """(attention width, head width, the MLP's multiply-adds per token) of a transformers encoder layer."""
    attn = attention_of(layer)
    mlp = _mlp_module(layer)
    mlp_flops = linear_flops(mlp) if mlp is not None else \
        linear_flops(layer.intermediate) + linear_flops(layer.output.dense)
    return attn.q.out_features, attn.head_dim, mlp_flops


@dataclass(frozen=True)
class PatchEmbedding:
    """Where a model cuts images into patches: its convolution, the image size (H, W) its position
    embedding is made for, and the patch size (h, w)."""

    projection: nn.Module
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]


class ATSHuggingFaceModel(PatchedModel):
    """Mixed in before the transformers model classes of every ``HuggingFaceFamily``."""

    restores = True

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None, attention_mask: Optional[torch.Tensor] = None,
                bool_masked_pos: Optional[torch.Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        """The original forward's arguments and output class (see the module docstring for what differs)."""
        family: HuggingFaceFamily = self._ats.family
        restore = bool(self._ats.config.restore)
        hidden_states = asks_hidden_states(self, output_hidden_states)
        inputs = {name: kwargs.pop(name, None) for name in family.padded_inputs}
        refuse_unsupported(self, attention_mask, bool_masked_pos, output_attentions, hidden_states and not restore,
                           kwargs)
        if pixel_values is None:
            raise ValueError(f"pass pixel_values, {family.inputs}")
        tokens, lengths = family.embed_padded(self, pixel_values, bool(interpolate_pos_encoding), **inputs)
        every_block = restore and (hidden_states or family.layout(self).stages)
        taps = range(-1, len(family.blocks(self))) if every_block else ()
        batch = run_patched(self, tokens, 0, tuple(pixel_values.shape[1:]), taps=taps, lengths=lengths)
        output = family.output(self, batch, self._ats.pool_weights, labels)
        if restore:
            output = family.restored_output(self, batch, output, hidden_states)
        return as_returned(self, output, return_dict)

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return as_logits(self._ats.family.output(self, batch, self._ats.pool_weights, None))


def as_returned(model: nn.Module, output, return_dict: Optional[bool]):
    """A transformers output as ``model`` returns it: the object, or with ``return_dict=False`` (or the config's)
    its tuple."""
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def asks_hidden_states(model: nn.Module, output_hidden_states: Optional[bool]) -> bool:
    """Whether a forward returns hidden states: ``output_hidden_states``, or where None the model config's."""
    if output_hidden_states is None:
        return bool(getattr(model.config, "output_hidden_states", False))
    return bool(output_hidden_states)


def refuse_unsupported(model: nn.Module, attention_mask, bool_masked_pos, output_attentions, output_hidden_states,
                       kwargs: dict) -> None:
    config = model.config
    if asks_hidden_states(model, output_hidden_states):
        raise ValueError("output_hidden_states: a patched model cannot return hidden states: after an ATS block "
                         "each image has its own token count. Patch with a restore rule (e.g. "
                         "ats.ATSConfig.multi_stage(0.7, restore='mix')) for the full grid, read ats.last_stats(model) "
                         "for the tokens each block kept, or ats.unpatch(model) for the full hidden states")
    if output_attentions or (output_attentions is None and getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions: a patched model cannot return attention maps: ATS blocks compute "
                         "attention for the kept queries only. ats.last_stats(model).cls_attention has the class "
                         "token's attention in every ATS block; ats.unpatch(model) for the full maps")
    if attention_mask is not None or bool_masked_pos is not None:
        raise ValueError("a patched model takes no attention_mask or bool_masked_pos: ATS makes its own masks; "
                         "ats.unpatch(model) to use them")
    if kwargs:
        raise TypeError(f"a patched model does not take {', '.join(sorted(kwargs))}; it takes pixel_values, labels, "
                        "interpolate_pos_encoding and return_dict (ats.unpatch(model) for the rest)")


class HuggingFaceFamily(Family):
    """What the transformers adapters share. A subclass names its classes (``layouts``), where the base model
    keeps its layers (``blocks``), its patch embedding (``patches``), its prefix tokens, how images become
    tokens (``embed``) and its final norm (``features``)."""

    layouts: Mapping[str, Layout] = {}
    mixin = ATSHuggingFaceModel
    inputs = "images [B, C, H, W]"
    #: The forward's inputs that say which of each image's tokens are padding (``embed_padded`` takes them).
    padded_inputs: Tuple[str, ...] = ()

    @property
    def models(self) -> Tuple[str, ...]:
        return tuple(self.layouts)

    def layout(self, model: nn.Module) -> Layout:
        original = model._ats.original_class if hasattr(model, "_ats") else type(model)
        return self.layouts[original.__name__]

    def base(self, model: nn.Module) -> nn.Module:
        attribute = self.layout(model).base
        return model if attribute is None else getattr(model, attribute)

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        from packaging.version import Version
        from transformers import __version__

        if Version(__version__) < Version(MIN_TRANSFORMERS):
            raise TypeError(f"transformers {__version__} is older than ATS supports; pip install -U "
                            f"'transformers>={MIN_TRANSFORMERS}'")
        implementation = model.config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise TypeError(f"attn_implementation={implementation!r} is not supported; load the model with "
                            "attn_implementation='sdpa' (or 'eager')")
        super().check(model, config, static)

    def block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """Each layer's parts (``parts_of``), with its gradient checkpointing (``checkpoint_function``)."""
        return [replace(self.parts_of(layer), checkpoint=self.checkpoint_function(model, layer))
                for layer in self.blocks(model)]

    def parts_of(self, layer: nn.Module) -> BlockParts:
        """The parts of one encoder layer."""
        return layer_parts(layer)

    def checkpoint_function(self, model: nn.Module, layer: nn.Module) -> Optional[Callable]:
        """After ``model.activation_checkpointing_enable(...)``: the function it gave each layer it chose
        (``every_n_layers``, ``offload``), in training only, as in transformers. Older releases (4.46), whose
        layers do not checkpoint themselves, set it on the encoder that loops over them: the encoder's."""
        if not hasattr(layer, "gradient_checkpointing"):
            layer = next((module for module in model.modules() if hasattr(module, "gradient_checkpointing")
                          and any(child is layer for child in module.modules())), layer)
        return layer._gradient_checkpointing_func if _checkpointed(layer) else None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        raise NotImplementedError

    def patches(self, model: nn.Module) -> PatchEmbedding:
        raise NotImplementedError

    def grid(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
        """The patch grid (rows, columns) of images of ``input_size`` (C, H, W), default the model's own."""
        patches = self.patches(model)
        return patch_grid(patches.image_size, patches.patch_size, input_size)

    def head_flops(self, model: nn.Module) -> Tuple[int, int]:
        """FLOPs of the head per image, and per token it reads (an attention pool's): its linear layers."""
        owners = (model,) if self.base(model) is model else (model, self.base(model))
        heads = [getattr(owner, name, None) for owner in owners for name in HEAD_MODULES]
        return sum(linear_flops(head) for head in heads if isinstance(head, nn.Module)), 0

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        grid = self.grid(model, input_size)
        attn_dim, head_dim, mlp_flops = layer_sizes(self.blocks(model)[0])
        head_flops, head_token_flops = self.head_flops(model)
        return ViTShape(embed_dim=self.base(model).config.hidden_size, attn_dim=attn_dim, head_dim=head_dim,
                        mlp_flops=mlp_flops, depth=len(self.blocks(model)), num_patches=math.prod(grid),
                        num_prefix_tokens=self.num_prefix_tokens(model),
                        patch_embed_flops=self.patch_embed_flops(model, grid), head_flops=head_flops,
                        grid_size=grid[-2:], head_token_flops=head_token_flops,
                        has_class_token=self.num_prefix_tokens(model) > 0)

    def input_size(self, model: nn.Module) -> Tuple[int, ...]:
        patches = self.patches(model)
        return (patches.projection.in_channels, *patches.image_size)

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        return {**processor_data_config(model, self.input_size(model)), "class_names": class_names(model)}

    def check_images(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        """Images [B, C, H, W] of the model's own size, or (resampled position embeddings, or none to resample)
        any multiple of the patch size, in the dtype of its patch embedding; ValueError otherwise."""
        patches = self.patches(model)
        channels, height, width = self.input_size(model)
        if interpolate_pos_encoding or self.layout(model).interpolating:
            size, sizes_fit = "H, W] (multiples of the patch size)", images.ndim == 4 and all(
                side % patch == 0 for side, patch in zip(images.shape[2:], patches.patch_size))
        else:
            size, sizes_fit = f"{height}, {width}]", tuple(images.shape[2:]) == (height, width)
        if images.ndim != 4 or images.shape[1] != channels or not sizes_fit:
            raise ValueError(f"expected pixel_values of shape [B, {channels}, {size} for this model, got "
                             f"{list(images.shape)}; preprocess them with the model's image processor")
        return images.to(patches.projection.weight.dtype)

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images -> the tokens [B, N, C'] entering block 0."""
        raise NotImplementedError

    def embed_padded(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False,
                     **inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The tokens [B, N, C'] entering block 0 and each image's token count [B] where inputs come padded (its
        first ones; None: all N), from the images and the ``padded_inputs``."""
        return self.embed(model, images, interpolate_pos_encoding), None

    def patch_embed_flops(self, model: nn.Module, grid: Tuple[int, ...]) -> int:
        """FLOPs of the patch embedding on a grid of (rows, columns)."""
        return conv_flops(self.patches(model).projection, grid)

    def final_norm(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The norm of the tokens leaving the last block."""
        return self.base(model).layernorm

    def features(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        """The packed tokens after the last block -> the final features [B, m, C], zeros on padding."""
        return masked_features(batch, self.final_norm(model)(batch.rows))

    def output(self, model: nn.Module, batch: TokenBatch, weights: torch.Tensor, labels: Optional[torch.Tensor]):
        """The model's own output object from the packed tokens after the last block."""
        features = self.features(model, batch)
        return self.layout(model).output(model, self.base(model), features, weights, self.num_prefix_tokens(model),
                                         labels)

    def restored_output(self, model: nn.Module, batch: TokenBatch, output: Any, hidden_states: bool) -> Any:
        """``output`` with the full token grid under the config's ``restore``: ``last_hidden_state`` (where the
        class returns it) restored before the final norm, and with ``hidden_states`` the embeddings and every
        layer's output restored (the forward tapped them)."""
        if "last_hidden_state" in output.__dataclass_fields__:
            output["last_hidden_state"] = token_map(model, batch, self.final_norm(model))
        if hidden_states and "hidden_states" in output.__dataclass_fields__:
            maps = tapped_maps(model, no_norm)
            output["hidden_states"] = tuple(maps[index] for index in sorted(maps))
        return output

    def forward_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """Every block's parts for one forward on inputs of ``input_size`` (a family whose attention depends on
        positions adds this forward's rotations or biases)."""
        return cached_block_parts(self, model, input_size)

    def run_blocks(self, model: nn.Module, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        return run_parts(model, self.forward_parts(model, input_size)[:stop], x, shape, start)


class HuggingFaceViT(HuggingFaceFamily):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    layouts = LAYOUTS

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        base = self.base(model)
        if getattr(base.config, "mask_ratio", 0.0) > 0:
            raise TypeError(f"this ViTMAEModel masks a random {base.config.mask_ratio:.0%} of the patches before its "
                            "blocks (MAE pre-training); ATS samples the tokens itself: load it with mask_ratio=0.0 "
                            "(ViTMAEModel.from_pretrained(name, mask_ratio=0.0))")
        if self.layout(model).stages and (config is None or not config.restore):
            raise TypeError(f"{type(model).__name__} returns every layer's full feature map; patch it with a config "
                            "that restores the dropped tokens, e.g. ats.ATSConfig.multi_stage(0.7, restore='mix')")
        if getattr(base, "pooler", None) is not None and self.num_prefix_tokens(model) == 0:
            raise TypeError("this model's pooler reads the first token, a patch token ATS may drop (the model has "
                            "no class token); create it without the pooling layer (add_pooling_layer=False)")
        super().check(model, config, static)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        base = self.base(model)
        return base.layers if hasattr(base, "layers") else base.encoder.layer  # ViT, DeiT, ...; DINOv2

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """The class token, DeiT's distillation token and DINOv2's register tokens (I-JEPA has none)."""
        embeddings = self.base(model).embeddings
        registers = getattr(embeddings, "register_tokens", None)
        return hasattr(embeddings, "cls_token") + hasattr(embeddings, "distillation_token") + (
            0 if registers is None else registers.shape[1])

    def patches(self, model: nn.Module) -> PatchEmbedding:
        patches = self.base(model).embeddings.patch_embeddings
        return PatchEmbedding(patches.projection, pair(patches.image_size), pair(patches.patch_size))

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, C']: H, W the model's own size, or with a resampled position
        embedding (``interpolate_pos_encoding``, and always for DINOv2) any multiple of the patch size."""
        images = self.check_images(model, images, interpolate_pos_encoding)
        embeddings = self.base(model).embeddings
        if self.layout(model).interpolating:
            return embeddings(images)
        if hasattr(embeddings, "random_masking"):  # ViT-MAE: its embedding without the shuffle of masking
            return _mae_embed(embeddings, images, interpolate_pos_encoding)
        return embeddings(images, interpolate_pos_encoding=interpolate_pos_encoding)


def _mae_embed(embeddings: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
    """ViT-MAE's embedding of images [B, C, H, W] with nothing masked, the patches in their order (its own
    forward shuffles them even at mask_ratio 0) -> [B, 1 + N, C]."""
    tokens = embeddings.patch_embeddings(images)
    position = embeddings.interpolate_pos_encoding(tokens, *images.shape[2:]) if interpolate_pos_encoding \
        else embeddings.position_embeddings
    cls_token = (embeddings.cls_token + position[:, :1]).expand(tokens.shape[0], -1, -1)
    return torch.cat((cls_token, tokens + position[:, 1:]), dim=1)


def processor_data_config(model: nn.Module, input_size: Tuple[int, int, int]) -> dict:
    """Preprocessing from the model's image processor config (``preprocessor_config.json`` where it
    was loaded from), else timm's defaults at ``input_size`` (C, H, W), the model's own."""
    processor = processor_config(model)
    channels, height, width = input_size
    size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
    config = dict(interpolation=PIL_RESAMPLE.get(processor.get("resample"), "bicubic"),
                  crop_pct=processor.get("crop_pct") or 0.875, crop_mode="center", input_size=(channels, height, width))
    if processor.get("do_center_crop") and crop:
        resized = size.get("shortest_edge") or size.get("height") or crop["height"]
        config.update(crop_pct=crop["height"] / resized, input_size=(channels, crop["height"], crop["width"]))
    elif "height" in size:
        config.update(crop_pct=1.0, crop_mode="squash", input_size=(channels, size["height"], size["width"]))
    normalise = processor.get("do_normalize", True)
    for key, default, identity in (("mean", IMAGENET_MEAN, 0.0), ("std", IMAGENET_STD, 1.0)):
        config[key] = fit_channels(processor.get(f"image_{key}", default) if normalise else (identity,), channels)
    return config


def class_names(model: nn.Module) -> Optional[Sequence[str]]:
    """A transformers model's class names by index (``config.id2label``), or None where they are placeholders."""
    labels = getattr(model.config, "id2label", None) or {}
    names = [labels.get(index, str(index)) for index in range(len(labels))]
    return None if all(name == f"LABEL_{index}" for index, name in enumerate(names)) else names


def processor_config(model: nn.Module) -> dict:
    """The image processor config saved with the model, or {} when there is none."""
    from transformers.image_processing_utils import ImageProcessingMixin

    source = getattr(model.config, "_name_or_path", "")
    if not source:
        return {}
    try:
        return ImageProcessingMixin.get_image_processor_dict(source, local_files_only=True)[0]
    except OSError:
        return {}


HF = HuggingFaceViT()
