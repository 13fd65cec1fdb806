"""Keeping what is dropped: folding tokens into others, on plain tensors.

``keep_distinct`` (ATS's distinct option) adds to a kept set the dropped tokens no kept token
resembles. Two ways to choose where a token goes, both returning ``target`` [B, n] (each position's
destination; a position that stays is its own target):
- ``nearest_kept``: ATS's fuse option, each dropped token joins its most similar kept token;
- ``bipartite_soft_matching``: the token-merging baseline (ToMe, Bolya et al. 2023), written from
  the paper and matching its published code's choices: split the tokens into two alternating sets
  A and B, match each A token with its most similar B token, and merge the r best-matched A tokens.
``fold`` then averages every group, weighted by token sizes (how many patches a token holds).
Similarity is the cosine of keys averaged over heads: metric [B, n, d].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import topk_sample


def cosine_similarity(metric: torch.Tensor) -> torch.Tensor:
    """metric [B, n, d] -> the cosine similarity of every pair of tokens [B, n, n]."""
    metric = F.normalize(metric.float(), dim=-1)
    return metric @ metric.transpose(1, 2)


def _self_target(keep: torch.Tensor) -> torch.Tensor:
    return torch.arange(keep.shape[1], device=keep.device).expand_as(keep).clone()


def nearest_kept(similarity: torch.Tensor, keep: torch.Tensor, movable: torch.Tensor) -> torch.Tensor:
    """Send each movable, unkept position to its most similar kept movable position -> target [B, n].

    similarity: [B, n, n] (``cosine_similarity``); keep, movable: [B, n] bool. Images with no kept
    movable token move nothing.
    """
    similarity = similarity.masked_fill(~(keep & movable)[:, None, :], float("-inf"))
    nearest = similarity.argmax(dim=-1)
    moves = movable & ~keep & (keep & movable).any(dim=1, keepdim=True)
    return torch.where(moves, nearest, _self_target(keep))


def keep_distinct(similarity: torch.Tensor, keep: torch.Tensor, movable: torch.Tensor, scores: torch.Tensor,
                  threshold: float) -> torch.Tensor:
    """Also keep the dropped movable tokens that no kept token resembles -> keep [B, n] bool.

    A dropped token is *distinct* when its cosine similarity to every kept movable token is below
    ``threshold``. A distinct token stays unless a higher-scoring distinct token (ties: the later
    position) is at least ``threshold`` similar to it: one parallel round, so of a group of alike
    distinct tokens the best stays and the others can fold into it.
    similarity: [B, n, n] (``cosine_similarity``); keep, movable: [B, n] bool; scores: [B, n].
    """
    alike = similarity >= threshold
    distinct = movable & ~keep & ~(alike & (keep & movable)[:, None, :]).any(dim=-1)
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1)
    outranks = rank[:, None, :] > rank[:, :, None]  # [b, i, j]: token j ranks above token i
    suppressed = (alike & outranks & distinct[:, None, :]).any(dim=-1)
    return keep | (distinct & ~suppressed)


def bipartite_soft_matching(metric: torch.Tensor, r: int, movable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge up to r tokens per image into their best match -> (target [B, n], side_b [B, n] bool).

    metric: [B, n, d]; movable: [B, n] bool, the tokens that may merge (patch tokens, not padding).
    As in ToMe's code, the sets alternate by position over the whole sequence (set A: even
    positions, so a class token at 0 would be in A; set B: odd), each movable A token's best B match
    is scored by cosine similarity, and the r highest-scoring A tokens merge, at most half the
    movable tokens (rounded down). side_b marks set B: ToMe puts those tokens after the unmerged A
    ones, which decides the next block's sets.
    """
    parity = torch.arange(movable.shape[1], device=movable.device) % 2
    side_a = movable & (parity == 0)
    side_b = movable & (parity == 1)
    similarity = cosine_similarity(metric).masked_fill(~side_b[:, None, :], float("-inf"))
    best, match = similarity.max(dim=-1)
    has_match = side_a & side_b.any(dim=1, keepdim=True)
    strength = torch.where(has_match, best + 2.0, torch.zeros_like(best))
    merges = torch.minimum(torch.full_like(best[:, 0], r, dtype=torch.long), movable.sum(dim=1) // 2)
    merged = topk_sample(strength, merges)
    return torch.where(merged, match, _self_target(movable)), side_b


def fold(x: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens sharing a target -> (x [B, n, C], sizes [B, n]).

    x: [B, n, C]; sizes: [B, n]; target: [B, n]. Every target holds the average of its group and the
    group's total size; positions that moved away keep their old values (the caller drops them).
    """
    weighted = torch.zeros_like(x).scatter_add_(1, target[..., None].expand_as(x), x * sizes[..., None])
    total = torch.zeros_like(sizes).scatter_add_(1, target, sizes)
    stays = target == torch.arange(x.shape[1], device=x.device)
    folded = torch.where(stays[..., None], weighted / total.clamp_min(1e-12)[..., None], x)
    return folded, torch.where(stays, total, sizes)
