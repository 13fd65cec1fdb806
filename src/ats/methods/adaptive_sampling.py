"""ATS, the method of the paper: in each of its blocks, score the tokens by the class token's attention times their
value norm, keep a per-image set by inverse transform sampling (or top-K, or the authors' released rule), and run
attention for the kept queries only (``ATSConfig``, ``TokenBudget``, ``ats_block``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, Dict, List, Mapping, Optional, Union

import torch

from ..flops import BlockCost, Count, ViTShape, block_flops
from ..merging import keep_distinct, nearest_kept, unit_vectors
from ..method import BlockContext, Method, check_blocks_inside
from ..packing import TokenBatch
from ..profiling import region
from ..sampling import (
    cls_scores,
    inverse_transform_sample,
    released_attention,
    released_sample,
    self_attention_scores,
    times_fraction,
    top_up,
    topk_sample,
)
from ..step import (
    BlockParts,
    attend,
    attention_probabilities,
    attention_update,
    class_attention_of,
    fold_tokens,
    logit_bias,
    mlp_half,
)

SAMPLERS = ("inverse_transform", "topk", "released")
SCORES = ("auto", "cls", "self_attention")
PACKINGS = ("rows", "padded")

#: The paper's multi-stage schedule starts at block 3 (0-based) and runs to the last block.
MULTI_STAGE_FIRST_BLOCK = 3
#: The paper's DeiT-S settings of about 3.0, 2.5 and 2.0 GFLOPs (multi-stage rho; single-stage K at block 3).
PAPER_RHOS = (1.0, 0.87, 0.72)
PAPER_KS = (108, 78, 48)
#: The ``distinct`` threshold of the library's recommended setting (``ATSConfig.recommended``).
RECOMMENDED_DISTINCT = 0.95


@dataclass(frozen=True)
class TokenBudget:
    """How many samples K an ATS block draws, for each image.

    Either a fixed ``k`` (single-stage, e.g. K=108) or a ratio ``rho`` of the tokens entering the
    block (multi-stage: ``K = max(floor(rho * tokens_in), min_tokens)``). This is the one place the
    schedule is defined; sampling, FLOP bounds and reports all call it.
    """

    k: Optional[int] = None
    rho: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.rho is None):
            raise ValueError("a TokenBudget takes exactly one of k (a token count) or rho (a ratio)")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a whole number >= 1, got {self.k!r}; pick e.g. k=108 for DeiT-S")
        if self.rho is not None and not (0.0 < float(self.rho) <= 1.0):
            raise ValueError(f"rho must lie in (0, 1], got {self.rho!r}; the paper uses 1.0, 0.87 and 0.72")

    def samples(self, tokens_in: Union[int, torch.Tensor], min_tokens: int) -> Union[int, torch.Tensor]:
        """K per image. tokens_in: the valid tokens entering the block (prefix included), [B] long, or
        one int when every image has as many -> K of the same kind."""
        if not isinstance(tokens_in, torch.Tensor):
            return self.max_samples(tokens_in, min_tokens)
        if self.k is not None:
            return torch.full_like(tokens_in, self.k)
        return times_fraction(tokens_in, self.rho).clamp(min=min_tokens)

    def max_samples(self, tokens_in: int, min_tokens: int) -> int:
        """The largest K any image entering with at most ``tokens_in`` tokens can draw."""
        if self.k is not None:
            return self.k
        return max(math.floor(tokens_in * self.rho), min_tokens)

    def released_points(self, num_patches: int) -> int:
        """M, the points the authors' released sampler places (``sampler="released"``): K, or
        ``floor(rho * num_patches)`` of the model's patch tokens whatever entered the block (at least 1)."""
        if self.k is not None:
            return self.k
        return max(math.floor(self.rho * num_patches), 1)

    def __str__(self) -> str:
        return f"K={self.k}" if self.k is not None else f"rho={self.rho:g}"


BudgetLike = Union[int, float, TokenBudget]


def _as_budget(value: BudgetLike) -> TokenBudget:
    if isinstance(value, TokenBudget):
        return value
    if isinstance(value, bool):
        raise TypeError(f"a block budget must be an int K or a float rho, got {value!r}")
    if isinstance(value, int):
        return TokenBudget(k=value)
    if isinstance(value, float):
        return TokenBudget(rho=value)
    raise TypeError(f"a block budget must be an int K, a float rho or a TokenBudget, got {type(value).__name__}")


@dataclass(frozen=True)
class ATSConfig(Method):
    """Where ATS runs and how it samples.

    Args:
        blocks: block index (0-based) -> budget: an int K, a float rho in (0, 1], or a TokenBudget.
        sampler: "inverse_transform" (the paper), "topk" (keep the K highest scores) or "released" (the
            rule of the authors' released code: M points on the min-max normalised CDF from its smallest
            non-zero value to 1, each picking the nearest token; M = ``TokenBudget.released_points``).
        score: "cls" (class-token attention x value norm), "self_attention" (column sums), or "auto" (the
            default): "cls" on a model with a class token, "self_attention" on one without.
        keep_cls: enforce the class token; with False it is sampled like a patch token (see docs).
        min_tokens: floor on K for ratio budgets (the paper's 8).
        min_kept: a floor on the unique patch tokens each ATS block keeps, topped up by score when sampling
            keeps fewer: an int is a token count (0: off), a float in (0, 1] a fraction of the valid patch
            tokens entering the block (a gradual schedule, e.g. 0.85).
        fuse: fold each dropped patch token into its most similar kept patch token (size-weighted);
            sizes travel with the tokens and later attention adds log(size) to each key's logit.
        distinct: a cosine similarity in (0, 1] (0: off); a dropped patch token whose keys (averaged
            over heads) are less similar than this to every kept patch token is kept as well, so an
            image with more distinct content keeps more tokens (with ``fuse``, e.g. 0.95).
        stochastic: in train mode draw K sorted uniform points instead of the deterministic grid.
        every_to_last: 0 (the default): ATS in the blocks listed; N >= 1: the one block listed and every N-th
            block after it through the model's last, whichever its depth (``multi_stage`` without a depth;
            ``ats.patch`` spells the blocks out, ``for_depth``).
        packing: "rows" runs linear layers and norms on valid tokens only; "padded" runs every
            later block on all padded positions with masked keys (the official code's way; slower).
    """

    summary: ClassVar[str] = "ATS: adaptive token sampling, the paper's method"

    blocks: Mapping[int, BudgetLike]
    sampler: str = "inverse_transform"
    score: str = "auto"
    keep_cls: bool = True
    min_tokens: int = 8
    min_kept: Union[int, float] = 0
    stochastic: bool = False
    fuse: bool = False
    distinct: float = 0.0
    packing: str = "rows"
    every_to_last: int = 0
    budgets: Mapping[int, TokenBudget] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, Mapping) or not self.blocks:
            raise ValueError("blocks must be a non-empty dict {block_index: K or rho}, e.g. {3: 108}")
        for index in self.blocks:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"block indices are 0-based ints, got {index!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.packing not in PACKINGS:
            raise ValueError(f"unknown packing {self.packing!r}; choose one of {', '.join(PACKINGS)}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise ValueError(f"min_tokens must be an int >= 1, got {self.min_tokens!r}")
        count = isinstance(self.min_kept, int) and not isinstance(self.min_kept, bool) and self.min_kept >= 0
        fraction = isinstance(self.min_kept, float) and 0.0 < self.min_kept <= 1.0
        if not (count or fraction):
            raise ValueError(f"min_kept must be an int >= 0 (a token count; 0 turns it off) or a float in (0, 1] "
                             f"(a fraction of the patch tokens entering the block), got {self.min_kept!r}")
        if isinstance(self.distinct, bool) or not isinstance(self.distinct, (int, float)) or not (
                0.0 <= self.distinct <= 1.0):
            raise ValueError(f"distinct must be a cosine similarity in (0, 1] (0 turns it off), got "
                             f"{self.distinct!r}; try 0.95 with fuse=True")
        if isinstance(self.every_to_last, bool) or not isinstance(self.every_to_last, int) or self.every_to_last < 0:
            raise ValueError(f"every_to_last must be a whole number >= 0 (0: the blocks listed), got "
                             f"{self.every_to_last!r}")
        if self.every_to_last and len(self.blocks) != 1:
            raise ValueError("every_to_last repeats one listed block's budget through the last block; list exactly "
                             f"one block, got {sorted(self.blocks)}")
        budgets = {index: _as_budget(value) for index, value in sorted(self.blocks.items())}
        object.__setattr__(self, "budgets", budgets)

    @classmethod
    def multi_stage(cls, rho: float = 1.0, first: int = MULTI_STAGE_FIRST_BLOCK, depth: Optional[int] = None,
                    every: int = 1, **options) -> "ATSConfig":
        """ATS in blocks ``first, first + every, ...`` through the last (the paper: every block from 3 on) with
        ``K_n = max(floor(rho * tokens_in_n), min_tokens)``: the last of the model ``ats.patch`` is given, or of
        ``depth`` blocks."""
        if isinstance(rho, int) and not isinstance(rho, bool):
            rho = float(rho)
        if not isinstance(rho, float):
            raise TypeError(f"rho must be a float in (0, 1], got {rho!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number >= 1 (1: every block, 2: every other), got {every!r}")
        if depth is None:
            return cls(blocks={first: TokenBudget(rho=rho)}, every_to_last=every, **options)
        if not 0 <= first < depth:
            raise ValueError(f"first block {first} must lie in 0..{depth - 1} for a model of depth {depth}")
        return cls(blocks={index: TokenBudget(rho=rho) for index in range(first, depth, every)}, **options)

    @classmethod
    def recommended(cls, depth: Optional[int] = None, **options) -> "ATSConfig":
        """The library's recommended setting: multi-stage rho = 1 with ``fuse`` and ``distinct`` =
        RECOMMENDED_DISTINCT, so each image keeps its own count and sampling loses what it would drop
        (docs/results.md: -0.06 points at 51.5% saved on the reference model)."""
        return cls.multi_stage(1.0, depth=depth, fuse=True, distinct=RECOMMENDED_DISTINCT, **options)

    @classmethod
    def single_stage(cls, k: int, block: int = MULTI_STAGE_FIRST_BLOCK, **options) -> "ATSConfig":
        """ATS in one block with a fixed number of samples K."""
        return cls(blocks={block: TokenBudget(k=k)}, **options)

    def patched_blocks(self, depth: int) -> List[int]:
        first = min(self.budgets)
        return list(range(first, depth, self.every_to_last)) if self.every_to_last else list(self.budgets)

    def for_depth(self, depth: int) -> "ATSConfig":
        if not self.every_to_last:
            return self
        (first, budget), = self.budgets.items()
        check_blocks_inside((first,), depth, "ATS", f"; the model has {depth} blocks")
        return dataclasses.replace(self, blocks={index: budget for index in self.patched_blocks(depth)},
                                   every_to_last=0)

    def check_model(self, depth: int, has_cls: bool) -> None:
        """Raise ValueError naming why this config does not fit a model of ``depth`` blocks."""
        check_blocks_inside(self.budgets, depth, "ATS",
                            f"; use ATSConfig.multi_stage(rho, depth={depth}) or smaller indices")
        if self.score == "cls" and not has_cls:
            raise ValueError("this model has no class token, so score='cls' cannot rank its tokens; "
                             "use ATSConfig(..., score='self_attention')")
        if not self.keep_cls and not has_cls:
            raise ValueError("keep_cls=False needs a class token to drop; this model has none")

    def score_for(self, has_cls: bool) -> str:
        """The score variant on a model with (or without) a class token: ``score``, with "auto" resolved."""
        if self.score != "auto":
            return self.score
        return "cls" if has_cls else "self_attention"

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        """The most tokens block ``index`` can emit from n (prefix tokens included): every sample distinct."""
        if self.distinct:
            return n
        if self.sampler == "released":
            budget = self.budgets[index]
            return n if budget.k is None else min(n, prefix + budget.k)
        samples = max(self.budgets[index].max_samples(n, self.min_tokens), self.kept_floor(n - prefix))
        return min(n, prefix + samples)

    def kept_floor(self, patches_in: Count) -> Count:
        """The fewest unique patch tokens a block keeps, for ``patches_in`` valid patch tokens entering it
        (an int, or a [B] long tensor): ``min_kept`` itself, or ``floor(min_kept * patches_in)``."""
        if not isinstance(self.min_kept, float):
            return self.min_kept
        if isinstance(patches_in, torch.Tensor):
            return times_fraction(patches_in, self.min_kept)
        return math.floor(patches_in * self.min_kept)

    def describe(self) -> str:
        """A short label, e.g. ``multi-stage rho=0.7 (3..11)`` or ``K=108 @ block 3``."""
        budgets = list(self.budgets.values())
        indices = list(self.budgets)
        step = indices[1] - indices[0] if len(indices) > 1 else 1
        if self.every_to_last:
            every = f" every {self.every_to_last}" if self.every_to_last > 1 else ""
            label = f"{budgets[0]} @ blocks {indices[0]}..last{every}"
        elif len(set(budgets)) == 1 and len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1, step)):
            label = f"{budgets[0]} @ blocks {indices[0]}..{indices[-1]}" + (f" every {step}" if step > 1 else "")
        elif len(set(budgets)) == 1 and len(indices) > 1:
            label = f"{budgets[0]} @ blocks {', '.join(map(str, indices))}"
        else:
            label = ", ".join(f"{budget} @ block {index}" for index, budget in self.budgets.items())
        extras = [self.sampler] if self.sampler != "inverse_transform" else []
        if self.score == "self_attention":
            extras.append(f"score={self.score}")
        if not self.keep_cls:
            extras.append("cls not enforced")
        if self.fuse:
            extras.append("fuse")
        if self.distinct:
            extras.append(f"distinct={self.distinct:g}")
        if self.min_kept:
            extras.append(f"min_kept={self.min_kept}")
        if self.packing != "rows":
            extras.append(f"{self.packing} packing")
        return label + (f" ({', '.join(extras)})" if extras else "")

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        """FLOPs (n_in, n_out) -> count of each ATS block of a model with (or without) a class token, for
        flops.vit_flops."""
        return {index: partial(block_flops, shape, score=self.score_for(has_cls), fuse=self.fuse,
                                 distinct=bool(self.distinct)) for index in self.budgets}

    def run_block(self, parts: BlockParts, batch: TokenBatch, context: BlockContext) -> TokenBatch:
        return ats_block(parts, batch, self, context)


@dataclass
class TokenChoice:
    """What an ATS block chose, over its input positions [B, m].

    keep: bool, the sampled tokens (patch tokens, and the class token when it is not enforced);
    patches: bool, the valid patch positions; scores: float, the significance scores;
    cls_attention: [B, h, m] the class token's attention (None without a class token);
    cls_live: [B] bool, whether the class token survives (None when it is enforced).
    """

    keep: torch.Tensor
    patches: torch.Tensor
    scores: torch.Tensor
    cls_attention: Optional[torch.Tensor]
    cls_live: Optional[torch.Tensor]


def choose_tokens(parts: BlockParts, batch: TokenBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  budget: TokenBudget, config: ATSConfig, prefix: int, has_cls: bool) -> TokenChoice:
    """Score the valid tokens and sample the ones to keep (steps 2-4 of ATS) in the block of ``parts``.

    q, k, v: [B, h, m, d] in the padded layout (padding is no key and no candidate).
    """
    patches = batch.patch_positions(prefix)
    candidates, cls_live = patches, None
    if not config.keep_cls:
        cls_live = batch.cls_live if batch.cls_live is not None else torch.ones_like(patches[:, 0])
        candidates = patches.clone()
        candidates[:, 0] = cls_live
    if config.score_for(has_cls) == "cls":
        cls_attention = class_attention_of(parts, batch, q, k)
        scored = released_attention(cls_attention, batch.key_mask) if config.sampler == "released" else cls_attention
        scores = cls_scores(scored, torch.linalg.vector_norm(v, dim=(1, 3)), candidates)
    else:
        attention = attention_probabilities(parts, batch, q, k)
        scores = self_attention_scores(attention, batch.key_mask, candidates)
        cls_attention = attention[:, :, 0] if has_cls else None

    keep = sample_positions(batch, scores, candidates, patches, budget, config, prefix, parts.training)
    if cls_live is not None:
        cls_live = keep[:, 0] & cls_live
    return TokenChoice(keep, patches, scores, cls_attention, cls_live)


def sample_positions(batch: TokenBatch, scores: torch.Tensor, candidates: torch.Tensor, patches: torch.Tensor,
                     budget: TokenBudget, config: ATSConfig, prefix: int, training: bool) -> torch.Tensor:
    """Step 4 of ATS with ``config``'s sampler: the positions to keep [B, m] bool, from the scores [B, m] of the
    candidates [B, m] (patches [B, m]: the valid patch positions, for ``min_kept``)."""
    common = batch.common_live_tokens
    samples = budget.samples(batch.live_tokens if common is None else common, config.min_tokens)
    if config.sampler == "topk":
        keep = topk_sample(scores, samples)
    elif config.sampler == "released":
        keep = released_sample(scores, candidates, budget.released_points(batch.num_source_tokens - prefix))
    else:
        keep = inverse_transform_sample(scores, samples, budget.max_samples(batch.width, config.min_tokens),
                                        config.stochastic and training)
    if config.min_kept:
        keep = top_up(keep, scores, config.kept_floor(patches.sum(dim=1)))
    return keep


def ats_block(parts: BlockParts, batch: TokenBatch, config: ATSConfig, context: BlockContext) -> TokenBatch:
    """Score, sample and keep tokens, then run the block on the kept ones (selected queries only)."""
    prefix = context.prefix
    y = parts.norm1(batch.rows)
    qkv = parts.qkv(y)
    q, k, v = parts.split_heads(batch.pad(qkv), batch.source)
    keys = batch  # the keys' tokens and sizes, as they are before fusing folds dropped tokens into kept ones
    with region("ats.score_and_sample"):
        choice = choose_tokens(parts, batch, q, k, v, config.budgets[context.index], config, prefix,
                               context.has_cls)
    target = None
    if config.fuse or config.distinct:
        with region("ats.fuse"):
            unit = unit_vectors(k.mean(dim=1))
            if config.distinct:
                choice.keep = keep_distinct(unit, choice.keep, choice.patches, choice.scores, config.distinct,
                                            batch.static)
            if config.fuse:
                target = nearest_kept(unit, choice.keep, choice.patches, batch.static)
                batch = fold_tokens(batch, target)
    keep = choice.keep
    keep.narrow(1, 0, prefix).fill_(True)  # every image's prefix tokens hold its first positions
    kept, rows_from = batch.select(keep, capacity=context.capacity)
    if choice.cls_live is not None:
        kept.cls_live = choice.cls_live
    context.record.record_sampling(context.index, batch.source, kept.source, choice.scores, choice.cls_attention)
    context.record.record_dropped(keys, keep, choice.patches, k, target)
    with region("ats.pack"):
        query_rows = qkv.narrow(-1, 0, qkv.shape[-1] // 3).index_select(0, rows_from)
        queries = parts.rotated(parts.q_norm(parts.heads(kept.pad(query_rows))), kept.source)
        gate_input = None if parts.gate is None else y.index_select(0, rows_from)
    out = kept.unpad(attend(parts, queries, k, v, logit_bias(parts, keys, kept.source)))
    update = attention_update(parts, out, gate_input, kept)
    return mlp_half(parts, kept.with_rows(kept.rows + update))


