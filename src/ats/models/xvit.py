"""XViT: Space-time Mixing Attention for Video Transformer (Bulat et al., NeurIPS 2021, arXiv:2106.05968).

XViT is an image ViT run on every frame of a clip, whose attention looks across time at no extra cost::

    clips [B, T, C_in, H, W] --patch embedding per frame, + space and time embeddings,
        a class token per frame--> [B, T, 1 + S, D] --blocks--> --norm-->
        class tokens [B, T, D] --temporal aggregation (one attention layer over the T frames)--> mean --> head

Space-time mixing attention: the queries of frame t attend over the 1 + S tokens of frame t only (the cost of
spatial attention, O(T S^2)), but each key and value is mixed from the same position in the frames of a local
window t - w .. t + w: of every head's d channels, a share ``mix`` is taken from the 2w neighbouring frames
(equal groups, t - w first) and the rest from frame t; frames past the clip's ends give zeros (a channel shift,
as in TSM). The depth of the network then covers the whole clip. ``mix_frames`` is that mixing on plain tensors.

Differences from the paper, which initialises from an ImageNet ViT at 224 x 224: the sizes are free, the time
embedding is learnt from scratch, and the temporal aggregation is one pre-norm attention block over the T class
tokens followed by their mean (the paper's lightweight temporal attention on the class tokens).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .init import init_linear

XVIT_TINY_GARMENTS = dict(img_size=64, patch_size=8, in_chans=1, num_frames=8, num_classes=20, embed_dim=64, depth=8,
                          num_heads=2, mlp_ratio=4.0, window=1, mix=0.5, qkv_bias=True)
"""Moving-garment clips (``ats.data.moving_garments``): 8 frames of 64 x 64 with 8 x 8 patches (64 positions), width 64,
2 heads, 8 blocks, a window of t - 1 .. t + 1 with half of every head's key and value channels from the neighbours;
the sizes of the reference TimeSformer, so the two are comparable."""


def mix_frames(x: torch.Tensor, window: int, mix: float, num_heads: int) -> torch.Tensor:
    """Space-time mixing of keys or values x [..., T, A] (A = num_heads * d, frames on dim -2).

    In each head, channels [g * j, g * (j + 1)) for j < 2 * window come from frame t + o_j with offsets
    o = -window .. -1, 1 .. window and g = round(mix * d / (2 * window)); the rest from frame t. Frames outside the
    clip contribute zeros. Returns a tensor of x's shape."""
    frames, width = x.shape[-2:]
    head_dim = width // num_heads
    group = round(mix * head_dim / (2 * window))
    offsets = [*range(-window, 0), *range(1, window + 1)]
    heads = x.unflatten(-1, (num_heads, head_dim))
    pieces = []
    for j, offset in enumerate(offsets):
        channels = heads[..., group * j:group * (j + 1)]
        pieces.append(_shift_frames(channels, offset, frames))
    pieces.append(heads[..., group * len(offsets):])
    return torch.cat(pieces, dim=-1).flatten(-2)


def _shift_frames(x: torch.Tensor, offset: int, frames: int) -> torch.Tensor:
    """y[..., t, :, :] = x[..., t + offset, :, :] (zeros where t + offset is outside 0 .. frames - 1)."""
    if abs(offset) >= frames:
        return torch.zeros_like(x)
    dim = x.ndim - 3
    if offset < 0:
        kept = x.narrow(dim, 0, frames + offset)
        return torch.cat((torch.zeros_like(x.narrow(dim, 0, -offset)), kept), dim=dim)
    kept = x.narrow(dim, offset, frames - offset)
    return torch.cat((kept, torch.zeros_like(x.narrow(dim, 0, offset))), dim=dim)


class MixingAttention(nn.Module):
    """Space-time mixing attention on frames x [B, T, N, D] -> [B, T, N, D]."""

    def __init__(self, dim: int, num_heads: int, window: int = 1, mix: float = 0.5, qkv_bias: bool = False,
                 attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        if window < 1 or not 0.0 < mix <= 1.0:
            raise ValueError(f"need window >= 1 and 0 < mix <= 1, got window={window}, mix={mix}")
        self.num_heads, self.head_dim, self.window, self.mix = num_heads, dim // num_heads, window, mix
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def mix_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [..., T, 3A] (frames on dim -2) -> the same with keys and values mixed over frames."""
        q, k, v = qkv.chunk(3, dim=-1)
        mixed = (mix_frames(part, self.window, self.mix, self.num_heads) for part in (k, v))
        return torch.cat((q, *mixed), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, dim = x.shape
        qkv = self.mix_qkv(self.qkv(x).transpose(1, 2)).transpose(1, 2)
        q, k, v = qkv.reshape(batch * frames, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, frames, tokens, dim))


class XViTBlock(nn.Module):
    """A pre-norm block with space-time mixing attention on frames x [B, T, N, D]; stochastic depth per clip."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, window: int = 1, mix: float = 0.5,
                 qkv_bias: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MixingAttention(dim, num_heads, window, mix, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class XViT(nn.Module):
    """XViT video classifier; the defaults follow XViT-B/16 (ViT-B/16 on 8 frames of 224 x 224, window 1).

    Args:
        img_size: side of the square frames.
        patch_size: side of the square patches (S = (img_size / patch_size) ** 2 positions per frame).
        in_chans: channels per frame.
        num_frames: frames per clip, at least 2 * window + 1.
        num_classes: classifier outputs.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT's.
        window: the temporal window's radius w (keys and values mix frames t - w .. t + w).
        mix: the share of every head's key and value channels taken from the neighbouring frames.
        drop_path_rate: stochastic depth of the last block, rising linearly from 0.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_frames: int = 8,
                 num_classes: int = 400, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, window: int = 1, mix: float = 0.5, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if num_frames < 2 * window + 1:
            raise ValueError(f"num_frames={num_frames} is fewer than the temporal window's {2 * window + 1} frames "
                             f"(window={window}); use at least {2 * window + 1} frames or a smaller window")
        self.img_size, self.in_chans, self.num_frames, self.num_classes = img_size, in_chans, num_frames, num_classes
        self.embed_dim, self.window, self.mix = embed_dim, window, mix
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        positions = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, 1 + positions, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(XViTBlock(embed_dim, num_heads, mlp_ratio, window, mix, qkv_bias, rate)
                                    for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.temporal_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.temporal_block = Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.temporal_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        for parameter in (self.cls_token, self.pos_embed, self.time_embed, self.temporal_embed):
            trunc_normal_(parameter, std=0.02)
        self.apply(init_linear)

    @property
    def input_size(self) -> Tuple[int, int, int, int]:
        """(frames, channels, height, width) of the clips the model takes."""
        return self.num_frames, self.in_chans, self.img_size, self.img_size

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        """clips [B, T, C_in, H, W] -> the blocks' input [B, T, 1 + S, D] (a class token first in every frame)."""
        if clips.ndim != 5 or tuple(clips.shape[1:]) != self.input_size:
            raise ValueError(f"XViT expects clips of shape [B, {', '.join(map(str, self.input_size))}] (frames, "
                             f"channels, height, width), got {list(clips.shape)}")
        batch = clips.shape[0]
        patches = self.patch_embed(clips.flatten(0, 1)).unflatten(0, (batch, self.num_frames))
        cls = self.cls_token.expand(batch, self.num_frames, -1, -1)
        return torch.cat((cls, patches), dim=2) + self.pos_embed + self.time_embed

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips -> normalised block outputs [B, T, 1 + S, D]."""
        x = self.embed(clips)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, m, D] -> logits [B, num_classes] from the T class tokens (token 0 of every frame)."""
        frames = self.temporal_block(features[:, :, 0] + self.temporal_embed)
        return self.head(self.temporal_norm(frames).mean(dim=1))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips [B, num_frames, in_chans, img_size, img_size] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(clips))
