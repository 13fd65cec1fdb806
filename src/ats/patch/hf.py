"""The adapter for Hugging Face transformers: ViT, DeiT (with or without its distillation head),
DINOv2 and DINOv2 with registers, as base models or image classifiers.

The patched model's ``forward`` takes the same arguments as the original one and returns the same
output class: embeddings, ``ats.step.run_blocks``, the final layer norm, then the model's own head.
``last_hidden_state`` is padded to the longest image (zeros on padding; ``ats.last_stats(model)``
gives each image's token count), and a mean over patch tokens (DINOv2's classifier) covers valid
tokens only. Hidden states and attention maps are refused: their sizes differ per image.
transformers is imported only when a model of it is met.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import ViTShape, conv_flops, linear_flops, patch_grid
from ..packing import TokenBatch
from ..step import BlockParts
from .family import Family, PatchedModel, fit_channels, masked_features

#: PIL resampling filters (as image processor configs store them) by timm's interpolation names.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_MODULES = ("classifier", "cls_classifier", "distillation_classifier")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
#: The first transformers release whose ViT, DeiT and DINOv2 layers all hold q_proj/k_proj/v_proj/o_proj.
MIN_TRANSFORMERS = "5.18"


def _base_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                 labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if hasattr(base, "pooler"):  # ViT, DeiT: their optional pooler
        pooled = None if base.pooler is None else base.pooler(features)
    else:  # DINOv2: the class token
        pooled = features[:, 0]
    return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


def classifier_output(model: nn.Module, logits: torch.Tensor, labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import ImageClassifierOutput

    loss = None if labels is None else model.loss_function(labels, logits, model.config)
    return ImageClassifierOutput(loss=loss, logits=logits)


def _class_token_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                        prefix: int, labels: Optional[torch.Tensor]):
    return classifier_output(model, model.classifier(features[:, 0]), labels)


def _class_and_mean_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                           prefix: int, labels: Optional[torch.Tensor]):
    """DINOv2's classifier: the class token beside the mean of the patch tokens (valid ones, by size)."""
    patch_weights = weights[:, prefix:, None]
    mean = (features[:, prefix:] * patch_weights).sum(dim=1) / patch_weights.sum(dim=1).clamp_min(1e-12)
    return classifier_output(model, model.classifier(torch.cat([features[:, 0], mean], dim=1)), labels)


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
    the model is its own base); output: builds the class's output from the final features;
    interpolating: its embeddings always resample the position embedding (DINOv2), else only
    with ``interpolate_pos_encoding=True``."""

    base: Optional[str]
    output: Callable
    interpolating: bool = False


LAYOUTS = {
    "ViTModel": Layout(None, _base_output),
    "ViTForImageClassification": Layout("vit", _class_token_output),
    "DeiTModel": Layout(None, _base_output),
    "DeiTForImageClassification": Layout("deit", _class_token_output),
    "DeiTForImageClassificationWithTeacher": Layout("deit", _teacher_output),
    "Dinov2Model": Layout(None, _base_output, interpolating=True),
    "Dinov2ForImageClassification": Layout("dinov2", _class_and_mean_output, interpolating=True),
    "Dinov2WithRegistersModel": Layout(None, _base_output, interpolating=True),
    "Dinov2WithRegistersForImageClassification": Layout("dinov2_with_registers", _class_and_mean_output,
                                                        interpolating=True),
}


def fused_qkv(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Queries, keys and values of normed rows [T, C] from three separate projections -> [T, 3A]."""
    return torch.cat([q_proj(y), k_proj(y), v_proj(y)], dim=-1)


def _checkpointed(layer: nn.Module) -> bool:
    return getattr(layer, "gradient_checkpointing", False) and layer.training


def dense_forward(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer itself; under gradient checkpointing its forward without transformers' checkpointing
    wrapper, since run_blocks checkpoints every block the same way."""
    if not _checkpointed(layer):
        return layer
    forward = type(layer).forward
    return partial(getattr(forward, "__wrapped__", forward), layer)


class ATSHuggingFaceModel(PatchedModel):
    """Mixed in before a transformers model class by ``HuggingFaceViT.patch``; ``HF`` is the adapter."""

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None, attention_mask: Optional[torch.Tensor] = None,
                bool_masked_pos: Optional[torch.Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        """The original forward's arguments and output class (see the module docstring for what differs)."""
        refuse_unsupported(self, attention_mask, bool_masked_pos, output_attentions, output_hidden_states, kwargs)
        if pixel_values is None:
            raise ValueError("pass pixel_values, images [B, C, H, W]")
        tokens = HF.embed(self, pixel_values, bool(interpolate_pos_encoding))
        batch = HF.run_patched(self, tokens, 0, tuple(pixel_values.shape[1:]))
        output = HF.output(self, batch, self._ats.pool_weights, labels)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()


def refuse_unsupported(model: nn.Module, attention_mask, bool_masked_pos, output_attentions, output_hidden_states,
                       kwargs: dict) -> None:
    config = model.config
    if output_hidden_states or (output_hidden_states is None and getattr(config, "output_hidden_states", False)):
        raise ValueError("output_hidden_states: a patched model cannot return hidden states: after an ATS block "
                         "each image has its own token count. Read ats.last_stats(model) for the tokens each block "
                         "kept, or ats.unpatch(model) for the full hidden states")
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


class HuggingFaceViT(Family):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    mixin = ATSHuggingFaceModel

    def owns(self, cls: type) -> bool:
        return cls.__module__.startswith("transformers.") and cls.__name__ in LAYOUTS

    def layout(self, model: nn.Module) -> Layout:
        original = model._ats.original_class if hasattr(model, "_ats") else type(model)
        return LAYOUTS[original.__name__]

    def base(self, model: nn.Module) -> nn.Module:
        attribute = self.layout(model).base
        return model if attribute is None else getattr(model, attribute)

    def check(self, model: nn.Module) -> None:
        if not hasattr(self.blocks(model)[0].attention, "q_proj"):
            raise TypeError(f"this transformers version lays out {type(model).__name__}'s attention in an older "
                            f"form; ATS supports transformers >= {MIN_TRANSFORMERS}: pip install -U "
                            f"'transformers>={MIN_TRANSFORMERS}'")
        implementation = model.config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise TypeError(f"attn_implementation={implementation!r} is not supported; load the model with "
                            "attn_implementation='sdpa' (or 'eager')")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        base = self.base(model)
        return base.layers if hasattr(base, "layers") else base.encoder.layer  # ViT, DeiT; DINOv2

    def block_parts(self, layer: nn.Module) -> BlockParts:
        attn = layer.attention
        common = dict(qkv=partial(fused_qkv, attn.q_proj, attn.k_proj, attn.v_proj),
                      num_heads=attn.num_attention_heads, head_dim=attn.head_dim, scale=attn.scaling,
                      proj=attn.o_proj, mlp=layer.mlp, dense=dense_forward(layer), training=layer.training,
                      attn_drop=attn.attention_dropout)
        if hasattr(layer, "layernorm_before"):  # ViT, DeiT
            return BlockParts(norm1=layer.layernorm_before, norm2=layer.layernorm_after, proj_drop=layer.dropout,
                              mlp_drop=layer.dropout, **common)
        return BlockParts(norm1=layer.norm1, norm2=layer.norm2, ls1=layer.layer_scale1, ls2=layer.layer_scale2,
                          drop_path1=layer.drop_path, drop_path2=layer.drop_path, **common)

    def checkpoint_function(self, model: nn.Module, layer: nn.Module) -> Optional[Callable]:
        """After ``model.activation_checkpointing_enable(...)``: the function it gave each layer it chose
        (``every_n_layers``, ``offload``), in training only, as in transformers."""
        return layer._gradient_checkpointing_func if _checkpointed(layer) else None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """The class token, DeiT's distillation token and DINOv2's register tokens."""
        embeddings = self.base(model).embeddings
        registers = getattr(embeddings, "register_tokens", None)
        return 1 + hasattr(embeddings, "distillation_token") + (0 if registers is None else registers.shape[1])

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        patches = self.base(model).embeddings.patch_embeddings
        grid = patch_grid(patches.image_size, patches.patch_size, input_size)
        layer = self.blocks(model)[0]
        base_pooler = getattr(self.base(model), "pooler", None)
        heads = [getattr(model, name, None) for name in HEAD_MODULES] + [base_pooler]
        return ViTShape(embed_dim=model.config.hidden_size, attn_dim=layer.attention.q_proj.out_features,
                        head_dim=layer.attention.head_dim, mlp_flops=linear_flops(layer.mlp),
                        depth=len(self.blocks(model)), num_patches=grid[0] * grid[1],
                        num_prefix_tokens=self.num_prefix_tokens(model),
                        patch_embed_flops=conv_flops(patches.projection, grid),
                        head_flops=sum(linear_flops(head) for head in heads if head is not None), grid_size=grid)

    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        patches = self.base(model).embeddings.patch_embeddings
        return (patches.num_channels, *patches.image_size)

    def data_config(self, model: nn.Module) -> dict:
        return processor_data_config(model, self.input_size(model))

    def class_names(self, model: nn.Module) -> Optional[Sequence[str]]:
        labels = getattr(model.config, "id2label", None) or {}
        names = [labels.get(index, str(index)) for index in range(len(labels))]
        return None if all(name == f"LABEL_{index}" for index, name in enumerate(names)) else names

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, C']: H, W the model's own size, or with a resampled position
        embedding (``interpolate_pos_encoding``, and always for DINOv2) any multiple of the patch size."""
        embeddings = self.base(model).embeddings
        patches = embeddings.patch_embeddings
        always_resampled = self.layout(model).interpolating
        channels, height, width = self.input_size(model)
        if interpolate_pos_encoding or always_resampled:
            size, sizes_fit = "H, W] (multiples of the patch size)", images.ndim == 4 and all(
                side % patch == 0 for side, patch in zip(images.shape[2:], patches.patch_size))
        else:
            size, sizes_fit = f"{height}, {width}]", tuple(images.shape[2:]) == (height, width)
        if images.ndim != 4 or images.shape[1] != channels or not sizes_fit:
            raise ValueError(f"expected pixel_values of shape [B, {channels}, {size} for this model, got "
                             f"{list(images.shape)}; preprocess them with the model's image processor")
        images = images.to(patches.projection.weight.dtype)
        if always_resampled:
            return embeddings(images)
        return embeddings(images, interpolate_pos_encoding=interpolate_pos_encoding)

    def output(self, model: nn.Module, batch: TokenBatch, weights: torch.Tensor, labels: Optional[torch.Tensor]):
        """The model's own output object from the packed tokens after the last block."""
        base = self.base(model)
        features = masked_features(batch, base.layernorm(batch.rows))
        return self.layout(model).output(model, base, features, weights, self.num_prefix_tokens(model), labels)

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return _logits_of(model, model(pixel_values=images))

    def logits_from_block(self, model: nn.Module, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if hasattr(model, "_ats"):
            batch = self.run_patched(model, tokens, start, self.input_size(model))
            weights = model._ats.pool_weights
        else:
            for layer in self.blocks(model)[start:]:
                tokens = layer(tokens)
            batch = TokenBatch.from_dense(tokens)
            weights = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        return _logits_of(model, self.output(model, batch, weights, None))


def _logits_of(model: nn.Module, output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        name = HF.layout(model).base or type(model).__name__
        raise TypeError(f"a {name} model has no classification head; load the checkpoint with its "
                        "...ForImageClassification class to measure accuracy")
    return logits


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
