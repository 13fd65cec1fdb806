"""The adapter for timm's VisionTransformer (DeiT, distilled DeiT, ViT, register tokens, no class token,
SigLIP's attention-pool head), and what the timm families share.

The patched model's ``forward_features`` runs the blocks through ``ats.step.run_blocks``; its pooling
reads each image's valid tokens only, the mean and the attention pool weighing them by their size;
``forward_head`` and everything else is timm's. Under a config's ``restore``, ``forward_features`` and
``forward_intermediates`` (with it timm's ``features_only`` models) return the full token grid, and ``forward``
still classifies from the kept tokens.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm.data
import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, HybridEmbed
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..flops import ViTShape, attention_pool_token_flops, linear_flops, patch_grid, stem_convolutions, stem_flops
from ..method import Method
from ..packing import TokenBatch
from ..step import BlockParts, identity
from .family import (
    Family,
    PatchedModel,
    check_block_types,
    check_image_size,
    fit_channels,
    masked_features,
    run_patched,
    tapped_maps,
    token_map,
    valid_mean,
)

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "", "map")
#: How to make images a timm model takes.
TIMM_PREPROCESSING = ("resize and normalise them with the model's data config "
                      "(timm.data.resolve_data_config(model=model))")
#: Why ATS refuses the other blocks and attentions of timm's ViTs, by class name.
REFUSED_BLOCKS = {
    "ParallelThingsBlock": "it runs two or more attention branches side by side on the same tokens, each with its "
                           "own class attention, and ATS samples from one block's; it would need a rule that "
                           "combines the branches' scores, which it does not have",
    "ParallelScalingBlock": "its attention and MLP run in parallel from one fused projection of the same normed "
                            "tokens, so there is no attention half before the MLP in which to sample",
    "DiffParallelScalingBlock": "its attention and MLP run in parallel from one fused projection, and its "
                                "differential attention has no single class-attention distribution",
    "ResPostBlock": "it normalises after each residual branch (a post-norm block); ATS runs pre-norm blocks",
    "DiffAttention": "differential attention subtracts two softmax maps, so there is no single class-attention "
                     "distribution to sample from",
}


def pool_valid_tokens(x: torch.Tensor, pool_type: str, weights: torch.Tensor, start: int) -> torch.Tensor:
    """timm's global pooling of features x [B, m, C] over each image's valid tokens from position ``start``
    on: the mean weighs them by ``weights`` [B, m] (each token's size, 0 on padding), the max skips padding;
    "token" reads position 0 and "" returns x as it is."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    mean = valid_mean(x, weights, start)
    if pool_type == "avg":
        return mean
    peak = x[:, start:].masked_fill(weights[:, start:, None] == 0, float("-inf")).amax(dim=1)
    return peak if pool_type == "max" else 0.5 * (peak + mean)


def attention_pool(pool: AttentionPoolLatent, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """timm's attention-pool head on features x [B, m, C] whose tokens weigh ``weights`` [B, m] (each token's
    size, 0 on padding): its queries attend over the valid tokens, proportionally to their size."""
    return pool(x, attn_mask=weights.log()[:, None, None, :])


def check_attention_pool(pool: Optional[nn.Module]) -> None:
    """Raise TypeError unless ``pool`` is None or an attention-pool head ATS can run on packed tokens."""
    if pool is None:
        return
    if type(pool) is not AttentionPoolLatent or pool.pos_embed is not None:
        raise TypeError(f"the attention pool {type(pool).__name__} is not supported; ATS runs timm's "
                        "AttentionPoolLatent without a position embedding of its own")


def attention_pool_flops(pool: Optional[nn.Module]) -> Tuple[int, int]:
    """An attention-pool head's FLOPs per image (its latent queries, projection and MLP) and per token it reads
    (``flops.attention_pool_token_flops``); (0, 0) for None."""
    if pool is None:
        return 0, 0
    kv = linear_flops(pool.kv)
    return pool.latent_len * (linear_flops(pool) - kv), attention_pool_token_flops(
        kv, pool.latent_len, pool.num_heads * pool.head_dim)


def qkv_with_biases(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The q, k and v rows [T, 3A] of normed rows x [T, C] of a timm attention whose projection keeps its
    biases apart (``q_bias``, ``k_bias``, ``v_bias``, as BEiT and EVA do) or that has three projections."""
    if attn.qkv is None:
        return torch.cat((attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), dim=-1)
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + bias
    return F.linear(x, attn.qkv.weight, bias)


def layer_scale(block: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """x times the block's layer-scale parameter ``name`` (``gamma_1``, ``gamma_2``), or x where it has none."""
    gamma = getattr(block, name)
    return x if gamma is None else gamma * x


class ATSTimmModel(PatchedModel):
    """What the timm families' mixins share: ``forward`` classifies from the kept tokens; ``forward_features``,
    ``forward_tokens`` and ``forward_intermediates`` run the blocks through ``run_patched`` and return the kept
    tokens, or under the config's ``restore`` the full grid (``forward_intermediates`` only then); timm's
    ``forward_head`` and the rest are the model's."""

    restores = True

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> class logits from the kept tokens (whatever ``restore`` says), as timm's
        ``forward_head(forward_features(x))``."""
        refuse_masks(attn_mask, is_causal)
        batch = run_patched(self, self._ats.family.embed(self, x), 0, tuple(x.shape[1:]))
        return self.ats_logits(batch)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, m, C'], valid tokens first, zeros on padding; under
        ``restore`` the full map [B, prefix + H * W, C'] in the original order."""
        refuse_masks(attn_mask, is_causal)
        return self.forward_tokens(self._ats.family.embed(self, x), input_size=tuple(x.shape[1:]))

    def forward_tokens(self, x: torch.Tensor, start: int = 0,
                       input_size: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """Run the blocks from ``start`` on the tokens x [B, N, C'] the blocks before it made (all N of them: an
        evaluation of several configs computes them once), for images of ``input_size`` (C, H, W; default the
        model's). Returns normalised tokens as ``forward_features`` does."""
        batch = run_patched(self, x, start, input_size or self._ats.family.input_size(self))
        return token_map(self, batch, self.norm)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """timm's ``forward_intermediates`` under the config's ``restore``: every intermediate the full grid
        ([B, C', H, W] for "NCHW", [B, H * W, C'] for "NLC"; prefix tokens apart), each restored from the tokens
        dropped up to its block. Refused without ``restore``: the kept tokens differ per image."""
        if not self._ats.config.restore:
            raise NotImplementedError("forward_intermediates of a patched model needs the full token grid: patch with "
                                      "a restore rule (e.g. ats.ATSConfig.multi_stage(0.7, restore='mix')), or "
                                      "ats.unpatch(model) first; forward_features and ats.last_stats(model) give "
                                      "the kept tokens")
        refuse_masks(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        family = self._ats.family
        take, last = feature_take_indices(len(family.blocks(self)), indices)
        batch = run_patched(self, family.embed(self, x), 0, tuple(x.shape[1:]), last + 1 if stop_early else None,
                            taps=take)
        maps = tapped_maps(self, self.norm if norm else identity)
        prefix = self.num_prefix_tokens
        intermediates = [maps[index][:, prefix:] for index in take]
        prefix_tokens = [maps[index][:, :prefix] for index in take] if prefix else None
        if output_fmt == "NCHW":
            rows, columns = self._ats.last_stats.grid_size
            intermediates = [y.unflatten(1, (rows, columns)).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result = dict(image_intermediates=intermediates)
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = token_map(self, batch, self.norm)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (token_map(self, batch, self.norm), intermediates)

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        return self.forward_head(masked_features(batch, self.norm(batch.rows)))


def refuse_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Raise ValueError when a caller passes timm's attention mask or causal flag: ATS makes its own masks."""
    if attn_mask is not None or is_causal:
        raise ValueError("a patched model takes no attn_mask or is_causal: ATS makes its own masks; "
                         "ats.unpatch(model) to use them")


class ATSVisionTransformer(ATSTimmModel):
    """Mixed in before a timm VisionTransformer class; ``TIMM`` is the adapter."""

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling over each image's valid tokens (``pool_valid_tokens``, ``attention_pool``)."""
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weights = self._ats.pool_weights
        if self.attn_pool is not None:
            return attention_pool(self.attn_pool, x[:, start:], weights[:, start:])
        return pool_valid_tokens(x, self.global_pool if pool_type is None else pool_type, weights, start)


class TimmViT(Family):
    name = "timm VisionTransformer (DeiT, ViT, SigLIP, ...)"
    mixin = ATSVisionTransformer
    models = (VisionTransformer,)

    def check(self, model: VisionTransformer, config: Optional[Method] = None, static: bool = False) -> None:
        if isinstance(model.patch_embed, HybridEmbed):
            raise TypeError(f"this model has a convolutional stage ({type(model.patch_embed.backbone).__name__}) "
                            "before its ViT blocks (a HybridEmbed patch embedding: ViTamin, the ResNet hybrids); ATS "
                            "supports patch embeddings of convolutions alone, whose FLOPs and input size it reads")
        check_block_types(model.blocks, {Block: (Attention,)}, "timm's pre-norm Block with its standard Attention",
                          REFUSED_BLOCKS)
        if model.global_pool not in SUPPORTED_POOLS:
            raise TypeError(f"global_pool={model.global_pool!r} is not supported; ATS works with "
                            f"{', '.join(map(repr, SUPPORTED_POOLS))} pooling")
        check_attention_pool(model.attn_pool)
        super().check(model, config, static)

    def blocks(self, model: VisionTransformer) -> Sequence[nn.Module]:
        return model.blocks

    def block_parts(self, model: VisionTransformer, input_size: Sequence[int]) -> List[BlockParts]:
        """Each block's parts (``layer_parts``); after ``model.set_grad_checkpointing()``, every block checkpointed."""
        function = checkpoint if model.grad_checkpointing else None
        return [replace(self.layer_parts(block), checkpoint=function) for block in self.blocks(model)]

    def layer_parts(self, block: Block) -> BlockParts:
        """The parts of one block."""
        attn = block.attn
        return BlockParts(norm1=block.norm1, qkv=attn.qkv, num_heads=attn.num_heads, head_dim=attn.head_dim,
                          scale=attn.scale, proj=attn.proj, norm2=block.norm2, mlp=block.mlp, dense=block,
                          training=block.training, attn_drop=attn.attn_drop.p, q_norm=attn.q_norm,
                          k_norm=attn.k_norm, out_norm=attn.norm, gate=attn.gate, proj_drop=attn.proj_drop,
                          ls1=block.ls1, drop_path1=block.drop_path1, ls2=block.ls2, drop_path2=block.drop_path2)

    def grid(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
        """The patch grid (rows, columns) of images of ``input_size`` (C, H, W), default the model's (padded to a
        multiple of the patch size with ``dynamic_img_pad``)."""
        patch_embed = model.patch_embed
        return tuple(patch_embed.grid_size) if input_size is None else patch_grid(
            patch_embed.img_size, patch_embed.patch_size, input_size, getattr(patch_embed, "dynamic_img_pad", False))

    def image_size(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
        """The (height, width) the patch embedding convolves for images of ``input_size``: padded to the grid."""
        return tuple(side * patch for side, patch in zip(self.grid(model, input_size), model.patch_embed.patch_size))

    def checked_input_size(self, model: nn.Module, images: torch.Tensor) -> Tuple[int, ...]:
        """(C, H, W) of ``images`` [B, C, H, W]: the model's own, or with ``dynamic_img_size`` any size its patch
        embedding takes (a multiple of the patch size, or any with ``dynamic_img_pad``); ValueError otherwise."""
        expected = self.input_size(model)
        size = tuple(images.shape[1:])
        if images.ndim == 4 and getattr(model, "dynamic_img_size", False) and size[0] == expected[0]:
            self.grid(model, size)
            return size
        check_image_size(images, expected, TIMM_PREPROCESSING)
        return size

    def shape(self, model: VisionTransformer, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        patch_embed = model.patch_embed
        grid = self.grid(model, input_size)
        block = model.blocks[0]
        heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None))
                 if isinstance(m, nn.Linear)]
        pool_flops, pool_token_flops = attention_pool_flops(model.attn_pool)
        return ViTShape(embed_dim=model.embed_dim, attn_dim=block.attn.qkv.out_features // 3,
                        head_dim=block.attn.head_dim, mlp_flops=linear_flops(block.mlp), depth=len(model.blocks),
                        num_patches=grid[0] * grid[1], num_prefix_tokens=model.num_prefix_tokens,
                        patch_embed_flops=stem_flops(patch_embed.proj, self.image_size(model, input_size))[0],
                        head_flops=pool_flops + sum(linear_flops(head) for head in heads), grid_size=grid,
                        head_token_flops=pool_token_flops, head_reads_prefix=model.pool_include_prefix,
                        has_class_token=model.cls_token is not None)

    def input_size(self, model: VisionTransformer) -> Tuple[int, int, int]:
        return (stem_convolutions(model.patch_embed.proj)[0].in_channels, *model.patch_embed.img_size)

    def data_config(self, model: VisionTransformer) -> Dict[str, Any]:
        """timm's data config with the model's real input size and per-channel mean/std, and its ImageNet class
        names where timm knows them.

        A timm model created with other ``in_chans``/``img_size`` keeps its default config; the size is
        then read off the patch embedding, and mean/std are averaged (1 channel) or repeated to fit.
        """
        config = dict(timm.data.resolve_model_data_config(model))
        config["input_size"] = self.input_size(model)
        for key in ("mean", "std"):
            config[key] = fit_channels(config[key], config["input_size"][0])
        subset = timm.data.infer_imagenet_subset(model)
        info = None if subset is None else timm.data.ImageNetInfo(subset)
        config["class_names"] = None if info is None else [info.index_to_description(index)
                                                           for index in range(info.num_classes())]
        return config

    def embed(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """Patch and position embedding, prefix tokens, patch dropout, pre-norm: the start of timm's
        forward_features, for any timm VisionTransformer, patched or not."""
        self.checked_input_size(model, images)
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


TIMM = TimmViT()
