"""PS-ViT: Vision Transformer with Progressive Sampling (Yue et al., ICCV 2021, arXiv:2108.01684).

Instead of cutting the image into a fixed grid of patches, PS-ViT samples its tokens from a convolutional feature map
at points that it moves itself::

    images [B, C_in, H, W] --stem--> features [B, D, h, w]
        --progressive sampler (num_iterations transformer layers)--> tokens [B, N, D], points [B, N, 2]
        --prepend class token--> [B, 1 + N, D] --blocks, norm--> [B, 1 + N, D] --head on class token--> [B, classes]

with N = num_points ** 2. The sampler starts from a regular num_points x num_points grid. At iteration t it samples
the features at the points p_t by bilinear interpolation, adds a position encoding of p_t and the previous
iteration's output tokens T_{t-1}, and runs one transformer encoder layer: T_t = Block(F(p_t) + W p_t + T_{t-1}).
Every iteration but the last predicts offsets o_t = M_t T_t, and p_{t+1} = p_t + o_t.

Details that follow the authors' code (github.com/yuexy/PS-ViT, models/ps_vit.py) where the paper leaves them open:
each iteration has its own encoder layer and offset head, while the position-encoding layer is one ``nn.Linear(2, D)``
shared by all iterations and fed the points divided by the feature-map size; the offset heads start at zero, so an
untrained model samples the regular grid; the points are detached before they enter the position encoding and the next
iteration, so an offset gets its gradient only through the sampling step it moves; the vision transformer module
prepends a class token, adds no position embedding of its own (the sampled tokens already carry their positions) and
classifies from the class token. Drop-path rates rise linearly over the num_iterations + depth encoder layers.

Differences: the stem is a plain stack of 3x3 conv-BN-ReLU layers and a 1x1 projection (the paper uses ResNet's first
layers) so that small inputs get a cheap stem, and points use grid_sample's align_corners=False convention (pixel
centres at half-integers, see ``sample_features``), which puts the initial grid exactly at the patch centres; the
official CUDA kernel puts pixel centres at integers, half a pixel away.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .init import init_linear

PSVIT_TINY_FMNIST = dict(img_size=28, in_chans=1, num_classes=10, stem_channels=(32, 96), stem_strides=(1, 2),
                         embed_dim=96, num_points=14, num_iterations=4, depth=10, num_heads=3, mlp_ratio=3.0,
                         qkv_bias=True)
"""Fashion-MNIST (28x28 grayscale): a 14x14 feature map, 14 x 14 = 196 sampled tokens plus a class token, width 96,
3 heads, MLP ratio 3 (the paper's), 4 sampling iterations and 10 blocks; qkv biases as in the library's reference
ViT. About 0.37 G multiply-adds per image, near the reference ViT's 0.35."""


def regular_grid(feature_size: int, num_points: int) -> torch.Tensor:
    """The centres of a num_points x num_points grid of equal cells over a feature_size x feature_size map, as (x, y)
    feature-map pixel coordinates (see ``sample_features``) in row-major order: [num_points ** 2, 2]."""
    centres = (torch.arange(num_points, dtype=torch.float32) + 0.5) * (feature_size / num_points)
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack((x, y), dim=-1).reshape(-1, 2)


def sample_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly interpolate ``features`` [B, C, h, w] at ``points`` [B, N, 2]; returns tokens [B, N, C].

    A point is (x, y) in feature-map pixel coordinates: pixel (row i, column j) covers [j, j + 1) x [i, i + 1), so its
    value sits at its centre (j + 0.5, i + 0.5) and the map spans [0, w] x [0, h]. This is grid_sample with
    align_corners=False after mapping [0, w] to [-1, 1]; points near or past the border blend in zeros.
    """
    height, width = features.shape[-2:]
    grid = 2 * points / points.new_tensor([width, height]) - 1
    sampled = F.grid_sample(features, grid.unsqueeze(2), mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.squeeze(3).transpose(1, 2)


class ProgressiveSampler(nn.Module):
    """PS-ViT's progressive sampling module: features [B, D, h, w] -> tokens [B, N, D] and points [B, N, 2].

    Points are (x, y) feature-map pixel coordinates (``sample_features``) and start as ``initial_points``, the
    regular grid [N, 2]. Iteration t samples the features at p_t, adds the position encoding ``pos_embed(p_t / h)``
    and, from the second iteration on, the previous tokens, and runs its own pre-norm encoder layer
    ``blocks[t]``; ``offset_heads[t]`` (one fewer than blocks, zero-initialised by ``reset_offset_heads``) then gives
    offsets in feature-map pixels for the next iteration: p_{t+1} = p_t + o_t.
    """

    def __init__(self, feature_size: int, embed_dim: int, num_points: int, num_iterations: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path_rates: Optional[Sequence[float]] = None):
        super().__init__()
        rates = [0.0] * num_iterations if drop_path_rates is None else list(drop_path_rates)
        if num_iterations < 1 or len(rates) != num_iterations:
            raise ValueError(f"need num_iterations >= 1 and one drop-path rate per iteration, got {num_iterations} "
                             f"iterations and rates {rates}")
        self.feature_size = feature_size
        self.register_buffer("initial_points", regular_grid(feature_size, num_points), persistent=False)
        self.pos_embed = nn.Linear(2, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
                                    for rate in rates)
        self.offset_heads = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(num_iterations - 1))
        self.reset_offset_heads()

    def reset_offset_heads(self) -> None:
        """Zero the offset heads, so the points stay on the regular grid until training moves them."""
        for head in self.offset_heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """features [B, D, feature_size, feature_size] -> (tokens [B, N, D], the last iteration's points [B, N, 2])."""
        points = self.initial_points.expand(features.shape[0], -1, -1)
        tokens = None
        for t, block in enumerate(self.blocks):
            if tokens is not None:
                points = points.detach() + self.offset_heads[t - 1](tokens)
            x = sample_features(features, points) + self.pos_embed(points.detach() / self.feature_size)
            tokens = block(x if tokens is None else x + tokens)
        return tokens, points.detach()


def conv_bn_relu(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    """3x3 convolution (padding 1), batch norm and ReLU.

    [B, in_chans, H, W] -> [B, out_chans, ceil(H / stride), ceil(W / stride)].
    """
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True))


class PSViT(nn.Module):
    """PS-ViT classifier; the defaults follow PS-ViT-B/14 (width 384, 6 heads, MLP ratio 3, 4 sampling iterations,
    10 blocks, 14 x 14 points on a 56 x 56 feature map of 224 x 224 images) with a lighter stem.

    Args:
        img_size: side of the square input images the model accepts.
        in_chans: channels of the input images.
        num_classes: classifier outputs.
        stem_channels: output channels of the stem's 3x3 conv-BN-ReLU layers; a 1x1 convolution then projects to
            embed_dim.
        stem_strides: stride of each of those layers; the feature map's side is img_size divided by their product,
            rounded up at each layer.
        embed_dim: token width.
        num_points: points per side of the sampling grid; the model has num_points ** 2 patch tokens.
        num_iterations: sampling iterations, one encoder layer each.
        depth: transformer blocks after the sampler.
        num_heads: attention heads in every encoder layer.
        mlp_ratio: MLP hidden width over embed_dim.
        qkv_bias: whether the attention's qkv projections have biases.
        drop_path_rate: stochastic depth of the last encoder layer, rising linearly from 0 over the sampler's layers
            and then the blocks.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 stem_channels: Sequence[int] = (64, 128), stem_strides: Sequence[int] = (2, 2), embed_dim: int = 384,
                 num_points: int = 14, num_iterations: int = 4, depth: int = 10, num_heads: int = 6,
                 mlp_ratio: float = 3.0, qkv_bias: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        if len(stem_channels) != len(stem_strides):
            raise ValueError(f"stem_channels {tuple(stem_channels)} and stem_strides {tuple(stem_strides)} "
                             "need one entry per stem layer")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.embed_dim, self.num_points, self.depth = embed_dim, num_points, depth
        self.num_prefix_tokens = 1

        widths = [in_chans, *stem_channels]
        convs = [conv_bn_relu(c_in, c_out, stride) for c_in, c_out, stride in zip(widths, widths[1:], stem_strides)]
        self.stem = nn.Sequential(*convs, nn.Conv2d(widths[-1], embed_dim, 1))
        self.feature_size = img_size
        for stride in stem_strides:
            self.feature_size = (self.feature_size - 1) // stride + 1

        rates = torch.linspace(0, drop_path_rate, num_iterations + depth).tolist()
        self.sampler = ProgressiveSampler(self.feature_size, embed_dim, num_points, num_iterations, num_heads,
                                          mlp_ratio, qkv_bias, rates[:num_iterations])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                            drop_path=rate) for rate in rates[num_iterations:]))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)
        self.sampler.reset_offset_heads()

    def sample_tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images [B, in_chans, img_size, img_size] -> (tokens [B, N, D], points [B, N, 2] in feature-map pixels)."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"PSViT expects images of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(images.shape)}")
        return self.sampler(self.stem(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the blocks' input [B, 1 + N, D]: the class token, then the sampled tokens."""
        tokens, _ = self.sample_tokens(images)
        return torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> normalised block outputs [B, 1 + N, D]."""
        return self.norm(self.blocks(self.embed(images)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, 1 + N, D] -> logits [B, num_classes] from the class token."""
        return self.head(features[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_chans, img_size, img_size] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(images))
