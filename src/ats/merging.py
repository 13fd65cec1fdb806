"""Keeping what is dropped: folding tokens into others, on plain tensors.

``keep_distinct`` (ATS's distinct option) adds to a kept set the dropped tokens no kept token
resembles. Two ways to choose where a token goes, both returning ``target`` [B, n] (each position's
destination; a position that stays is its own target):
- ``nearest_kept``: ATS's fuse option, each dropped token joins its most similar kept token;
- ``bipartite_soft_matching``: the token-merging baseline (ToMe, Bolya et al. 2023), written from
  the paper and matching its published code's choices: split the tokens into two alternating sets
  A and B, match each A token with its most similar B token, and merge the r best-matched A tokens.
``fold`` then averages every group, weighted by token sizes (how many patches a token holds).
Similarity is the cosine of keys averaged over heads: metric [B, n, d], or its ``unit_vectors``; of tubes,
the mean over frames of that cosine (``tube_unit_vectors``).

Putting back what was dropped (a method's ``restore`` option), the full token map for dense heads: a dense head
(segmentation, depth) reads every position of the grid; a patched model keeps only some. Each block that drops
tokens leaves a ``DroppedTokens``: for every token it drops, the kept token that stands for it (its
*representative*, by original index) and an offset; ``restore_tokens`` then rebuilds the map after any later
block, from the last dropping block back to the first, as ``representative's state there + offset``. The rules
(``RESTORE_RULES``):

- ``fuse``: the final state of the kept token it was folded into (ATS's ``fuse``, token merging: tomesd's
  *unmerge*); where the method folds nothing (ATS without ``fuse``, SAINT, EViT, whose fused token stands for no
  position), its most similar kept token, as ``nearest``;
- ``nearest``: the final state of its most similar kept token (cosine of the keys, averaged over heads);
- ``own``: its own state when it was dropped (an early exit);
- ``mix``: its own state plus the change its representative (as ``fuse`` picks it) went through after the drop,
  ``own + (representative's final state - representative's state at the drop)``.

A representative dropped later is itself restored first, so chains resolve. A dropped token with no
representative (an image that kept no patch token) keeps its own state under every rule.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .packing import exporting
from .sampling import additive_mask, stable_argsort, topk_sample


def unit_vectors(metric: torch.Tensor) -> torch.Tensor:
    """metric [B, n, d] -> its rows scaled to length 1 (float), whose dot products are cosine similarities."""
    return F.normalize(metric.float(), dim=-1)


def tube_unit_vectors(metric: torch.Tensor) -> torch.Tensor:
    """Per-frame metric [B, T, n, d] of tubes (a position in each of T frames) -> unit vectors [B, n, T * d] whose
    dot products are the mean over frames of the per-frame cosine similarities (each frame's unit vector,
    concatenated over frames, over sqrt(T))."""
    frames = metric.shape[1]
    return (unit_vectors(metric) / frames ** 0.5).transpose(1, 2).flatten(2)


def cosine_similarity(metric: torch.Tensor) -> torch.Tensor:
    """metric [B, n, d] -> the cosine similarity of every pair of tokens [B, n, n]."""
    unit = unit_vectors(metric)
    return unit @ unit.transpose(1, 2)


def column_bias(valid: torch.Tensor) -> torch.Tensor:
    """valid [B, c] bool -> [B, 1, c] float: 0 on valid columns, -inf on the others, to add to a similarity
    [B, r, c] (``additive_mask``)."""
    return additive_mask(valid).unsqueeze(1)


def _self_target(keep: torch.Tensor) -> torch.Tensor:
    return torch.arange(keep.shape[1], device=keep.device).expand_as(keep).clone()


def positions_of(mask: torch.Tensor, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions where mask [B, n], in order, padded to ``width`` (at least the largest count; None: that
    count, read on the host) -> (index [B, width], valid [B, width]). Padding entries are other positions, all
    distinct, so scattering ``index`` back touches each position once."""
    count = mask.sum(dim=1)
    if width is None:
        width = int(count.max()) if mask.numel() else 0
    # the stable order that puts the marked positions first, built by scattering each position to its rank
    rank = mask.cumsum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    destination = torch.where(mask, rank - 1, count.unsqueeze(1) + positions - rank)
    index = torch.empty_like(destination).scatter_(1, destination, positions.expand_as(destination))
    return index.narrow(1, 0, width), positions.narrow(0, 0, width) < count.unsqueeze(1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, n, d] at positions index [B, c] -> [B, c, d] (one index_select, much faster than gather on CPU)."""
    batch, n, d = x.shape
    offsets = torch.arange(batch, device=x.device)[:, None] * n
    return x.reshape(batch * n, d).index_select(0, (index + offsets).flatten()).view(*index.shape, d)


def dropped_to_kept(unit: torch.Tensor, keep: torch.Tensor, movable: torch.Tensor,
                    static: bool = False) -> tuple[torch.Tensor, ...]:
    """Cosine similarity of the dropped movable tokens (rows) to the kept movable ones (columns, -inf on
    padding) of unit [B, n, d] (``unit_vectors``) -> (similarity [B, r, c], dropped_index [B, r], dropped_valid
    [B, r], kept_index [B, c]); only [B, dropped, kept] work, not [B, n, n]. static (and while exporting, which
    cannot read the counts on the host): both widths are n."""
    kept, dropped = keep & movable, movable & ~keep
    if static or exporting():
        widths = [keep.shape[1]] * 2
    else:  # both widths in one read
        widths = torch.stack((kept.sum(dim=1).amax(), dropped.sum(dim=1).amax())).tolist() if keep.numel() else [0, 0]
    kept_index, kept_valid = positions_of(kept, widths[0])
    dropped_index, dropped_valid = positions_of(dropped, widths[1])
    similarity = torch.baddbmm(column_bias(kept_valid), gather_tokens(unit, dropped_index),
                               gather_tokens(unit, kept_index).transpose(1, 2))
    return similarity, dropped_index, dropped_valid, kept_index


def nearest_kept(unit: torch.Tensor, keep: torch.Tensor, movable: torch.Tensor, static: bool = False) -> torch.Tensor:
    """Send each movable, unkept position to its most similar kept movable position -> target [B, n].

    unit: [B, n, d] unit vectors (``unit_vectors``); keep, movable: [B, n] bool. Images with no kept
    movable token move nothing.
    """
    target = _self_target(keep)
    similarity, dropped_index, dropped_valid, kept_index = dropped_to_kept(unit, keep, movable, static)
    if similarity.numel() == 0:
        return target
    nearest = kept_index.gather(1, similarity.argmax(dim=-1))
    moves = dropped_valid & (keep & movable).any(dim=1, keepdim=True)
    return target.scatter(1, dropped_index, torch.where(moves, nearest, dropped_index))


def keep_distinct(unit: torch.Tensor, keep: torch.Tensor, movable: torch.Tensor, scores: torch.Tensor,
                  threshold: float, static: bool = False) -> torch.Tensor:
    """Also keep the dropped movable tokens that no kept token resembles -> keep [B, n] bool.

    A dropped token is *distinct* when its cosine similarity to every kept movable token is below
    ``threshold``. A distinct token stays unless a higher-scoring distinct token (ties: the later
    position) is at least ``threshold`` similar to it: one parallel round, so of a group of alike
    distinct tokens the best stays and the others can fold into it.
    unit: [B, n, d] unit vectors (``unit_vectors``); keep, movable: [B, n] bool; scores: [B, n].
    """
    similarity, dropped_index, distinct, kept_index = dropped_to_kept(unit, keep, movable, static)
    if kept_index.shape[1]:
        distinct = distinct & (similarity.amax(dim=-1) < threshold)
    distinct = torch.zeros_like(keep).scatter(1, dropped_index, distinct)
    # the distinct tokens by rank, best first (ties: the later position first), padded to the largest count
    order = stable_argsort(scores.float().masked_fill(~distinct, float("-inf"))).flip(1)
    count = distinct.shape[1] if static or exporting() else int(distinct.sum(dim=1).max())
    if count == 0:
        return keep
    order = order.narrow(1, 0, count)
    valid = distinct.gather(1, order)
    ranked = gather_tokens(unit, order)
    # row j, column i: 0 where i is a valid token ranked above j, -inf elsewhere (triu: i >= j)
    above = column_bias(valid) + torch.full((count, count), float("-inf"), device=unit.device).triu()
    suppressed = torch.baddbmm(above, ranked, ranked.transpose(1, 2)).amax(dim=-1) >= threshold
    return keep.scatter(1, order, keep.gather(1, order) | (valid & ~suppressed))


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
    similarity = cosine_similarity(metric) + column_bias(side_b)
    best, match = similarity.max(dim=-1)
    has_match = side_a & side_b.any(dim=1, keepdim=True)
    strength = torch.where(has_match, best + 2.0, torch.zeros_like(best))
    merges = torch.minimum(torch.full_like(best[:, 0], r, dtype=torch.long), movable.sum(dim=1) // 2)
    merged = topk_sample(strength, merges)
    return torch.where(merged, match, _self_target(movable)), side_b


def fold(x: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens sharing a target -> (x [T, C], sizes [T]).

    x: [T, C] tokens; sizes: [T]; target: [T] long, the token (row) each one goes to, its own where it
    stays. Every target holds the average of its group and the group's total size; tokens that moved
    away hold zeros of size 0 (the caller drops them).
    """
    weighted = torch.zeros_like(x).index_add_(0, target, x * sizes.unsqueeze(1))
    total = torch.zeros_like(sizes).index_add_(0, target, sizes)
    return weighted / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(1), total  # 1e-12 is 0 in fp16


#: The rules ``restore_tokens`` rebuilds a dropped position by (the module docstring).
RESTORE_RULES = ("fuse", "nearest", "own", "mix")
#: The rule ``restore=True`` picks: the best measured (docs/results.md, "Dense features").
DEFAULT_RESTORE_RULE = "mix"


class DroppedTokens(NamedTuple):
    """What one block that drops tokens leaves for ``restore_tokens``; r is its largest dropped count.

    source: [B, r] long, the original index of each dropped token, -1 on padding;
    representative: [B, r] long, the original index of the kept token whose state it takes, -1 for none;
    offset: [B, r, C], what is added to that state (zeros where None).
    """

    source: torch.Tensor
    representative: torch.Tensor
    offset: Optional[torch.Tensor]


def restore_rule(restore: Union[None, bool, str]) -> Optional[str]:
    """A method's ``restore`` option as a rule: None (or False) for none, True for ``DEFAULT_RESTORE_RULE``, a
    rule of ``RESTORE_RULES`` as it is; ValueError otherwise."""
    if restore is None or restore is False:
        return None
    if restore is True:
        return DEFAULT_RESTORE_RULE
    if restore not in RESTORE_RULES:
        raise ValueError(f"unknown restore rule {restore!r}; choose one of {', '.join(RESTORE_RULES)}, True (the "
                         f"default, {DEFAULT_RESTORE_RULE!r}) or None (the kept tokens only)")
    return restore


def dropped_tokens(rule: str, states: torch.Tensor, source: torch.Tensor, keep: torch.Tensor, movable: torch.Tensor,
                   keys: torch.Tensor, target: Optional[torch.Tensor] = None, static: bool = False) -> DroppedTokens:
    """What a block that keeps ``keep`` of its ``movable`` positions leaves for restoring the others by ``rule``.

    states: [B, m, C] the tokens where the block drops them (padded layout); source: [B, m] their original
    indices; keep, movable: [B, m] bool (the dropped tokens: movable and not kept); keys: [B, h, m, d] the keys
    whose mean over heads ``nearest`` compares; target: [B, m] long, the position each token was folded
    into (its own where it stayed), or None where the method folds nothing. static: pad to m, no host read.
    Tokens that stand for no position (source < 0: EViT's fused token) are neither restored nor representatives.
    """
    movable = movable & (source >= 0)
    dropped = movable & ~keep
    index, valid = positions_of(dropped, dropped.shape[1] if static else None)
    dropped_source = source.gather(1, index).masked_fill(~valid, -1)
    own = gather_tokens(states, index)
    if rule == "own":
        return DroppedTokens(dropped_source, torch.full_like(dropped_source, -1), own)
    if target is None or rule == "nearest":
        target = nearest_kept(unit_vectors(keys.mean(dim=1)), keep & movable, movable, static)
    destination = target.gather(1, index)
    representative = source.gather(1, destination)
    has_representative = valid & (destination != index) & (representative >= 0)
    representative = representative.masked_fill(~has_representative, -1)
    if rule == "mix":
        offset = own - gather_tokens(states, destination) * has_representative.unsqueeze(-1)
    else:
        offset = own * (~has_representative).unsqueeze(-1)
    return DroppedTokens(dropped_source, representative, offset)


def restore_tokens(tokens: torch.Tensor, source: torch.Tensor, dropped: Sequence[DroppedTokens],
                   num_tokens: int) -> torch.Tensor:
    """The full token map [B, num_tokens, C] in the original order from the tokens [B, m, C] a block emitted
    (their original indices ``source`` [B, m], -1 on padding; other negative values, such as EViT's fused token,
    stand for no position and are left out) and the ``dropped`` tokens of the blocks before it, first block first."""
    batch, _, channels = tokens.shape
    restored = tokens.new_zeros(batch, num_tokens + 1, channels)  # the last slot takes padding and is never read
    restored = restored.scatter(1, _slots(source, num_tokens, channels), tokens)
    for block in reversed(dropped):
        present = (block.representative >= 0).unsqueeze(-1)
        values = gather_tokens(restored, _slots(block.representative, num_tokens)) * present
        if block.offset is not None:
            values = values + block.offset.to(values.dtype)
        restored = restored.scatter(1, _slots(block.source, num_tokens, channels), values)
    return restored[:, :num_tokens]


def _slots(index: torch.Tensor, num_tokens: int, channels: int = 0) -> torch.Tensor:
    """Original indices [B, m] -> slots [B, m] (the spare slot ``num_tokens`` for negative ones), or with
    ``channels`` the scatter index [B, m, channels]."""
    slots = torch.where(index >= 0, index, num_tokens)
    return slots.unsqueeze(-1).expand(-1, -1, channels) if channels else slots
