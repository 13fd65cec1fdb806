"""The adapters for timm's Beit (BEiT, BEiT v2) and relative-position ViTs (``VisionTransformerRelPos``:
``vit_relpos_*``, ``vit_srelpos_*``): relative position biases.

Each block adds to every attention logit a learnt bias indexed by the pair of positions (query, key),
the class token's row and column included, from its own table and the model's shared one. After an ATS
block the tokens are packed, so each block's bias is gathered at the rows and columns of the positions
the kept tokens came from (``TokenBatch.source``, ``step.pair_bias``); the class token's attention that
scores the tokens carries the bias too. The average pooling reads each image's valid tokens only. The
relative-position ViTs make their biases with a small MLP over log-spaced coordinates (``RelPosMlp``) or from a
table (``RelPosBias``), per block or shared (``vit_srelpos_*``); most have no class token, so ATS scores their
tokens by self-attention. Their post-norm blocks (``*_rpn_*``) are refused.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
from timm.models.beit import Attention, Beit, Block
from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, VisionTransformerRelPos
from torch import nn

from ..flops import ViTShape, linear_flops, stem_flops
from ..method import Method
from ..packing import TokenBatch
from ..stats import ForwardRecord
from ..step import BlockParts
from .family import Family, cached_block_parts, check_block_types, check_image_size, run_parts
from .timm import TIMM_PREPROCESSING, ATSTimmModel, TimmViT, layer_scale, pool_valid_tokens, qkv_with_biases


class ATSBeit(ATSTimmModel):
    """Mixed in before timm's Beit and VisionTransformerRelPos classes (``BEIT``, ``RELPOS``), whose
    ``forward_head`` pools."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head, its pooling over each image's valid tokens (the mean weighs them by their size)."""
        x = pool_valid_tokens(x, self.global_pool, self._ats.pool_weights, self.num_prefix_tokens)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


def relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A relative position bias [h, N, N] from its table [distances, h] and the index [N, N] of each pair's
    distance (the class token's row and column included)."""
    return table[index].permute(2, 0, 1)


class TimmBeit(TimmViT):
    name = "timm Beit (BEiT, BEiT v2)"
    mixin = ATSBeit
    models = (Beit,)
    #: The keyword a block's own forward takes the shared bias by.
    shared_keyword = "shared_rel_pos_bias"

    def check(self, model: Beit, config: Optional[Method] = None, static: bool = False) -> None:
        check_block_types(model.blocks, {Block: (Attention,)}, "timm's BEiT Block with its Attention")
        Family.check(self, model, config, static)

    def layer_parts(self, block: Block) -> BlockParts:
        attn = block.attn
        return BlockParts(norm1=block.norm1, qkv=partial(qkv_with_biases, attn), num_heads=attn.num_heads,
                          head_dim=attn.qkv.out_features // 3 // attn.num_heads, scale=attn.scale, proj=attn.proj,
                          norm2=block.norm2, mlp=block.mlp, dense=block, training=block.training,
                          attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop,
                          ls1=partial(layer_scale, block, "gamma_1"), drop_path1=block.drop_path1,
                          ls2=partial(layer_scale, block, "gamma_2"), drop_path2=block.drop_path2)

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        patch_embed = model.patch_embed
        grid = self.grid(model, input_size)
        parts = self.layer_parts(model.blocks[0])
        return ViTShape(embed_dim=model.embed_dim, attn_dim=parts.num_heads * parts.head_dim, head_dim=parts.head_dim,
                        mlp_flops=linear_flops(model.blocks[0].mlp), depth=len(model.blocks),
                        num_patches=grid[0] * grid[1], num_prefix_tokens=model.num_prefix_tokens,
                        patch_embed_flops=stem_flops(patch_embed.proj, self.image_size(model, input_size))[0],
                        head_flops=linear_flops(model.head) if isinstance(model.head, nn.Linear) else 0, grid_size=grid,
                        has_class_token=model.cls_token is not None)

    def embed(self, model: Beit, images: torch.Tensor) -> torch.Tensor:
        """Patch and absolute position embedding and the class token: the start of timm's forward_features."""
        check_image_size(images, self.input_size(model), TIMM_PREPROCESSING)
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    def shared_bias(self, model: Beit) -> Optional[torch.Tensor]:
        """The bias [h, N, N] every block adds (``use_shared_rel_pos_bias``), or None."""
        return None if model.rel_pos_bias is None else model.rel_pos_bias()

    def position_biases(self, model: Beit, shared: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Each block's relative position bias [h, N, N] of this forward: its own plus ``shared`` (None where
        it has neither)."""
        biases = []
        for block in model.blocks:
            attn = block.attn
            own = None if attn.relative_position_bias_table is None else relative_bias(
                attn.relative_position_bias_table, attn.relative_position_index)
            biases.append(shared if own is None else own if shared is None else own + shared)
        return biases

    def run_blocks(self, model: Beit, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        """``step.run_blocks`` with each block's position bias of this forward (and its own forward given the
        shared bias)."""
        parts = cached_block_parts(self, model, input_size)
        shared = self.shared_bias(model)
        parts = [part if bias is None else replace(part, position_bias=bias, dense=partial(
            block, **{self.shared_keyword: shared})) for part, bias, block in zip(
            parts, self.position_biases(model, shared), model.blocks)]
        return run_parts(model, parts[:stop], x, shape, start)


class TimmRelPos(TimmBeit):
    name = "timm VisionTransformerRelPos (vit_relpos, vit_srelpos)"
    models = (VisionTransformerRelPos,)
    shared_keyword = "shared_rel_pos"

    def check(self, model: VisionTransformerRelPos, config: Optional[Method] = None, static: bool = False) -> None:
        check_block_types(model.blocks, {RelPosBlock: (RelPosAttention,)}, "timm's pre-norm RelPosBlock",
                          {"ResPostRelPosBlock": "it normalises after each residual branch (a post-norm block); ATS "
                                                 "runs pre-norm blocks"})
        Family.check(self, model, config, static)

    def layer_parts(self, block: RelPosBlock) -> BlockParts:
        attn = block.attn
        return BlockParts(norm1=block.norm1, qkv=attn.qkv, num_heads=attn.num_heads, head_dim=attn.head_dim,
                          scale=attn.scale, proj=attn.proj, norm2=block.norm2, mlp=block.mlp, dense=block,
                          training=block.training, attn_drop=attn.attn_drop.p, q_norm=attn.q_norm, k_norm=attn.k_norm,
                          proj_drop=attn.proj_drop, ls1=block.ls1, drop_path1=block.drop_path1, ls2=block.ls2,
                          drop_path2=block.drop_path2)

    def embed(self, model: VisionTransformerRelPos, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding and the class token (if any): the start of timm's forward_features."""
        self.checked_input_size(model, images)
        x = model.patch_embed(images)
        return x if model.cls_token is None else torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)

    def shared_bias(self, model: VisionTransformerRelPos) -> Optional[torch.Tensor]:
        """The bias [h, N, N] of the blocks without their own (``vit_srelpos_*``), or None."""
        return None if model.shared_rel_pos is None else model.shared_rel_pos.get_bias()[0]

    def position_biases(self, model: VisionTransformerRelPos,
                        shared: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Each block's bias [h, N, N]: its own (``RelPosMlp`` or ``RelPosBias``), else ``shared``."""
        return [shared if block.attn.rel_pos is None else block.attn.rel_pos.get_bias()[0] for block in model.blocks]


BEIT = TimmBeit()
RELPOS = TimmRelPos()
