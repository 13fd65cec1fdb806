"""A convolutional stem as a timm patch embedding (Xiao et al., "Early convolutions help transformers see better",
NeurIPS 2021).

ViT's patch embedding is one linear map per p x p patch. The convolutional stem reaches the same stride with
log2(p) 3x3 stride-2 convolutions (each followed by batch norm and ReLU; the widths double up to the embedding
width), then a 1x1 convolution to the embedding width, so the transformer sees the same tokens in the same grid::

    images [B, C_in, H, W] --3x3/2, BN, ReLU--> ... --3x3/2, BN, ReLU--> [B, D, H/p, W/p] --1x1--> [B, D, H/p, W/p]
        --flatten--> tokens [B, H/p * W/p, D]

Its local, translation-equivariant features make a ViT learn objects at any position and patch offset much faster
(docs/reference-model.md: the cluttered reference model). Pass it as ``embed_layer`` to timm's VisionTransformer;
ATS, the FLOP count (``ats.flops.stem_flops``) and the tools work on the result as on any timm ViT.
"""
from __future__ import annotations

from timm.layers import PatchEmbed
from torch import nn


def stem_widths(embed_dim: int, patch_size: int) -> list[int]:
    """The output widths of the 3x3 stride-2 convolutions that reach stride ``patch_size``: doubling up to
    ``embed_dim``, e.g. [48, 96] for a width of 96 and 4x4 patches."""
    stages = patch_size.bit_length() - 1
    if patch_size < 2 or patch_size != 1 << stages:
        raise ValueError(f"a convolutional stem reaches a power-of-two patch size >= 2 (2, 4, 8, 16, ...), got "
                         f"{patch_size}; use timm's linear patch embedding for other patch sizes")
    if embed_dim % (1 << (stages - 1)):
        raise ValueError(f"embed_dim {embed_dim} must be divisible by {1 << (stages - 1)} to halve it for each of the "
                         f"{stages} stem convolutions")
    return [embed_dim >> (stages - 1 - index) for index in range(stages)]


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` (same arguments, grid and output) with ``proj`` the convolutional stem:
    images [B, C_in, H, W] -> tokens [B, H/p * W/p, embed_dim] (square power-of-two patches only)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"a convolutional stem needs square patches, got {tuple(self.patch_size)}")
        layers, channels = [], self.proj.in_channels
        for width in stem_widths(self.proj.out_channels, self.patch_size[0]):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        self.proj = nn.Sequential(*layers, nn.Conv2d(channels, self.proj.out_channels, 1))
