"""The FLOP formula (one multiply-add = one FLOP, as fvcore and the paper count).

A block on n_in tokens that keeps n_out of them (n_out = n_in for a standard block):
qkv ``3 n_in C A``, scores (ATS only), attention ``2 n_out n_in A``, proj ``n_out A C``,
MLP ``2 n_out C H`` (C width, A attention width, H MLP hidden width). With A = C and H = rC a
standard block is ``(4 + 2r) n C^2 + 2 n^2 C``. Fusing dropped tokens into kept ones adds their
similarities ``(n_in - n_out) n_out d`` (d head width); a token-merging block attends with all
n_in queries, matches ``(n_in / 2)^2 d`` pairs and runs its MLP on n_out tokens.
Norms, softmax and activations are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

Count = Union[int, torch.Tensor]
BlockCost = Callable[[Count, Count], Count]


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a ViT that its FLOPs depend on."""

    embed_dim: int
    attn_dim: int
    head_dim: int
    mlp_hidden: int
    depth: int
    num_patches: int
    num_prefix_tokens: int
    patch_embed_flops: int
    head_flops: int

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @classmethod
    def from_model(cls, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> "ViTShape":
        """Read the sizes off a timm VisionTransformer; input_size (C, H, W) defaults to the model's."""
        patch_embed = model.patch_embed
        proj = patch_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f"cannot count FLOPs of a {type(proj).__name__} patch embedding (expected Conv2d)")
        grid = patch_embed.grid_size
        if input_size is not None:
            if len(input_size) != 3:
                raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
            height, width = input_size[1:]
            patch_h, patch_w = patch_embed.patch_size
            if height % patch_h or width % patch_w:
                raise ValueError(f"input size {height}x{width} is not a multiple of the patch size "
                                 f"{patch_h}x{patch_w}; resize the images to a multiple")
            grid = (height // patch_h, width // patch_w)
        num_patches = grid[0] * grid[1]
        block = model.blocks[0]
        heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None))
                 if isinstance(m, nn.Linear)]
        return cls(
            embed_dim=model.embed_dim,
            attn_dim=block.attn.qkv.out_features // 3,
            head_dim=block.attn.head_dim,
            mlp_hidden=block.mlp.fc1.out_features,
            depth=len(model.blocks),
            num_patches=num_patches,
            num_prefix_tokens=model.num_prefix_tokens,
            patch_embed_flops=num_patches * proj.out_channels * proj.in_channels * proj.kernel_size[0]
            * proj.kernel_size[1],
            head_flops=sum(head.in_features * head.out_features for head in heads),
        )


def score_flops(shape: ViTShape, n_in: Count, score: str) -> Count:
    """Cost of the significance scores: the class-token row, or every row for self-attention."""
    if score == "cls":
        return n_in * shape.attn_dim
    return n_in * n_in * shape.attn_dim


def _attention_flops(shape: ViTShape, n_keys: Count, n_queries: Count) -> Count:
    """qkv of every key token, attention of the queries, and their output projection."""
    a = shape.attn_dim
    return 3 * n_keys * shape.embed_dim * a + 2 * n_queries * n_keys * a + n_queries * a * shape.embed_dim


def block_flops(shape: ViTShape, n_in: Count, n_out: Count, score: Optional[str] = None,
                fuse: bool = False, distinct: bool = False) -> Count:
    """FLOPs of one block taking n_in tokens and emitting n_out (ints or [B] tensors).

    score: None for a standard block, else the ATS score variant ("cls" or "self_attention");
    fuse: the dropped tokens are folded into their most similar kept ones;
    distinct: every pair of tokens is compared (dropped tokens unlike any kept one are kept too).
    """
    flops = _attention_flops(shape, n_in, n_out) + 2 * n_out * shape.embed_dim * shape.mlp_hidden
    if score is not None:
        flops = flops + score_flops(shape, n_in, score)
    if distinct:
        flops = flops + n_in * n_in * shape.head_dim
    elif fuse:
        flops = flops + (n_in - n_out) * n_out * shape.head_dim
    return flops


def merge_block_flops(shape: ViTShape, n_in: Count, n_out: Count) -> Count:
    """FLOPs of a token-merging block: full attention, bipartite matching, MLP on the merged tokens."""
    side = n_in / 2
    return (_attention_flops(shape, n_in, n_in) + side * side * shape.head_dim
            + 2 * n_out * shape.embed_dim * shape.mlp_hidden)


def vit_flops(shape: ViTShape, tokens_in: torch.Tensor, tokens_out: torch.Tensor,
              block_costs: Mapping[int, BlockCost]) -> torch.Tensor:
    """FLOPs per image of a whole forward.

    tokens_in, tokens_out: [B, depth] tokens each block took in and emitted; block_costs: the
    cost function (n_in, n_out) -> FLOPs of each block that is not a standard one. Returns [B] float64.
    """
    tokens_in = tokens_in.to(torch.float64)
    tokens_out = tokens_out.to(torch.float64)
    total = torch.full_like(tokens_in[:, 0], float(shape.patch_embed_flops + shape.head_flops))
    for index in range(shape.depth):
        cost = block_costs.get(index)
        n_in, n_out = tokens_in[:, index], tokens_out[:, index]
        total = total + (block_flops(shape, n_in, n_out) if cost is None else cost(n_in, n_out))
    return total


def dense_flops(shape: ViTShape) -> int:
    """FLOPs of the unpatched model on one image."""
    n = shape.num_tokens
    return shape.patch_embed_flops + shape.head_flops + shape.depth * block_flops(shape, n, n)
