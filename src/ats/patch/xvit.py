"""The adapter for the library's own XViT (``ats.models.xvit.XViT``): ATS keeps tubes.

Space-time mixing attention builds every key and value from the same position in the neighbouring
frames, so a sampled token set must hold the same positions in every frame: an ATS block keeps tubes,
one set of spatial positions per clip shared by its frames, scored by the frames' class tokens'
attention times the value norms, summed over frames (``ats.tubes``, as for TimeSformer's divided
attention). Token counts and ``ats.last_stats(model)`` are per clip and in positions; GFLOPs are per clip.
The patched ``forward_features`` returns [B, T, m, D], padded with zeros, the class tokens first.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import BlockCost, ViTShape, block_flops, conv_flops, frames_block_flops, linear_flops
from ..methods import PatchConfig
from ..models.xvit import XViT, XViTBlock
from ..packing import TokenBatch
from ..stats import ForwardRecord
from ..tubes import (
    TubeBlockParts,
    check_tube_config,
    frames_to_tubes,
    run_tube_blocks,
    tube_block_options,
    tubes_to_frames,
)
from .family import Family, PatchedModel, masked_features
from .psvit import IMAGENET_DEFAULTS


class ATSXViT(PatchedModel):
    """Mixed in before ``XViT`` by ``XViTFamily.patch``; ``XVIT`` is the adapter."""

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, C, H, W] -> normalised tokens [B, T, m, D], valid tokens first, zeros on padding."""
        batch = XVIT.run_patched(self, self.embed(clips), 0, tuple(clips.shape[1:]))
        return XVIT.features(self, batch)


class XViTFamily(Family):
    name = "ats.models.xvit.XViT"
    mixin = ATSXViT

    def owns(self, cls: type) -> bool:
        return issubclass(cls, XViT)

    def check(self, model: XViT) -> None:
        for index, block in enumerate(model.blocks):
            if type(block) is not XViTBlock:
                raise TypeError(f"block {index} is a {type(block).__name__}; ATS supports XViTBlock")

    def blocks(self, model: XViT) -> Sequence[nn.Module]:
        return model.blocks

    def tube_parts(self, block: XViTBlock) -> TubeBlockParts:
        attention = block.attn
        return TubeBlockParts(norm1=block.norm1, qkv=attention.qkv, proj=attention.proj, norm2=block.norm2,
                              mlp=block.mlp, num_heads=attention.num_heads, head_dim=attention.head_dim,
                              scale=attention.scale, mix_qkv=attention.mix_qkv, shared_cls=False,
                              training=block.training, attn_drop=attention.attn_drop.p, drop_path=block.drop_path)

    def check_config(self, model: XViT, config: PatchConfig) -> None:
        super().check_config(model, config)
        check_tube_config(config, self.depth(model), "space-time mixing attention")

    def shape(self, model: XViT, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        """Sizes per clip; ``num_patches`` counts positions per frame; ``head_flops`` counts the temporal
        aggregation (one block on the T class tokens) and the classifier."""
        if input_size is not None and tuple(input_size) != self.input_size(model):
            raise ValueError(f"this XViT takes clips of {self.input_size(model)} (frames, channels, height, width), "
                             f"got {tuple(input_size)}")
        block = model.blocks[0]
        grid = model.patch_embed.grid_size
        shape = ViTShape(embed_dim=model.embed_dim, attn_dim=block.attn.qkv.out_features // 3,
                         head_dim=block.attn.head_dim, mlp_flops=linear_flops(block.mlp), depth=len(model.blocks),
                         num_patches=grid[0] * grid[1], num_prefix_tokens=1,
                         patch_embed_flops=model.num_frames * conv_flops(model.patch_embed.proj, grid), head_flops=0,
                         grid_size=grid)
        aggregation = block_flops(shape, model.num_frames, model.num_frames) + linear_flops(model.head)
        return ViTShape(**{**shape.__dict__, "head_flops": aggregation})

    def block_costs(self, model: XViT, shape: ViTShape, config: Optional[PatchConfig]) -> Dict[int, BlockCost]:
        return {index: partial(frames_block_flops, shape, model.num_frames, **tube_block_options(config, index))
                for index in range(shape.depth)}

    def runs_static(self, model: XViT) -> bool:
        return False  # its blocks run on tubes

    def input_size(self, model: XViT) -> Tuple[int, int, int, int]:
        """(frames, channels, height, width) the model takes."""
        return model.input_size

    def data_config(self, model: XViT) -> dict:
        """Per-frame preprocessing: the config the model declares (``pretrained_cfg``, as the reference XViT
        does), else ImageNet's; with ``num_frames``."""
        frames, *image_size = self.input_size(model)
        declared = getattr(model, "pretrained_cfg", None) or {}
        config = {**IMAGENET_DEFAULTS, **{key: declared[key] for key in IMAGENET_DEFAULTS if key in declared}}
        return {**config, "input_size": tuple(image_size), "num_frames": frames}

    def embed(self, model: XViT, clips: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, C, H, W] -> the tokens entering block 0, [B, T, 1 + S, D]."""
        return model.embed(clips)

    def run_blocks(self, model: XViT, x: torch.Tensor, shape: ViTShape, start: int,
                   input_size: Sequence[int]) -> Tuple[TokenBatch, ForwardRecord]:
        """The blocks from ``start`` on tubes (``ats.tubes``): x is [B, T, 1 + S, D], the rows returned [R, T * D]."""
        parts: List[TubeBlockParts] = [self.tube_parts(block) for block in self.blocks(model)]
        return run_tube_blocks(parts, frames_to_tubes(x), model.num_frames, model._ats.config, start)

    def features(self, model: XViT, batch: TokenBatch) -> torch.Tensor:
        """The final norm's output [B, T, m, D], zeros on padding."""
        rows = model.norm(batch.rows.unflatten(-1, (model.num_frames, -1))).flatten(1)
        return tubes_to_frames(masked_features(batch, rows), model.num_frames)

    def logits(self, model: XViT, clips: torch.Tensor) -> torch.Tensor:
        return model(clips)

    def logits_from_block(self, model: XViT, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if hasattr(model, "_ats"):
            batch = self.run_patched(model, tokens, start, self.input_size(model))
            return model.forward_head(self.features(model, batch))
        for block in model.blocks[start:]:
            tokens = block(tokens)
        return model.forward_head(model.norm(tokens))


XVIT = XViTFamily()
