"""SAINT (Jeddi et al. 2025, "Similarity-Aware Token Pruning: Your VLM but Faster") on plain tensors.

After a block's attention, the valid patch tokens alternate between two sets: A (the first, third, ...
patch token, counted from the first one after the prefix) and B (the second, fourth, ...). An A token's
*close* B tokens are those whose keys (averaged over heads) have a cosine similarity of at least
``threshold`` with its own. An image drops r of its A tokens, where r counts its A tokens with at least
``k`` close B tokens, and the r it drops are those of highest redundancy:

    redundancy = c * exp(gamma * (mean similarity to its c close B tokens - threshold))    (c > 0)
    redundancy = its mean similarity to all B tokens                                       (c = 0)

so ``gamma`` sets how much a closer match outweighs one more match (gamma = 0 ranks by the count
alone). A token with a close match always ranks above one without: its redundancy is at least c >= 1.
Written from the paper and its authors' code (ArmenJeddi/saint, ``ViT/saint/prune.py``), with one
difference: there r is the batch mean of the images' counts, here every image drops its own (docs/method.md).
Shapes: B images, n token positions (some may be padding), d key channels.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .merging import gather_tokens, positions_of, unit_vectors
from .packing import exporting
from .sampling import stable_argsort, topk_sample


def alternating_sets(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the valid patch positions patches [B, n] bool by their rank among them -> (side_a, side_b),
    each [B, n] bool: A holds the 1st, 3rd, ... patch token of each image, B the 2nd, 4th, ..."""
    odd = (patches.long().cumsum(dim=1) % 2).bool()
    return patches & odd, patches & ~odd


def redundancy(similarity: torch.Tensor, b_valid: torch.Tensor, threshold: float,
               gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Close counts and redundancy of the A tokens -> (close [B, a] long, redundancy [B, a] float).

    similarity: [B, a, b] cosine similarity of each A token (row) to each B token (column); b_valid: [B, b]
    bool, the columns holding a B token (padding columns count nowhere).
    """
    valid = b_valid.unsqueeze(1)
    is_close = (similarity >= threshold) & valid
    close = is_close.sum(dim=-1)
    zero = torch.zeros((), dtype=similarity.dtype, device=similarity.device)
    close_mean = torch.where(is_close, similarity, zero).sum(dim=-1) / close.clamp(min=1)
    weighted = close * torch.exp(gamma * (close_mean - threshold))
    overall = torch.where(valid, similarity, zero).sum(dim=-1) / b_valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return close, torch.where(close > 0, weighted, overall)


def similar_tokens(metric: torch.Tensor, patches: torch.Tensor, threshold: float, k: int, gamma: float,
                   static: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAINT's rule in one block -> (drop [B, n] bool, order [B, n] long, last [B, n] bool).

    metric: [B, n, d] the tokens' keys averaged over heads; patches: [B, n] bool, the valid patch
    positions (prefix tokens and padding never drop). drop marks the A tokens each image drops (as many
    as its A tokens with at least ``k`` close B tokens, those of highest redundancy; ties: the earlier
    position). The authors' code then emits the prefix, the kept A tokens by descending redundancy and
    set B, which decides the next block's sets; order (``redundancy_order``) puts the A tokens in that
    order and last marks set B, to go after them. An image that drops nothing keeps its order, as there.
    static: size the sets by the most they can hold (half the positions), not by their counts read on the host (so
    too while exporting).
    """
    side_a, side_b = alternating_sets(patches)
    n = patches.shape[1]
    fixed = static or exporting()
    a_index, a_valid = positions_of(side_a, (n + 1) // 2 if fixed else None)
    b_index, b_valid = positions_of(side_b, n // 2 if fixed else None)
    unit = unit_vectors(metric)
    similarity = gather_tokens(unit, a_index) @ gather_tokens(unit, b_index).transpose(1, 2)
    close, score = redundancy(similarity, b_valid, threshold, gamma)
    drops = ((close >= k) & a_valid).sum(dim=1)
    # an A token with a close B token scores at least 1, so the top ``drops`` of the A tokens all score above 0
    ranked = torch.zeros_like(metric[..., 0], dtype=score.dtype).scatter(1, a_index, torch.where(a_valid, score, 0.0))
    reorders = (drops > 0).unsqueeze(1)
    order = redundancy_order(score, a_index, a_valid & reorders, patches.shape[1])
    return topk_sample(ranked, drops), order, side_b & reorders


def redundancy_order(score: torch.Tensor, a_index: torch.Tensor, a_valid: torch.Tensor, width: int) -> torch.Tensor:
    """A permutation of each image's ``width`` positions -> order [B, width] long (position p takes the token at
    order[p]): the A positions, in their order, take the A tokens by descending redundancy (ties: the earlier
    first); every other position keeps its token.

    score: [B, a] each A token's redundancy; a_index, a_valid: [B, a] the A positions (``positions_of``); the
    positions a_valid leaves out (padding entries, or all of an image's) keep their tokens.
    """
    by_score = stable_argsort(score.masked_fill(~a_valid, float("-inf")), descending=True)
    # the padding entries of a_index sort last in their own order, so they map to themselves
    identity = torch.arange(width, device=a_index.device).expand(a_index.shape[0], width)
    return identity.scatter(1, a_index, a_index.gather(1, by_score))
