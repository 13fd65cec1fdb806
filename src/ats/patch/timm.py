"""The adapter for timm's VisionTransformer (DeiT, distilled DeiT, ViT, register tokens, no class token).

The patched model's ``forward_features`` runs the blocks through ``ats.step.run_blocks``, and its
average pooling weighs valid tokens by their size; ``forward_head`` and everything else is timm's.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import timm.data
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..flops import ViTShape, linear_flops, patch_grid, stem_convolutions, stem_flops
from ..step import BlockParts
from .family import Family, PatchedModel, fit_channels, masked_features

SUPPORTED_POOLS = ("token", "avg", "")


class ATSVisionTransformer(PatchedModel):
    """Mixed in before a timm VisionTransformer class by ``TimmViT.patch``; ``TIMM`` is the adapter."""

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, m, C'], valid tokens first, zeros on padding."""
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model takes no attn_mask or is_causal: ATS makes its own masks; "
                             "ats.unpatch(model) to use them")
        return self.forward_tokens(TIMM.embed(self, x))

    def forward_tokens(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run the blocks from ``start`` on: x [B, N, C'] are the tokens the blocks before ``start``
        made, all N of them (an evaluation of several configs computes them once). Returns normalised
        tokens [B, m, C'], zeros on padding."""
        batch = TIMM.run_patched(self, x, start, TIMM.input_size(self))
        return masked_features(batch, self.norm(batch.rows))

    def forward_intermediates(self, *args, **kwargs):
        """Refused: timm's version runs every block on every token, so it would silently skip ATS."""
        raise NotImplementedError("forward_intermediates of a patched model would run every block on every token "
                                  "(no ATS); ats.unpatch(model) first, or use forward_features and "
                                  "ats.last_stats(model) for the tokens each block kept")

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling; the mean is taken over valid tokens only, each weighted by its size."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type != "avg":
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weights = self._ats.pool_weights[:, start:, None]
        return (x[:, start:] * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


class TimmViT(Family):
    name = "timm VisionTransformer (DeiT, ViT, ...)"
    mixin = ATSVisionTransformer

    def owns(self, cls: type) -> bool:
        return issubclass(cls, VisionTransformer)

    def check(self, model: VisionTransformer) -> None:
        for index, block in enumerate(model.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise TypeError(f"block {index} is a {type(block).__name__} with {type(block.attn).__name__}; "
                                "ATS supports timm's pre-norm Block with its standard Attention")
        if model.attn_pool is not None or model.global_pool not in SUPPORTED_POOLS:
            raise TypeError(f"global_pool={model.global_pool!r} is not supported; ATS works with "
                            "'token' or 'avg' pooling")

    def blocks(self, model: VisionTransformer) -> Sequence[nn.Module]:
        return model.blocks

    def block_parts(self, block: Block) -> BlockParts:
        attn = block.attn
        return BlockParts(norm1=block.norm1, qkv=attn.qkv, num_heads=attn.num_heads, head_dim=attn.head_dim,
                          scale=attn.scale, proj=attn.proj, norm2=block.norm2, mlp=block.mlp, dense=block,
                          training=block.training, attn_drop=attn.attn_drop.p, q_norm=attn.q_norm,
                          k_norm=attn.k_norm, out_norm=attn.norm, gate=attn.gate, proj_drop=attn.proj_drop,
                          ls1=block.ls1, drop_path1=block.drop_path1, ls2=block.ls2, drop_path2=block.drop_path2)

    def checkpoint_function(self, model: VisionTransformer, block: Block) -> Optional[Callable]:
        """After ``model.set_grad_checkpointing()``, every block."""
        return checkpoint if model.grad_checkpointing else None

    def shape(self, model: VisionTransformer, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        patch_embed = model.patch_embed
        grid = tuple(patch_embed.grid_size) if input_size is None else patch_grid(
            patch_embed.img_size, patch_embed.patch_size, input_size)
        image_size = tuple(patch_embed.img_size) if input_size is None else tuple(input_size[1:])
        block = model.blocks[0]
        heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None))
                 if isinstance(m, nn.Linear)]
        return ViTShape(embed_dim=model.embed_dim, attn_dim=block.attn.qkv.out_features // 3,
                        head_dim=block.attn.head_dim, mlp_flops=linear_flops(block.mlp), depth=len(model.blocks),
                        num_patches=grid[0] * grid[1], num_prefix_tokens=model.num_prefix_tokens,
                        patch_embed_flops=stem_flops(patch_embed.proj, image_size)[0],
                        head_flops=sum(linear_flops(head) for head in heads), grid_size=grid)

    def has_class_token(self, model: VisionTransformer) -> bool:
        return model.cls_token is not None

    def input_size(self, model: VisionTransformer) -> Tuple[int, int, int]:
        return (stem_convolutions(model.patch_embed.proj)[0].in_channels, *model.patch_embed.img_size)

    def data_config(self, model: VisionTransformer) -> dict:
        """timm's data config with the model's real input size and per-channel mean/std.

        A timm model created with other ``in_chans``/``img_size`` keeps its default config; the size is
        then read off the patch embedding, and mean/std are averaged (1 channel) or repeated to fit.
        """
        config = dict(timm.data.resolve_model_data_config(model))
        config["input_size"] = self.input_size(model)
        for key in ("mean", "std"):
            config[key] = fit_channels(config[key], config["input_size"][0])
        return config

    def class_names(self, model: VisionTransformer) -> Optional[Sequence[str]]:
        subset = timm.data.infer_imagenet_subset(model)
        if subset is None:
            return None
        info = timm.data.ImageNetInfo(subset)
        return [info.index_to_description(index) for index in range(info.num_classes())]

    def embed(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """Patch and position embedding, prefix tokens, patch dropout, pre-norm: the start of timm's
        forward_features, for any timm VisionTransformer, patched or not."""
        expected = self.input_size(model)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}] for this model, got "
                             f"{list(images.shape)}; resize and normalise them with the model's data config "
                             "(timm.data.resolve_data_config(model=model))")
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def logits(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def logits_from_block(self, model: VisionTransformer, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if hasattr(model, "_ats"):
            return model.forward_head(model.forward_tokens(tokens, start))
        return model.forward_head(model.norm(model.blocks[start:](tokens)))


TIMM = TimmViT()
