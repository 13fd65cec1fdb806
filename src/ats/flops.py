"""The FLOP formula (one multiply-add = one FLOP, as fvcore and the paper count).

A block on n_in tokens that keeps n_out of them (n_out = n_in for a standard block):
qkv ``3 n_in C A``, scores (ATS only), attention ``2 n_out n_in A``, proj ``n_out A C``,
MLP ``n_out M`` (C width, A attention width, M the MLP's multiply-adds per token: ``2 C H`` for a
two-layer MLP of hidden width H, ``3 C H`` for a gated one). With A = C and H = rC a standard block
is ``(4 + 2r) n C^2 + 2 n^2 C``. Fusing dropped tokens into kept ones adds their
similarities ``(n_in - n_out) n_out d`` (d head width); a token-merging block attends with all
n_in queries, matches ``(n_in / 2)^2 d`` pairs and runs its MLP on n_out tokens; an EViT block
attends with all n_in queries, averages its inattentive tokens into one and runs its MLP on n_out.
A CvT block with convolutional projections runs a depthwise k x k convolution (``k^2 C`` per output
position) for the queries and for the keys and values, on the patch grid; the prefix tokens bypass
them; its (strided) key grid sets the keys the attention sees. A divided space-time block (TimeSformer)
on a clip of T frames, n_in positions (tubes, the class token included) of which it keeps n_out, runs
a temporal attention over each patch tube's T frames (qkv, attention, proj and a C x C dense layer per
patch token), a spatial attention in each frame (the class token takes part in every frame) and its
MLP on the class token and the kept patch tokens. A space-time mixing block (XViT) is a standard block
in each frame: mixing its keys and values over frames moves channels and multiplies nothing. Fusing
tubes compares them frame by frame, so its similarities cost those of a token in each of the T frames. An
attention-pool head (a few latent queries attending over the tokens that leave the last block, as
SigLIP's) costs, per token it reads, its key and value projection and ``2 L A`` for the attention of
its L queries; the rest of the head is fixed. Norms, softmax, activations and other elementwise work
(rotary position embeddings, relative position biases added to the logits, SwiGLU's gating product)
are not counted: a FLOP is a multiply-add of a matrix product or convolution, as PyTorch's
FlopCounterMode counts them (it counts 2 per multiply-add).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

Count = Union[int, torch.Tensor]
BlockCost = Callable[[Count, Count], Count]


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a ViT that its FLOPs depend on (each family adapter reads them off its models)."""

    embed_dim: int
    attn_dim: int
    head_dim: int
    mlp_flops: int
    depth: int
    num_patches: int
    num_prefix_tokens: int
    patch_embed_flops: int
    head_flops: int
    grid_size: Tuple[int, int]
    #: FLOPs of an attention-pool head per token it reads (``attention_pool_token_flops``), 0 for other heads.
    head_token_flops: int = 0
    #: Whether that head reads the prefix tokens too (else the patch tokens only).
    head_reads_prefix: bool = True
    #: Whether the first prefix token is a class token (ATS's default score reads its attention).
    has_class_token: bool = True

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens


def linear_flops(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear inside ``module`` (an MLP, a head)."""
    return sum(layer.in_features * layer.out_features for layer in module.modules() if isinstance(layer, nn.Linear))


def patch_grid(image_size: Sequence[int], patch_size: Sequence[int], input_size: Optional[Sequence[int]] = None,
               padded: bool = False) -> Tuple[int, int]:
    """The patch grid (rows, columns) of ``input_size`` (C, H, W), default the model's ``image_size`` (H, W);
    ``padded``: the image is padded to a multiple of the patch size (timm's ``dynamic_img_pad``)."""
    height, width = image_size
    if input_size is not None:
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
        height, width = input_size[1:]
    patch_h, patch_w = patch_size
    if padded:
        return -(-height // patch_h), -(-width // patch_w)
    if height % patch_h or width % patch_w:
        raise ValueError(f"input size {height}x{width} is not a multiple of the patch size "
                         f"{patch_h}x{patch_w}; resize the images to a multiple")
    return height // patch_h, width // patch_w


def conv_flops(conv: nn.Module, grid: Tuple[int, ...]) -> int:
    """FLOPs of a convolution (a patch embedding, a stem layer, a depthwise projection; a video's tubelet
    embedding in 3-d) that emits a grid of (rows, columns), or (frames, rows, columns):
    ``positions x C_out x C_in / groups x kernel volume``."""
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)) or len(grid) != len(conv.kernel_size):
        raise TypeError(f"cannot count FLOPs of a {type(conv).__name__} patch embedding on a {len(grid)}-d grid "
                        "(expected Conv2d, or Conv3d for clips)")
    return math.prod(grid) * conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)


def conv_output_grid(conv: nn.Conv2d, grid: Tuple[int, int]) -> Tuple[int, int]:
    """The (rows, columns) ``conv`` emits on an input of (rows, columns)."""
    return tuple((size + 2 * padding - kernel) // stride + 1
                 for size, padding, kernel, stride in zip(grid, conv.padding, conv.kernel_size, conv.stride))


def stem_convolutions(stem: nn.Module) -> List[nn.Conv2d]:
    """The convolutions of a stem (one patch-embedding convolution, or a sequence of them), in module order."""
    convolutions = [module for module in stem.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise TypeError(f"cannot count FLOPs of a {type(stem).__name__} patch embedding (expected Conv2d layers)")
    return convolutions


def stem_flops(stem: nn.Module, grid: Tuple[int, int]) -> Tuple[int, Tuple[int, int]]:
    """FLOPs of the convolutions of a stem on an input of (rows, columns), and the grid it emits; its norms and
    activations are not counted."""
    flops = 0
    for conv in stem_convolutions(stem):
        grid = conv_output_grid(conv, grid)
        flops += conv_flops(conv, grid)
    return flops, grid


def attention_pool_token_flops(kv_flops: int, queries: int, attn_dim: int) -> int:
    """FLOPs an attention-pool head spends on each token it reads: its keys and values (``kv_flops``, the
    multiply-adds of their projection) and the attention of its ``queries`` latent queries (``2 L A``)."""
    return kv_flops + 2 * queries * attn_dim


def head_cost(shape: ViTShape, n_out: Count) -> Count:
    """FLOPs of the head on the n_out tokens (prefix included) leaving the last block."""
    read = n_out if shape.head_reads_prefix else n_out - shape.num_prefix_tokens
    return shape.head_flops + read * shape.head_token_flops


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
    flops = _attention_flops(shape, n_in, n_out) + n_out * shape.mlp_flops + similarity_flops(shape, n_in, n_out,
                                                                                             fuse, distinct)
    if score is not None:
        flops = flops + score_flops(shape, n_in, score)
    return flops


def similarity_flops(shape: ViTShape, n_in: Count, n_out: Count, fuse: bool, distinct: bool) -> Count:
    """Cost of the key similarities of an ATS block that fuses (dropped against kept, ``(n_in - n_out) n_out d``)
    or keeps distinct tokens (every pair, ``n_in^2 d``, which also serves fusing); 0 with neither."""
    if distinct:
        return n_in * n_in * shape.head_dim
    if fuse:
        return (n_in - n_out) * n_out * shape.head_dim
    return 0


def divided_block_flops(shape: ViTShape, frames: int, n_in: Count, n_out: Count, score: Optional[str] = None,
                        fuse: bool = False, distinct: bool = False) -> Count:
    """FLOPs of one divided space-time block on a clip of ``frames`` frames with n_in positions (prefix
    included) that keeps n_out; score: None for a standard block, "cls" for an ATS block (per frame);
    fuse, distinct: as in ``block_flops``, the similarities of tubes costing those of a token in every frame."""
    c, a = shape.embed_dim, shape.attn_dim
    prefix = shape.num_prefix_tokens
    temporal = (n_in - prefix) * frames * (3 * c * a + 2 * frames * a + a * c + c * c)
    spatial = frames * _attention_flops(shape, n_in, n_out)
    if score is not None:
        spatial = spatial + frames * score_flops(shape, n_in, score)
    similarities = frames * similarity_flops(shape, n_in, n_out, fuse, distinct)
    return temporal + spatial + similarities + (prefix + (n_out - prefix) * frames) * shape.mlp_flops


def frames_block_flops(shape: ViTShape, frames: int, n_in: Count, n_out: Count, score: Optional[str] = None,
                       fuse: bool = False, distinct: bool = False) -> Count:
    """FLOPs of one space-time mixing block on a clip of ``frames`` frames with n_in positions (tubes, prefix
    included) that keeps n_out: a standard (or ATS, with ``score``, ``fuse``, ``distinct``) block in every frame."""
    return frames * block_flops(shape, n_in, n_out, score, fuse, distinct)


def merge_block_flops(shape: ViTShape, n_in: Count, n_out: Count) -> Count:
    """FLOPs of a token-merging block: full attention, bipartite matching, MLP on the merged tokens."""
    side = n_in / 2
    return (_attention_flops(shape, n_in, n_in) + side * side * shape.head_dim
            + n_out * shape.mlp_flops)


def evit_block_flops(shape: ViTShape, n_in: Count, n_out: Count) -> Count:
    """FLOPs of an EViT block: full attention, MLP on the n_out tokens it keeps (the fused one included)
    and the weighted sum of the inattentive tokens (counted as ``(n_in - n_out) C``)."""
    return _attention_flops(shape, n_in, n_in) + n_out * shape.mlp_flops + (n_in - n_out) * shape.embed_dim


def conv_projection_block_flops(embed_dim: int, mlp_flops: int, num_prefix_tokens: int, query_grid: Tuple[int, int],
                                key_grid: Tuple[int, int], kernel_size: int) -> int:
    """FLOPs of one CvT block with convolutional q/k/v projections on a full patch grid (attention width
    = embed_dim). query_grid, key_grid: the (rows, columns) the query and the key/value convolutions
    emit (strided convolutions emit smaller grids)."""
    c = embed_dim
    query_positions, key_positions = query_grid[0] * query_grid[1], key_grid[0] * key_grid[1]
    n_queries, n_keys = query_positions + num_prefix_tokens, key_positions + num_prefix_tokens
    convolutions = kernel_size * kernel_size * c * (query_positions + 2 * key_positions)
    linear = n_queries * c * c + 2 * n_keys * c * c
    return convolutions + linear + 2 * n_queries * n_keys * c + n_queries * c * c + n_queries * mlp_flops


def vit_flops(shape: ViTShape, tokens_in: torch.Tensor, tokens_out: torch.Tensor,
              block_costs: Mapping[int, BlockCost]) -> torch.Tensor:
    """FLOPs per image of a whole forward.

    tokens_in, tokens_out: [B, depth] tokens each block took in and emitted; block_costs: the
    cost function (n_in, n_out) -> FLOPs of each block that is not a standard one. Returns [B] float64.
    """
    tokens_in = tokens_in.to(torch.float64)
    tokens_out = tokens_out.to(torch.float64)
    total = head_cost(shape, tokens_out[:, -1]) + shape.patch_embed_flops
    for index in range(shape.depth):
        cost = block_costs.get(index)
        n_in, n_out = tokens_in[:, index], tokens_out[:, index]
        total = total + (block_flops(shape, n_in, n_out) if cost is None else cost(n_in, n_out))
    return total
