"""The adapter for Hugging Face transformers' SigLIP 2 (NaFlex) vision tower and classifier: inputs that come padded.

``Siglip2VisionModel`` and ``Siglip2ForImageClassification`` take what their image processor gives: each image cut
into patches at its own aspect ratio, ``pixel_values`` [B, N, C*p*p] with each image's patches first and padding
after them (``pixel_attention_mask`` [B, N]), and each image's patch grid (``spatial_shapes`` [B, 2], to which the
position embedding is resized). ATS starts from those sequences as from a batch it packed itself
(``TokenBatch.with_lengths``): padding takes part in nothing, each image keeps its own count, and a budget ``rho`` is
a share of the image's own patches. Otherwise as SigLIP (``hf_clip``): no class token, so tokens are scored by
``self_attention``; the attention-pool head and the classifier's mean read each image's valid tokens by size; a
patched model returns zeros at padding positions. Sizes are given as the processor's (N, C*p*p): ``ats.gflops``
counts N patches (``max_num_patches``), the most an image costs, and ``ats.last_stats`` each image's own.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import linear_flops
from .hf import Layout, PatchEmbedding, pair
from .hf_clip import VisionTowers, siglip_classifier_output, siglip_output


class Siglip2Towers(VisionTowers):
    layouts = {"Siglip2VisionModel": Layout(None, siglip_output),
               "Siglip2ForImageClassification": Layout("vision_model", siglip_classifier_output)}
    name = "Hugging Face " + ", ".join(layouts)
    inputs = "the image processor's pixel_values [B, N, C*p*p], pixel_attention_mask [B, N] and spatial_shapes [B, 2]"
    padded_inputs = ("pixel_attention_mask", "spatial_shapes")

    def patches(self, model: nn.Module) -> PatchEmbedding:
        """The patch projection (an nn.Linear), the image size of the square grid of its position embedding."""
        embeddings = self.base(model).embeddings
        patch = pair(embeddings.patch_size)
        side = embeddings.position_embedding_size
        return PatchEmbedding(embeddings.patch_embedding, (side * patch[0], side * patch[1]), patch)

    def input_size(self, model: nn.Module) -> Tuple[int, ...]:
        """(N, C*p*p): the model's ``num_patches`` (the processor's default ``max_num_patches``) of C*p*p pixels."""
        embeddings = self.base(model).embeddings
        return embeddings.num_patches, embeddings.patch_embedding.in_features

    def grid(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
        """Sequences of ``input_size`` (N, C*p*p)'s N patches as a grid: square where N is, else one row (each image
        has its own grid, ``spatial_shapes``)."""
        patches = (input_size or self.input_size(model))[0]
        side = math.isqrt(patches)
        return (side, side) if side * side == patches else (1, patches)

    def patch_embed_flops(self, model: nn.Module, grid: Tuple[int, ...]) -> int:
        return math.prod(grid) * linear_flops(self.patches(model).projection)

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        raise TypeError(f"{type(model).__name__} takes {self.inputs} from its image processor, and the ats commands "
                        "feed images [B, C, H, W]: run the patched model from Python on the processor's output")

    def embed(self, model: nn.Module, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        raise ValueError(f"{type(model).__name__} takes {self.inputs}: call the model on them")

    def embed_padded(self, model: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                     pixel_attention_mask: Optional[torch.Tensor] = None,
                     spatial_shapes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The processor's inputs -> tokens [B, N, C'] and each image's patch count [B]."""
        channels = self.input_size(model)[1]
        if pixel_values.ndim != 3 or pixel_values.shape[2] != channels:
            raise ValueError(f"expected pixel_values of shape [B, N, {channels}] for this model, got "
                             f"{list(pixel_values.shape)}; preprocess the images with the model's image processor")
        batch, patches = pixel_values.shape[:2]
        if pixel_attention_mask is None or spatial_shapes is None:
            raise ValueError(f"pass {self.inputs}, as the image processor gives them")
        if tuple(pixel_attention_mask.shape) != (batch, patches) or tuple(spatial_shapes.shape) != (batch, 2):
            raise ValueError(f"pixel_attention_mask must be [B, N] = {[batch, patches]} and spatial_shapes [B, 2], "
                             f"got {list(pixel_attention_mask.shape)} and {list(spatial_shapes.shape)}")
        lengths = pixel_attention_mask.long().sum(dim=1)
        if not torch.compiler.is_compiling():
            first = torch.arange(patches, device=lengths.device) < lengths[:, None]
            grids = spatial_shapes.prod(1).long()
            if not torch.equal(pixel_attention_mask.bool(), first) or not torch.equal(grids, lengths):
                raise ValueError("each image's patches must come first, padding after them, and fill its "
                                 "spatial_shapes grid, as the image processor gives them")
        if interpolate_pos_encoding:
            raise ValueError("Siglip2 resizes its position embedding to each image's spatial_shapes itself; drop "
                             "interpolate_pos_encoding")
        tokens = self.base(model).embeddings(pixel_values.to(self.patches(model).projection.weight.dtype),
                                             spatial_shapes)
        return tokens, lengths


SIGLIP2 = Siglip2Towers()
