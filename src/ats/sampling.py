"""The ATS algorithm on plain tensors: significance scores and token sampling.

Shapes: B images, h heads, n token positions (some may be padding), d head width.
A ``candidates`` mask [B, n] marks the tokens that may be sampled (valid patch tokens, and the
class token when it is not enforced). Every function returns a keep mask [B, n] over positions;
a token is never kept unless it is a candidate with a positive score.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def masked_softmax_logits(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: Optional[torch.Tensor],
                          key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention probabilities of queries q [B, h, nq, d] over keys k [B, h, n, d] -> [B, h, nq, n].

    key_mask: [B, n] bool, False for keys no query may see (padding), or None.
    key_bias: [B, n] float added to each key's logit (log token size), or None.
    """
    return _masked_softmax((q * scale) @ k.transpose(-2, -1), key_mask, key_bias)


def class_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float, key_mask: Optional[torch.Tensor],
                    key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The class token's attention over the keys, per head -> [B, h, n] (a transposed view).

    q_cls: [B, h, d] the class token's query; k: [B, h, n, d] the keys, a head-major view of the qkv
    projection's token-major rows (as ``BlockParts.split_heads`` makes them); key_mask, key_bias as in
    masked_softmax_logits. The logits are an elementwise product with the token-major keys summed over
    d: one pass over the rows as they lie, no matrix product with a single query column (both several
    times slower on CPU at batch 64).
    """
    logits = (k.transpose(1, 2) * (q_cls * scale).unsqueeze(1)).sum(dim=-1)
    return _masked_softmax(logits, key_mask, key_bias, dim=1).transpose(1, 2)


def _masked_softmax(logits: torch.Tensor, key_mask: Optional[torch.Tensor], key_bias: Optional[torch.Tensor],
                    dim: int = -1) -> torch.Tensor:
    """Softmax over the key axis ``dim`` of logits [B, ...], with the key bias [B, n] added and masked
    keys [B, n] out."""
    if key_mask is not None:  # one additive [B, n] term (``additive_mask``)
        key_bias = additive_mask(key_mask, logits.dtype) if key_bias is None else \
            key_bias.to(logits.dtype).masked_fill(~key_mask, float("-inf"))
    if key_bias is not None:
        broadcast = [1] * logits.ndim
        broadcast[0], broadcast[dim] = logits.shape[0], logits.shape[dim]
        logits = logits + key_bias.view(broadcast)
    return logits.softmax(dim=dim)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mask [...] bool -> 0 where True, -inf where False. Added to logits or similarities it masks them:
    far cheaper on CPU than a broadcast masked_fill (2 to 7 times here), and free as baddbmm's input."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def cls_scores(cls_attention: torch.Tensor, value_norm: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Class-token significance scores ``S_j = (sum_h a_h[j]) * ||v_j|| / sum``.

    cls_attention: [B, h, n] the class token's attention over the keys; value_norm: [B, n] the norm
    of each token's value vector over all heads (C numbers); candidates: [B, n] bool.
    Returns [B, n] scores summing to 1 over candidates (0 elsewhere).
    """
    return _normalise(cls_attention.sum(dim=1) * value_norm, candidates)


def tube_scores(cls_attention: torch.Tensor, value_norm: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Class-token significance scores of tubes (a position in every frame of a clip), summed over frames:
    ``S_j = sum_t (sum_h a_th[j]) * ||v_tj|| / sum``.

    cls_attention: [B, T, h, n] the class token's attention over each frame's keys; value_norm: [B, T, n];
    candidates: [B, n] bool. Returns [B, n] scores summing to 1 over candidates (0 elsewhere).
    """
    return _normalise((cls_attention.sum(dim=2) * value_norm).sum(dim=1), candidates)


def self_attention_scores(attention: torch.Tensor, query_mask: Optional[torch.Tensor],
                          candidates: torch.Tensor) -> torch.Tensor:
    """Self-attention scores: column sums of the attention over valid queries and all heads.

    attention: [B, h, n, n] probabilities; query_mask: [B, n] bool valid query rows, or None.
    Returns [B, n] scores summing to 1 over candidates.
    """
    columns = attention.sum(dim=1)
    if query_mask is not None:
        columns = columns * query_mask[:, :, None]
    return _normalise(columns.sum(dim=1), candidates)


def _normalise(raw: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    raw = (raw if raw.dtype == torch.float32 else raw.float()) * candidates
    return raw / raw.sum(dim=1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)


def times_fraction(count: torch.Tensor, fraction: float, round_up: bool = False) -> torch.Tensor:
    """floor (or with ``round_up`` ceil) of count [B] long times ``fraction``, in float64 as Python's float does it
    -> [B] long. The fraction goes in as a float64 tensor: the ONNX exporter writes a Python scalar as float32, so
    that 0.7 becomes 0.699999988 and floor(0.7 * 60) 41 in the graph."""
    scaled = count.to(torch.float64) * torch.tensor(fraction, dtype=torch.float64, device=count.device)
    return (scaled.ceil() if round_up else scaled.floor()).long()


def per_image(k: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """A count for every image (an int) or one per image ([B] long) -> broadcastable against [B, n]."""
    return k.unsqueeze(1) if isinstance(k, torch.Tensor) else k


def uniform_points(k: torch.Tensor, k_max: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K sorted uniform draws in [0, 1) for each image -> [B, k_max] float64, +inf past an image's own K.

    k: [B] long, K per image (<= k_max).
    """
    draws = torch.rand(k.shape[0], k_max, device=k.device, dtype=torch.float64, generator=generator)
    unused = torch.arange(1, k_max + 1, device=k.device) > k[:, None]
    return draws.masked_fill(unused, float("inf")).sort(dim=1).values


def inverse_transform_sample(scores: torch.Tensor, k: Union[int, torch.Tensor], k_max: Optional[int] = None,
                             stochastic: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Inverse transform sampling of token positions by score -> keep mask [B, n] (duplicates merged).

    scores: [B, n] non-negative, summing to 1 per image; k: samples K, one int for every image or
    [B] long per image. Each point y on the CDF's y-axis picks the first position (in ascending score
    order) whose CDF reaches y, so a zero-score position (padding, prefix, non-candidate) is never
    picked. Position i is therefore kept when some point lies in (CDF_{i-1}, CDF_i]: when the count of
    points at or below the CDF rises at i. For the deterministic points ``y_j = (2j - 1) / (2K)``,
    j = 1..K, that count is ``floor(K * CDF_i + 1/2)``, so no point is materialised. Stochastic: K
    sorted uniform draws (``uniform_points``; k_max, an upper bound on k, sizes them).
    """
    sorted_scores, order = scores.sort(dim=1)
    cdf = sorted_scores.cumsum(dim=1, dtype=torch.float64)
    # cdf[:, -1:], not cdf.narrow(1, n - 1, 1): torch.compile (2.14, CPU) miscompiles that narrow here
    cdf = cdf / cdf[:, -1:].clamp_min(torch.finfo(cdf.dtype).tiny)
    if stochastic:
        if k_max is None:
            raise ValueError("stochastic sampling needs k_max, an upper bound on the samples per image")
        k = k if isinstance(k, torch.Tensor) else torch.full_like(order[:, 0], k)
        at_or_below = torch.searchsorted(uniform_points(k, k_max, generator), cdf, right=True)
    else:
        at_or_below = (torch.add(0.5, cdf, alpha=k) if isinstance(k, int) else cdf.mul_(k.unsqueeze(1)).add_(0.5))
        at_or_below = at_or_below.floor_()
    at_or_below = F.pad(at_or_below, (1, 0))  # no point at or below 0
    picked = at_or_below[:, 1:] > at_or_below[:, :-1]
    keep = torch.zeros_like(picked).scatter_(1, order, picked)
    # a zero score leaves the CDF where it was, so no count rises there; only a random draw can land on 0
    return keep & (scores > 0) if stochastic else keep


#: The epsilon of the released code's softmax (``softmax_with_policy``).
RELEASED_EPS = 1e-6


def released_attention(attention: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The released code's softmax, from an ordinary one -> [B, h, n].

    attention: [B, h, n] probabilities over the keys; key_mask: [B, n] bool, the valid keys (None: all
    n). The released code normalises ``e_j = exp(logit_j - max)`` as ``(e_j + eps / N) / (sum e + eps)``
    over its N keys instead of ``e_j / sum e``: each valid key gains ``eps / (N sum e)``, where
    ``1 / sum e`` is the largest probability. N is the image's own valid keys (what the released code
    sees at batch size 1). The scores move by ~1e-9, enough to settle near-ties of the nearest-point
    search (3 of the 500 reference images, docs/method.md). Padding stays 0.
    """
    shift = RELEASED_EPS * attention.amax(dim=-1, keepdim=True)
    if key_mask is None:
        return (attention + shift / attention.shape[-1]) / (1 + shift)
    bias = shift / key_mask.sum(dim=1).to(attention.dtype)[:, None, None]
    return (attention + bias * key_mask[:, None, :]) / (1 + shift)


def released_sample(scores: torch.Tensor, candidates: torch.Tensor, points: int) -> torch.Tensor:
    """The sampling rule of the authors' released code -> keep mask [B, n].

    scores: [B, n] non-negative; candidates: [B, n] bool, the positions that may be kept; points: M, the
    same for every image. The candidates are sorted by score, ascending, and their cumulative sum normalised
    by min-max, so the lowest-scoring candidate sits at 0 and the last at 1; M points placed evenly
    from the smallest non-zero normalised value to 1 each pick the candidate whose normalised CDF is
    nearest (the earlier one in sorted order on a tie), and the unique picks are kept. A candidate at
    0 (the lowest-scoring one, and any with a zero score before it) and a non-candidate are never picked.
    """
    batch, n = scores.shape
    sorted_scores, order = scores.masked_fill(~candidates, -1.0).sort(dim=1)
    valid = sorted_scores >= 0
    cdf = sorted_scores.clamp_min(0.0).to(torch.float64).cumsum(dim=1)
    low = cdf.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
    span = (cdf[:, -1:] - low).clamp_min(torch.finfo(cdf.dtype).tiny)
    normalised = ((cdf - low) / span).masked_fill(~valid, float("-inf"))
    start = normalised.masked_fill(normalised <= 0, float("inf")).amin(dim=1, keepdim=True)
    start = start.masked_fill(start.isinf(), 1.0)
    steps = torch.arange(points, device=scores.device, dtype=torch.float64)
    ys = start + steps * (1 - start) / max(points - 1, 1)
    above = (normalised.unsqueeze(1) < ys.unsqueeze(2)).sum(dim=2)  # searchsorted, which ONNX lacks
    upper, lower = above.clamp(max=n - 1), (above - 1).clamp(min=0)
    nearer_below = (ys - normalised.gather(1, lower)) <= (normalised.gather(1, upper) - ys)
    picked = torch.where((above == n) | nearer_below, lower, upper)
    picks = torch.zeros_like(picked[:, :1]).expand(batch, n).clone().scatter_add_(1, picked, torch.ones_like(picked))
    chosen = picks > 0
    return torch.zeros_like(chosen).scatter_(1, order, chosen) & candidates


def topk_sample(scores: torch.Tensor, k: Union[int, torch.Tensor]) -> torch.Tensor:
    """Keep the k[b] highest-scoring positions of each image -> keep mask [B, n].

    scores: [B, n]; k: an int for every image, or [B] long. Positions with score 0 are never kept.
    Ties go to the earlier position. No sort of positions: the k[b]-th highest score is the threshold, every
    score above it is kept, and of the scores equal to it the first ones that fill k[b] (what a stable sort
    would keep, from one plain sort of the values, which ONNX has).
    """
    n = scores.shape[1]
    descending = scores.sort(dim=1, descending=True).values
    if isinstance(k, torch.Tensor):
        threshold = descending.gather(1, (k - 1).clamp(0, n - 1).unsqueeze(1))
    else:
        threshold = descending.narrow(1, min(max(k - 1, 0), n - 1), 1)
    above, tied = scores > threshold, scores == threshold
    room = per_image(k) - above.sum(dim=1, keepdim=True)
    return (above | (tied & (tied.cumsum(dim=1) <= room))) & (scores > 0)


def stable_argsort(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """The order of a stable sort of values [B, n] along dim 1 (ties: the earlier position first) -> [B, n] long.

    ONNX has no stable sort (``aten.sort.stable``), so this sorts keys without ties instead: each value's dense
    rank (from a plain sort of the values) times n plus its position.
    """
    n = values.shape[1]
    ordered, order = values.sort(dim=1, descending=descending)
    rises = torch.cat((torch.zeros_like(order[:, :1]), (ordered[:, 1:] != ordered[:, :-1]).long()), dim=1)
    rank = torch.zeros_like(order).scatter_(1, order, rises.cumsum(dim=1))
    return (rank * n + torch.arange(n, device=values.device)).argsort(dim=1)


def top_up(keep: torch.Tensor, scores: torch.Tensor, min_kept: Union[int, torch.Tensor]) -> torch.Tensor:
    """Add the best-scoring unkept positions until each image keeps at least ``min_kept`` (an int, or
    [B] long per image) -> [B, n]."""
    missing = (min_kept - keep.sum(dim=1)).clamp(min=0)
    return keep | topk_sample(scores.masked_fill(keep, 0.0), missing)
