"""What to sample where: token budgets per block and the ATS options."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .evit import attentive_count
from .flops import BlockCost, Count, ViTShape, block_flops, evit_block_flops, merge_block_flops
from .sampling import times_fraction

SAMPLERS = ("inverse_transform", "topk", "released")
SCORES = ("auto", "cls", "self_attention")
PACKINGS = ("rows", "padded")

#: The paper's multi-stage schedule starts at block 3 (0-based) and runs to the last block.
MULTI_STAGE_FIRST_BLOCK = 3
#: The paper's DeiT-S settings of about 3.0, 2.5 and 2.0 GFLOPs (multi-stage rho; single-stage K at block 3).
PAPER_RHOS = (1.0, 0.87, 0.72)
PAPER_KS = (108, 78, 48)
#: EViT's defaults (Liang et al. 2022, DeiT-S): blocks 3, 6 and 9 (0-based), keeping 70% of the patch tokens.
EVIT_BLOCKS = (3, 6, 9)
#: The ``distinct`` threshold of the library's recommended setting (``ATSConfig.recommended``).
RECOMMENDED_DISTINCT = 0.95
EVIT_KEEP_RATE = 0.7
#: SAINT's settings (Jeddi et al. 2025, its code's defaults): K matches, gamma, and the first half of 12 blocks.
SAINT_K = 5
SAINT_GAMMA = 10.0
SAINT_BLOCKS = tuple(range(6))


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
class ATSConfig:
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
        packing: "rows" runs linear layers and norms on valid tokens only; "padded" runs every
            later block on all padded positions with masked keys (the official code's way; slower).
    """

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
        budgets = {index: _as_budget(value) for index, value in sorted(self.blocks.items())}
        object.__setattr__(self, "budgets", budgets)

    @classmethod
    def multi_stage(cls, rho: float = 1.0, first: int = MULTI_STAGE_FIRST_BLOCK, depth: int = 12,
                    every: int = 1, **options) -> "ATSConfig":
        """ATS in blocks ``first, first + every, ... < depth`` (the paper: every block from 3 on) with
        ``K_n = max(floor(rho * tokens_in_n), min_tokens)``."""
        if isinstance(rho, int) and not isinstance(rho, bool):
            rho = float(rho)
        if not isinstance(rho, float):
            raise TypeError(f"rho must be a float in (0, 1], got {rho!r}")
        if not 0 <= first < depth:
            raise ValueError(f"first block {first} must lie in 0..{depth - 1} for a model of depth {depth}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number >= 1 (1: every block, 2: every other), got {every!r}")
        return cls(blocks={index: TokenBudget(rho=rho) for index in range(first, depth, every)}, **options)

    @classmethod
    def recommended(cls, depth: int = 12, **options) -> "ATSConfig":
        """The library's recommended setting: multi-stage rho = 1 with ``fuse`` and ``distinct`` =
        RECOMMENDED_DISTINCT, so each image keeps its own count and sampling loses what it would drop
        (docs/results.md: -0.06 points at 51.5% saved on the reference model)."""
        return cls.multi_stage(1.0, depth=depth, fuse=True, distinct=RECOMMENDED_DISTINCT, **options)

    @classmethod
    def single_stage(cls, k: int, block: int = MULTI_STAGE_FIRST_BLOCK, **options) -> "ATSConfig":
        """ATS in one block with a fixed number of samples K."""
        return cls(blocks={block: TokenBudget(k=k)}, **options)

    @property
    def first_block(self) -> int:
        """The first block ATS changes; the blocks before it run as in the unpatched model."""
        return min(self.budgets)

    def patched_blocks(self, depth: int) -> List[int]:
        """The blocks this config changes, in a model of ``depth`` blocks."""
        return list(self.budgets)

    def method_at(self, index: int) -> Optional["ATSConfig"]:
        """The config that runs block ``index`` (this one), or None when the block runs as usual."""
        return self if index in self.budgets else None

    def check_model(self, depth: int, has_cls: bool) -> None:
        """Raise ValueError naming why this config does not fit a model of ``depth`` blocks."""
        outside = [index for index in self.budgets if index >= depth]
        if outside:
            raise ValueError(f"ATS block indices {outside} lie outside this model's {depth} blocks (0..{depth - 1}); "
                             f"use ATSConfig.multi_stage(rho, depth={depth}) or smaller indices")
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
        if len(set(budgets)) == 1 and len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1, step)):
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

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> dict[int, BlockCost]:
        """FLOPs (n_in, n_out) -> count of each ATS block of a model with (or without) a class token, for
        flops.vit_flops."""
        return {index: partial(block_flops, shape, score=self.score_for(has_cls), fuse=self.fuse,
                                 distinct=bool(self.distinct)) for index in self.budgets}


@dataclass(frozen=True)
class MergeConfig:
    """The token-merging baseline (ToMe): in every block from ``first`` on, merge ``r`` patch tokens
    into their most similar ones after attention (bipartite soft matching, size-weighted average,
    proportional attention). The class and other prefix tokens never merge."""

    r: int
    first: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a whole number >= 1 (tokens merged per block), got {self.r!r}")
        if isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 0:
            raise ValueError(f"first must be a block index >= 0, got {self.first!r}")

    @property
    def first_block(self) -> int:
        """The first block merging changes; the blocks before it run as in the unpatched model."""
        return self.first

    @property
    def packing(self) -> str:
        return "rows"

    def patched_blocks(self, depth: int) -> List[int]:
        return list(range(self.first, depth))

    def method_at(self, index: int) -> Optional["MergeConfig"]:
        return self if index >= self.first else None

    def check_model(self, depth: int, has_cls: bool) -> None:
        if self.first >= depth:
            raise ValueError(f"merging from block {self.first} is outside this model's {depth} blocks")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return n - min(self.r, (n - prefix) // 2)

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> dict[int, BlockCost]:
        return {index: partial(merge_block_flops, shape) for index in self.patched_blocks(shape.depth)}

    def describe(self) -> str:
        return f"merge r={self.r}" + (f" from block {self.first}" if self.first else "")


@dataclass(frozen=True)
class KeepAllConfig:
    """Patch a model but drop no token: the blocks from ``first`` on run on every token through the shared
    ATS step. On most families that is the unpatched model; on CvT it is the linear-projection model
    (those blocks run without their convolutional q/k/v projections, as ATS needs), the baseline that
    separates what dropping the convolutions costs from what dropping tokens costs."""

    first: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 0:
            raise ValueError(f"first must be a block index >= 0, got {self.first!r}")

    @property
    def first_block(self) -> int:
        return self.first

    @property
    def packing(self) -> str:
        return "rows"

    def patched_blocks(self, depth: int) -> List[int]:
        return []

    def method_at(self, index: int) -> None:
        return None

    def check_model(self, depth: int, has_cls: bool) -> None:
        if self.first >= depth:
            raise ValueError(f"block {self.first} is outside this model's {depth} blocks (0..{depth - 1})")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return n

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> dict[int, BlockCost]:
        return {}

    def describe(self) -> str:
        return "keep all" + (f" from block {self.first}" if self.first else "")


def checked_blocks(blocks: Sequence[int], method: str, example: Tuple[int, ...]) -> Tuple[int, ...]:
    """``blocks`` as a sorted tuple of distinct 0-based block indices; ValueError naming ``method`` otherwise."""
    indices = tuple(blocks) if isinstance(blocks, Sequence) else ()
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(f"blocks must be a non-empty sequence of 0-based block indices, e.g. {example}, "
                         f"got {blocks!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{method} blocks {indices} name a block twice")
    return tuple(sorted(indices))


class ListedBlocks:
    """What a config that runs in the blocks it lists (``blocks``, sorted) answers alike: EViT, SAINT."""

    blocks: Tuple[int, ...]

    @property
    def first_block(self) -> int:
        return self.blocks[0]

    @property
    def packing(self) -> str:
        return "rows"

    def patched_blocks(self, depth: int) -> List[int]:
        return list(self.blocks)

    def method_at(self, index: int):
        return self if index in self.blocks else None

    def check_inside(self, depth: int, method: str, hint: str = "") -> None:
        """Raise ValueError when a listed block lies outside a model of ``depth`` blocks."""
        outside = [index for index in self.blocks if index >= depth]
        if outside:
            raise ValueError(f"{method} block indices {outside} lie outside this model's {depth} blocks "
                             f"(0..{depth - 1}){hint}")


@dataclass(frozen=True)
class EViTConfig(ListedBlocks):
    """EViT (Liang et al., ICLR 2022): in each of ``blocks``, after attention, keep the
    ``ceil(keep_rate * patch tokens)`` patch tokens with the highest class-token attention (averaged
    over heads) and fuse the rest into one token, their attention-weighted average, placed after the
    kept ones; it holds their patches (its size), which later attention counts like ``fuse`` does.
    The class token always stays. Stack it with an ATSConfig in other blocks: ``StackedConfig``."""

    keep_rate: float = EVIT_KEEP_RATE
    blocks: Tuple[int, ...] = EVIT_BLOCKS

    def __post_init__(self) -> None:
        if isinstance(self.keep_rate, bool) or not isinstance(self.keep_rate, (int, float)) or not (
                0.0 < self.keep_rate <= 1.0):
            raise ValueError(f"keep_rate must lie in (0, 1] (the share of patch tokens an EViT block keeps), got "
                             f"{self.keep_rate!r}; EViT's default is {EVIT_KEEP_RATE}")
        object.__setattr__(self, "keep_rate", float(self.keep_rate))
        object.__setattr__(self, "blocks", checked_blocks(self.blocks, "EViT", EVIT_BLOCKS))

    def check_model(self, depth: int, has_cls: bool) -> None:
        self.check_inside(depth, "EViT")
        if not has_cls:
            raise ValueError("EViT ranks tokens by the class token's attention and this model has no class token")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        kept = attentive_count(n - prefix, self.keep_rate)
        return prefix + kept + (kept < n - prefix)

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> dict[int, BlockCost]:
        return {index: partial(evit_block_flops, shape) for index in self.blocks}

    def describe(self) -> str:
        return f"EViT keep_rate={self.keep_rate:g} @ blocks {', '.join(map(str, self.blocks))}"


@dataclass(frozen=True)
class SAINTConfig(ListedBlocks):
    """SAINT (Jeddi et al. 2025, "Similarity-Aware Token Pruning"), training-free: in each of ``blocks``,
    after attention, the patch tokens alternate between sets A and B, and each image drops as many A tokens
    as it has A tokens with at least ``k`` B tokens whose keys (averaged over heads) are ``threshold``
    similar (cosine) or more; it drops those most redundant (``ats.saint``; ``gamma`` weighs how close the
    matches are against how many there are). Nothing is merged; the prefix tokens always stay. The default
    blocks are the first half of a 12-block model (the authors' setting): ``first_half`` for other depths.
    Each image drops its own count (the authors' code drops the batch mean from every image, docs/method.md).
    """

    threshold: float
    k: int = SAINT_K
    gamma: float = SAINT_GAMMA
    blocks: Tuple[int, ...] = SAINT_BLOCKS

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be a cosine similarity in (0, 1] (the B tokens at least this similar to "
                             f"an A token count as its matches), got {self.threshold!r}; try 0.9 to 0.97")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a whole number >= 1 (the matches that make an A token droppable), got "
                             f"{self.k!r}; SAINT's default is {SAINT_K}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (
                0.0 <= self.gamma < math.inf):
            raise ValueError(f"gamma must be a finite number >= 0 (how much closer matches outrank more matches), "
                             f"got {self.gamma!r}; SAINT's default is {SAINT_GAMMA:g}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "blocks", checked_blocks(self.blocks, "SAINT", SAINT_BLOCKS))

    @classmethod
    def first_half(cls, threshold: float, depth: int = 12, **options) -> "SAINTConfig":
        """SAINT in blocks ``0 .. depth // 2 - 1``, the first half of a model of ``depth`` blocks (at least block 0)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be the model's number of blocks (>= 1), got {depth!r}")
        return cls(threshold, blocks=tuple(range(max(depth // 2, 1))), **options)

    def check_model(self, depth: int, has_cls: bool) -> None:
        self.check_inside(depth, "SAINT", f"; use SAINTConfig.first_half(threshold, depth={depth})")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return n

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> dict[int, BlockCost]:
        """A SAINT block does a merging block's work: attention over all tokens, set A against set B, the MLP
        on the tokens kept."""
        return {index: partial(merge_block_flops, shape) for index in self.blocks}

    def describe(self) -> str:
        blocks = self.blocks
        if len(blocks) > 1 and blocks == tuple(range(blocks[0], blocks[-1] + 1)):
            where = f"blocks {blocks[0]}..{blocks[-1]}"
        else:
            where = f"block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"
        return f"SAINT threshold={self.threshold:g} (K={self.k}, gamma={self.gamma:g}) @ {where}"


@dataclass(frozen=True, init=False)
class StackedConfig:
    """Several token-reduction methods on one model, each in its own blocks, e.g. the paper's EViT + ATS
    (supplement Table 5): ``StackedConfig(EViTConfig(0.7), ATSConfig({4: 0.7, 5: 0.7, 7: 0.7, ...}))``."""

    configs: Tuple[Union[ATSConfig, EViTConfig], ...]

    def __init__(self, *configs: Union[ATSConfig, EViTConfig]) -> None:
        for config in configs:
            if not isinstance(config, (ATSConfig, EViTConfig)):
                raise TypeError(f"StackedConfig stacks ATSConfig and EViTConfig, got {type(config).__name__}"
                                + ("; merging runs in every block from its first, so it cannot share a model"
                                   if isinstance(config, MergeConfig) else ""))
        if len(configs) < 2:
            raise ValueError("StackedConfig takes two or more configs; pass a single config to ats.patch directly")
        owner: dict = {}
        for config in configs:
            for index in config.patched_blocks(0):
                if index in owner:
                    pair = (config, owner[index])
                    evit = next((c.blocks for c in pair if isinstance(c, EViTConfig)), EVIT_BLOCKS)
                    raise ValueError(
                        f"{pair[0].describe()} and {pair[1].describe()} both claim block {index}: each block runs one "
                        f"method. Give them separate blocks, e.g. ATS in the blocks EViT leaves free: "
                        f"ATSConfig(blocks={{i: 0.7 for i in range({index}, depth) if i not in {evit}}})")
                owner[index] = config
        evit = [config for config in configs if isinstance(config, EViTConfig)]
        if evit and any(isinstance(config, ATSConfig) and not config.keep_cls for config in configs):
            raise ValueError("EViT needs the class token, so it cannot be stacked with ATSConfig(keep_cls=False)")
        object.__setattr__(self, "configs", tuple(configs))

    @property
    def first_block(self) -> int:
        return min(config.first_block for config in self.configs)

    @property
    def packing(self) -> str:
        return "padded" if any(config.packing == "padded" for config in self.configs) else "rows"

    def patched_blocks(self, depth: int) -> List[int]:
        return sorted(index for config in self.configs for index in config.patched_blocks(depth))

    def method_at(self, index: int) -> Optional[Union[ATSConfig, EViTConfig]]:
        return next((config for config in self.configs if config.method_at(index) is not None), None)

    def check_model(self, depth: int, has_cls: bool) -> None:
        for config in self.configs:
            config.check_model(depth, has_cls)

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return self.method_at(index).most_tokens_out(index, n, prefix)

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> dict[int, BlockCost]:
        return {index: cost for config in self.configs for index, cost in config.block_costs(shape, has_cls).items()}

    def describe(self) -> str:
        return " + ".join(config.describe() for config in self.configs)


def with_ats_options(config: "PatchConfig", **changes) -> "PatchConfig":
    """``config`` with ``changes`` (ATSConfig fields, e.g. stochastic=True) made to its ATS configs;
    EViT and merging configs come back as they are."""
    if isinstance(config, ATSConfig):
        return dataclasses.replace(config, **changes)
    if isinstance(config, StackedConfig):
        return StackedConfig(*(with_ats_options(part, **changes) for part in config.configs))
    return config


def token_capacities(config: Optional["PatchConfig"], num_tokens: int, prefix: int, depth: int) -> List[int]:
    """The most tokens (prefix included) each of ``depth`` blocks can emit under ``config`` (None: unpatched) from
    ``num_tokens`` entering block 0: every sample a distinct token. The bound of ``ats.gflops`` and the fixed
    widths of static mode."""
    capacities, n = [], num_tokens
    for index in range(depth):
        if config is not None and config.method_at(index) is not None:
            n = config.most_tokens_out(index, n, prefix)
        capacities.append(n)
    return capacities


#: What ``ats.patch`` takes: ATS, EViT, both stacked, the token-merging baseline, SAINT, or no dropping at all.
PatchConfig = Union[ATSConfig, EViTConfig, StackedConfig, MergeConfig, SAINTConfig, KeepAllConfig]
#: The config types ``ats.patch`` takes, for isinstance checks.
PATCH_CONFIGS = (ATSConfig, EViTConfig, StackedConfig, MergeConfig, SAINTConfig, KeepAllConfig)
