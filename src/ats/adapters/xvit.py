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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flops import BlockCost, ViTShape, block_flops, conv_flops, frames_block_flops, linear_flops
from ..method import Method
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
from .family import Family, PatchedModel, cached_block_parts, check_block_types, masked_features, run_patched
from .psvit import declared_data_config


class ATSXViT(PatchedModel):
    """Mixed in before ``XViT`` by ``XViTFamily.patch``; ``XVIT`` is the adapter."""

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, C, H, W] -> normalised tokens [B, T, m, D], valid tokens first, zeros on padding."""
        return XVIT.features(self, run_patched(self, XVIT.embed(self, clips), 0, tuple(clips.shape[1:])))

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return self.forward_head(XVIT.features(self, batch))


class XViTFamily(Family):
    name = "ats.models.xvit.XViT"
    mixin = ATSXViT
    models = (XViT,)

    def check(self, model: XViT, config: Optional[Method] = None, static: bool = False) -> None:
        check_block_types(model.blocks, {XViTBlock: ()}, "XViTBlock")
        super().check(model, config, static)
        if config is not None:
            check_tube_config(config, len(model.blocks), "space-time mixing attention", static=static)

    def blocks(self, model: XViT) -> Sequence[nn.Module]:
        return model.blocks

    def tube_parts(self, block: XViTBlock) -> TubeBlockParts:
        attention = block.attn
        return TubeBlockParts(norm1=block.norm1, qkv=attention.qkv, proj=attention.proj, norm2=block.norm2,
                              mlp=block.mlp, num_heads=attention.num_heads, head_dim=attention.head_dim,
                              scale=attention.scale, mix_qkv=attention.mix_qkv, shared_cls=False,
                              training=block.training, attn_drop=attention.attn_drop.p, drop_path=block.drop_path)

    def block_parts(self, model: XViT, input_size: Sequence[int]) -> List[TubeBlockParts]:
        return [self.tube_parts(block) for block in model.blocks]

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

    def block_costs(self, model: XViT, shape: ViTShape, config: Optional[Method]) -> Dict[int, BlockCost]:
        return {index: partial(frames_block_flops, shape, model.num_frames, **tube_block_options(config, index))
                for index in range(shape.depth)}

    def input_size(self, model: XViT) -> Tuple[int, int, int, int]:
        """(frames, channels, height, width) the model takes."""
        return model.input_size

    def data_config(self, model: XViT) -> Dict[str, Any]:
        """Per-frame preprocessing (``psvit.declared_data_config``), with ``num_frames``."""
        frames, *image_size = self.input_size(model)
        return {**declared_data_config(model), "input_size": tuple(image_size), "num_frames": frames}

    def embed(self, model: XViT, clips: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, C, H, W] -> the tubes entering block 0, [B, 1 + S, T * D]."""
        return frames_to_tubes(model.embed(clips))

    def run_blocks(self, model: XViT, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        """The blocks ``start`` to ``stop`` on tubes (``ats.tubes``): x and the rows returned are tubes."""
        parts = cached_block_parts(self, model, input_size)[:stop]
        return run_tube_blocks(parts, x, model.num_frames, model._ats.config, start)

    def features(self, model: XViT, batch: TokenBatch) -> torch.Tensor:
        """The final norm's output [B, T, m, D], zeros on padding."""
        rows = model.norm(batch.rows.unflatten(-1, (model.num_frames, -1))).flatten(1)
        return tubes_to_frames(masked_features(batch, rows), model.num_frames)


XVIT = XViTFamily()
