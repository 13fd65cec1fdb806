"""The adapter for Hugging Face transformers' VideoMAE and ViViT (``VideoMAEModel``,
``VideoMAEForVideoClassification``, ``VivitModel``, ``VivitForVideoClassification``): tubelet tokens under
joint space-time attention.

A clip [B, T, C, H, W] becomes (T / t) (H / h) (W / w) tubelet tokens (a 3-d convolution), time-major: token
j (after the prefix) is tubelet time j // P of patch j % P, P = (H / h)(W / w). Every block attends over all
of them (ViViT's model 1, VideoMAE), a standard pre-norm block, so ATS samples among space-time tokens as
for an image, as under TimeSformer's joint space-time attention: ``ats.last_stats(model).kept`` indexes the
space-time tokens, token counts and GFLOPs are per clip. ViViT has a class token and classifies it; VideoMAE
has none, so its blocks score tokens by ``self_attention`` (``score="auto"``) and its classifier averages
each clip's valid tokens by size (``use_mean_pooling``; the first-token classifier is refused). Clips are
the model's own frames and size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..method import Method
from .family import valid_mean
from .hf import (
    HuggingFaceFamily,
    Layout,
    PatchEmbedding,
    base_output,
    class_token_output,
    classifier_output,
    pair,
)
from .timesformer import clip_data_config


def _videomae_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor, prefix: int,
                     labels: Optional[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=features)


def _videomae_classifier_output(model: nn.Module, base: nn.Module, features: torch.Tensor, weights: torch.Tensor,
                                prefix: int, labels: Optional[torch.Tensor]):
    """VideoMAE's classifier: the mean of the clip's valid tokens by size, through its norm."""
    return classifier_output(model, model.classifier(model.fc_norm(valid_mean(features, weights))), labels)


LAYOUTS = {
    "VideoMAEModel": Layout(None, _videomae_output),
    "VideoMAEForVideoClassification": Layout("videomae", _videomae_classifier_output),
    "VivitModel": Layout(None, base_output),
    "VivitForVideoClassification": Layout("vivit", class_token_output),
}


class HuggingFaceVideo(HuggingFaceFamily):
    name = "Hugging Face " + ", ".join(LAYOUTS)
    layouts = LAYOUTS
    inputs = "clips [B, T, C, H, W]"

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        if getattr(model, "fc_norm", True) is None:
            raise TypeError("this VideoMAEForVideoClassification classifies the first token (use_mean_pooling=False), "
                            "a tubelet token ATS may drop (VideoMAE has no class token); ATS supports the "
                            "mean-pooling classifier (use_mean_pooling=True)")
        if config is not None and config.restore:
            raise ValueError("restore is not supported on video models yet: their token outputs hold the kept "
                             "tubelets only; patch without it")
        super().check(model, config, static)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        base = self.base(model)
        return base.layers if hasattr(base, "layers") else base.encoder.layer  # ViViT; VideoMAE

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """ViViT's class token; VideoMAE has none."""
        return int(hasattr(self.base(model).embeddings, "cls_token"))

    def patches(self, model: nn.Module) -> PatchEmbedding:
        patches = self.base(model).embeddings.patch_embeddings
        return PatchEmbedding(patches.projection, pair(patches.image_size), patches.projection.kernel_size[1:])

    def input_size(self, model: nn.Module) -> Tuple[int, int, int, int]:
        """(frames, channels, height, width) the model takes."""
        return (self.base(model).config.num_frames, *super().input_size(model))

    def grid(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
        """The tubelet grid (times, rows, columns) of the model's clips (the only ``input_size`` it takes)."""
        expected = self.input_size(model)
        if input_size is not None and tuple(input_size) != expected:
            raise ValueError(f"this model takes clips of {expected} (frames, channels, height, width), got "
                             f"{tuple(input_size)}")
        frames, _, height, width = expected
        tubelet = self.patches(model).projection.kernel_size
        return frames // tubelet[0], height // tubelet[1], width // tubelet[2]

    def data_config(self, model: nn.Module) -> dict:
        return clip_data_config(model, self.input_size(model))

    def embed(self, model: nn.Module, clips: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Clips [B, T, C, H, W] of the model's own frames and size -> tokens [B, prefix + N, C']."""
        expected = self.input_size(model)
        if interpolate_pos_encoding:
            raise ValueError(f"a patched video model takes clips of its own size {expected} (frames, channels, "
                             "height, width); interpolate_pos_encoding is not supported")
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(f"expected pixel_values of shape [B, {', '.join(map(str, expected))}] (clips of "
                             f"{expected[0]} frames) for this model, got {list(clips.shape)}; sample {expected[0]} "
                             "frames per clip and preprocess them with the model's video processor")
        embeddings = self.base(model).embeddings
        clips = clips.to(embeddings.patch_embeddings.projection.weight.dtype)
        return embeddings(clips, None) if not hasattr(embeddings, "cls_token") else embeddings(clips)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The layer norm after the blocks (none in VideoMAE with mean pooling: its classifier has ``fc_norm``)."""
        norm = self.base(model).layernorm
        return nn.Identity() if norm is None else norm


HF_VIDEO = HuggingFaceVideo()
