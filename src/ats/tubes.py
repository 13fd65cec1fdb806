"""ATS on tubes, for video blocks whose attention needs the same positions in every frame.

A tube is one patch position in every frame. Two kinds of block need them:

- divided space-time (TimeSformer): a temporal attention over each position's T frames, then a spatial
  attention within each frame, then the MLP;
- space-time mixing (XViT): a spatial attention within each frame whose keys and values mix channels
  from the same position in the neighbouring frames, then the MLP.

So an ATS block here keeps *tubes*: one set of spatial positions per clip, shared by all its frames.
The score of a position is the class token's spatial attention times the position's value norm,
summed over heads and frames (``sampling.tube_scores``); the budget, the sampler and the statistics
are those of images, counted in positions. ``fuse`` folds each dropped tube into its most similar kept
tube in every frame (the same target in all frames), and ``distinct`` keeps dropped tubes unlike every
kept one; the similarity of two tubes is the mean over frames of the cosine of their keys averaged over
heads (``merging.tube_unit_vectors``). Sizes are per tube, and later attention adds log(size) to a tube's
key logit in every frame.

Layout: a ``TokenBatch`` whose rows are tubes, [R, T * C] (frame by frame within a row), the class
token first in each clip. TimeSformer keeps one class token per clip, takes part in every frame's
spatial attention with it and averages its T updates; here it is a tube of T equal copies, which that
average keeps equal (``shared_cls``). XViT has a class token per frame: a tube like the others.
Stochastic depth drops a block's updates per clip.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .merging import fold, keep_distinct, nearest_kept, tube_unit_vectors
from .method import Method
from .methods.adaptive_sampling import ATSConfig, sample_positions
from .packing import TokenBatch, refuse_tracing
from .sampling import class_attention, tube_scores
from .stats import ForwardRecord
from .step import Layer, per_image_drop_path


@dataclass
class TubeBlockParts:
    """The parts of one tube block, wherever its family keeps them. On tubes x [R, T, C]:

        x[patches] += temporal_dense(drop_path(temporal_proj(attention over frames(temporal_norm(x)))))
                                                                     (divided space-time blocks only)
        x += drop_path(proj(attention within each frame(mix_qkv(qkv(norm1(x))))))
                                                      (with ``shared_cls``, the class token: mean over frames)
        x += drop_path(mlp(norm2(x)))

    temporal_qkv, qkv: normed rows [..., C] -> [..., 3A] (queries, keys, values; heads in order);
    mix_qkv: [R, T, 3A] -> [R, T, 3A], keys and values mixed over frames (XViT), or None;
    attn_drop: dropout on attention probabilities; drop_path: a stochastic-depth module (with
    ``drop_prob``) or None; checkpoint: gradient checkpointing (as ``torch.utils.checkpoint.checkpoint``) or None.
    """

    norm1: Layer
    qkv: Layer
    proj: Layer
    norm2: Layer
    mlp: Layer
    num_heads: int
    head_dim: int
    scale: float
    temporal_norm: Optional[Layer] = None
    temporal_qkv: Optional[Layer] = None
    temporal_proj: Optional[Layer] = None
    temporal_dense: Optional[Layer] = None
    mix_qkv: Optional[Layer] = None
    shared_cls: bool = True
    training: bool = False
    attn_drop: float = 0.0
    drop_path: Optional[nn.Module] = None
    checkpoint: Optional[Callable] = None

    def split_heads(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, n, 3A] -> q, k, v each [N, h, n, d]."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Queries [N, h, nq, d] over keys [N, h, n, d] (mask: [N, 1, 1, n] bool or None) -> [N, nq, A]."""
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        return out.transpose(1, 2).flatten(2)


def frames_to_tubes(x: torch.Tensor) -> torch.Tensor:
    """Per-frame tokens [B, T, N, C] (XViT's layout) -> tubes [B, N, T * C]."""
    return x.transpose(1, 2).flatten(2)


def tubes_to_frames(tubes: torch.Tensor, frames: int) -> torch.Tensor:
    """Padded tubes [B, m, T * C] -> per-frame tokens [B, T, m, C]; the inverse of ``frames_to_tubes``."""
    return tubes.unflatten(-1, (frames, tubes.shape[-1] // frames)).transpose(1, 2)


def to_tubes(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """TimeSformer's token sequence [B, 1 + P * T, C] (class token, then position-major, frames inner)
    -> tubes [B, 1 + P, T * C] (the class token repeated over frames)."""
    batch, length, channels = tokens.shape
    cls = tokens[:, :1].repeat(1, 1, frames)
    return torch.cat([cls, tokens[:, 1:].reshape(batch, (length - 1) // frames, frames * channels)], dim=1)


def from_tubes(tubes: torch.Tensor, frames: int) -> torch.Tensor:
    """Padded tubes [B, m, T * C] -> TimeSformer's layout [B, 1 + (m - 1) * T, C] (the first copy of
    the class token); the inverse of ``to_tubes``."""
    batch, length, width = tubes.shape
    channels = width // frames
    return torch.cat([tubes[:, :1, :channels], tubes[:, 1:].reshape(batch, (length - 1) * frames, channels)], dim=1)


def check_tube_config(config: Method, depth: int, blocks: str, alternative: str = "", static: bool = False) -> None:
    """Raise ValueError unless every patched block of ``config`` runs ATS as tubes can: the class token score with
    the class token kept, rows packing, in the adaptive mode (not ``static``). blocks, alternative: for the message
    (the kind of block; another model to use)."""
    if static:
        raise ValueError(f"static mode is not available under {blocks} yet: its blocks run on tubes (ats.tubes), "
                         "which only the adaptive mode packs; patch it without static=True")
    methods = [config.method_at(index) for index in config.patched_blocks(depth)]
    if not all(isinstance(method, ATSConfig) for method in methods):
        raise ValueError(f"{config.describe()}: under {blocks} only ATS runs (on tubes); use an ATSConfig"
                         f"{', ' + alternative if alternative else ''}")
    for method in methods:
        if not method.keep_cls or method.score_for(True) != "cls" or method.packing != "rows":
            raise ValueError(f"{method.describe()}: tube sampling ({blocks}) supports the class token score with the "
                             "class token kept and rows packing")


def tube_block_options(config: Optional[Method], index: int) -> Dict[str, Any]:
    """The FLOP options (``score``, ``fuse``, ``distinct``, as ``flops.divided_block_flops`` and
    ``flops.frames_block_flops`` take them) of block ``index`` under ``config`` (None: unpatched)."""
    method = None if config is None else config.method_at(index)
    if not isinstance(method, ATSConfig):
        return dict(score=None)
    return dict(score="cls", fuse=method.fuse, distinct=bool(method.distinct))


def run_tube_blocks(blocks: Sequence[TubeBlockParts], tubes: torch.Tensor, frames: int, config: Method,
                    start: int = 0) -> Tuple[TokenBatch, ForwardRecord]:
    """Run ``blocks[start:]`` under ``config`` (ATS blocks or none) on tubes [B, 1 + P, T * C] that the first
    ``start`` blocks made. Returns the packed tubes after the last block and what each block did."""
    refuse_tracing("its blocks run on tubes (ats.tubes), whose export is not built (nor static mode); export an "
                   "image model, or run the video model in PyTorch")
    batch = TokenBatch.from_dense(tubes)
    record = ForwardRecord()
    for index, parts in enumerate(blocks):
        record.tokens_in.append(batch.live_tokens)
        if index >= start and batch.batch_size:  # an empty batch passes through every block as it is
            step = tube_block
            if parts.checkpoint is not None and torch.is_grad_enabled():
                step = partial(parts.checkpoint, tube_block, use_reentrant=False)
            batch = step(parts, batch, frames, config.method_at(index), index, record)
        record.tokens_out.append(batch.live_tokens)
    return batch, record


def tube_block(parts: TubeBlockParts, batch: TokenBatch, frames: int, config: Optional[ATSConfig], index: int,
               record: ForwardRecord) -> TokenBatch:
    """One tube block (divided or mixing) on packed tubes; with ``config``, an ATS block that keeps the sampled
    tubes only (and the distinct ones, with the dropped ones folded in, as ``config`` asks)."""
    x = batch.rows.unflatten(-1, (frames, -1))
    if parts.temporal_qkv is not None:
        x = x + _temporal_update(parts, x, batch)
    qkv = parts.qkv(parts.norm1(x))
    if parts.mix_qkv is not None:
        qkv = parts.mix_qkv(qkv)
    q, k, v = parts.split_heads(_frames_first(batch.pad(qkv.flatten(1)), frames))
    mask = batch.attention_mask
    if mask is not None:
        mask = mask.repeat_interleave(frames, dim=0)
    kept, rows_from = batch, None
    if config is not None:
        keep, scores, cls_attention = _choose_tubes(parts, batch, frames, q, k, v, mask, config, index)
        if config.fuse or config.distinct:
            x, keep, batch = _keep_and_fold(x, keep, scores, k, batch, config)
        kept, rows_from = batch.select(keep | (batch.source == 0))
        record.record_sampling(index, batch.source, kept.source, scores, cls_attention)
        x, qkv = x.index_select(0, rows_from), qkv.index_select(0, rows_from)
        q = parts.split_heads(_frames_first(kept.pad(qkv.flatten(1)), frames))[0]
    out = _frames_last(parts.attend(q, k, v, mask), kept.batch_size, frames)
    update = parts.proj(kept.unpad(out.flatten(2)).unflatten(-1, (frames, -1)))
    if parts.shared_cls:
        first = kept.first_rows
        update = update.index_copy(0, first, update.index_select(0, first).mean(dim=1, keepdim=True).expand(
            -1, frames, -1))
    x = x + _per_clip(parts, update, kept)
    x = x + _per_clip(parts, parts.mlp(parts.norm2(x)), kept)
    return kept.with_rows(x.flatten(1))


def _temporal_update(parts: TubeBlockParts, x: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Temporal attention's update of every patch tube [R, T, C]; zero for the class token."""
    q, k, v = parts.split_heads(parts.temporal_qkv(parts.temporal_norm(x)))
    update = parts.temporal_dense(_per_clip(parts, parts.temporal_proj(parts.attend(q, k, v, None)), batch))
    is_cls = torch.zeros(x.shape[0], 1, 1, dtype=torch.bool, device=x.device)
    is_cls[batch.first_rows] = True
    return update.masked_fill(is_cls, 0.0)


def _choose_tubes(parts: TubeBlockParts, batch: TokenBatch, frames: int, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, mask: Optional[torch.Tensor], config: ATSConfig,
                  index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the positions and sample the tubes to keep. q, k, v: [B * T, h, m, d] per frame.

    Returns keep [B, m] bool (patch tubes), the scores [B, m] and the class token's attention [B, m]
    (mean over heads and frames)."""
    keys = None if mask is None else mask[:, 0, 0]  # bool, or log sizes (-inf on padding) once tubes are fused
    key_mask, key_bias = (keys, None) if keys is None or keys.dtype == torch.bool else (None, keys)
    cls_attention = class_attention(q[:, :, 0], k, parts.scale, key_mask, key_bias)
    value_norm = torch.linalg.vector_norm(v.transpose(1, 2).flatten(2), dim=-1)
    patches = batch.patch_positions(1)
    by_frame = (batch.batch_size, frames) + cls_attention.shape[1:]
    scores = tube_scores(cls_attention.view(by_frame), value_norm.view(by_frame[:2] + (-1,)), patches)
    keep = sample_positions(batch, scores, patches, patches, config.budgets[index], config, 1, parts.training)
    return keep, scores, cls_attention.view(by_frame).mean(dim=(1, 2))


def _keep_and_fold(x: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor, k: torch.Tensor, batch: TokenBatch,
                   config: ATSConfig) -> Tuple[torch.Tensor, torch.Tensor, TokenBatch]:
    """``distinct`` and ``fuse`` on tubes x [R, T, C] with the sampled keep [B, m] and the scores [B, m]; k: the
    per-frame keys [B * T, h, m, d]. Returns x (dropped tubes folded into their most similar kept ones, the
    same target in every frame), keep (with the distinct tubes) and the batch with the tubes' summed sizes."""
    frames = x.shape[1]
    unit = tube_unit_vectors(k.mean(dim=1).unflatten(0, (batch.batch_size, frames)))
    patches = batch.patch_positions(1)
    if config.distinct:
        keep = keep_distinct(unit, keep, patches, scores, config.distinct)
    if config.fuse:
        sizes = batch.sizes if batch.sizes is not None else x.new_ones(x.shape[0])
        folded, sizes = fold(x.flatten(1), sizes, batch.rows_at(nearest_kept(unit, keep, patches)))
        x, batch = folded.view_as(x), batch.with_rows(batch.rows, sizes)
    return x, keep, batch


def _frames_first(padded: torch.Tensor, frames: int) -> torch.Tensor:
    """Padded per-tube values [B, m, T * D] -> per-frame sequences [B * T, m, D]."""
    batch, width, channels = padded.shape
    return padded.view(batch, width, frames, channels // frames).transpose(1, 2).reshape(batch * frames, width,
                                                                                         channels // frames)


def _frames_last(per_frame: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """Per-frame sequences [B * T, m, D] -> padded tubes [B, m, T, D]."""
    return per_frame.view(batch, frames, *per_frame.shape[1:]).transpose(1, 2)


def _per_clip(parts: TubeBlockParts, update: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Stochastic depth per clip on per-tube updates [R, T, C]."""
    return per_image_drop_path(parts.drop_path, update.flatten(1), batch).view_as(update)
