"""What a token-reduction method tells the step and the FLOP count: the ``Method`` base of every config that
``ats.patch`` takes (``ats.methods`` holds them, one module each, and the registry), and the token widths a
config implies.

A method is a frozen dataclass subclassing ``Method``. It says in which blocks it runs (``blocks``, or its own
``patched_blocks``/``method_at``), the most tokens each of its blocks can emit (the bound of ``ats.gflops`` and
the widths of static mode), each block's FLOPs, a label, and what one of its blocks does (``run_block``, on the
block's ``step.BlockParts`` and a packed ``TokenBatch``). Everything else has a default here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Collection, Dict, List, Optional, Sequence, Tuple, Union

from .flops import BlockCost, ViTShape
from .packing import TokenBatch
from .stats import ForwardRecord


@dataclass(frozen=True)
class BlockContext:
    """Where a method's block runs: its index in the model, the model's prefix tokens (class, distillation,
    registers) and whether one is a class token, what the forward records, and the width of the block's output in
    static mode (None: adaptive, each batch as wide as its longest image)."""

    index: int
    prefix: int
    has_cls: bool
    record: ForwardRecord
    capacity: Optional[int] = None


@dataclass(frozen=True)
class Method(ABC):
    """The base of a token-reduction method's config. The defaults fit a method that runs in the blocks it lists
    (``blocks``, a field of the subclass: a collection of 0-based indices, or a mapping whose keys are they).

    restore: a keyword field every method shares. None: a patched model's token outputs hold the kept tokens
    only. A rule of ``ats.merging.RESTORE_RULES`` ("fuse", "nearest", "own", "mix"), or True for the default
    (``DEFAULT_RESTORE_RULE``): they come back as the full grid in the original order, each dropped position
    rebuilt by that rule (docs/method.md, "Dense features"); the classification output and ``ats.last_stats``
    are the same either way.
    """

    #: One line naming the method, for messages and the command line's help.
    summary: ClassVar[str] = ""
    restore: Union[None, bool, str] = field(default=None, kw_only=True)

    @property
    def first_block(self) -> int:
        """The first block the method changes; the blocks before it run as in the unpatched model."""
        return min(self.blocks)

    @property
    def packing(self) -> str:
        """"rows" (linear layers on valid tokens only) or "padded" (every padded position, keys masked)."""
        return "rows"

    def patched_blocks(self, depth: int) -> List[int]:
        """The blocks the method changes in a model of ``depth`` blocks."""
        return sorted(self.blocks)

    def method_at(self, index: int) -> Optional["Method"]:
        """The method that runs block ``index`` (this one), or None when the block runs as usual."""
        return self if index in self.blocks else None

    def check_model(self, depth: int, has_cls: bool) -> None:
        """Raise ValueError naming why the method does not fit a model of ``depth`` blocks."""
        check_blocks_inside(self.blocks, depth, type(self).__name__)

    def for_depth(self, depth: int) -> "Method":
        """The method on a model of ``depth`` blocks: itself, or with a schedule given without a depth (e.g. "from
        block 3 to the last") spelt out; ``ats.patch`` patches with this."""
        return self

    @abstractmethod
    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        """The most tokens block ``index`` can emit from ``n`` (``prefix`` prefix tokens included)."""

    @abstractmethod
    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        """FLOPs (n_in, n_out) -> count of each block the method changes (``flops.block_flops`` for the rest)."""

    @abstractmethod
    def describe(self) -> str:
        """A short label, e.g. ``rho=0.7 @ blocks 3..11``."""

    def run_block(self, parts: Any, batch: TokenBatch, context: BlockContext) -> TokenBatch:
        """Run block ``context.index`` (its ``step.BlockParts``) on ``batch``; record what it chose in
        ``context.record``. Side-effect free, so gradient checkpointing may run it again."""
        raise TypeError(f"{type(self).__name__} runs no block of its own")


class FromBlock(Method):
    """A method that changes every block from its ``first`` (a field of the subclass) on."""

    first: int

    def __post_init__(self) -> None:
        if isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 0:
            raise ValueError(f"first must be a block index >= 0, got {self.first!r}")

    @property
    def first_block(self) -> int:
        return self.first


def check_blocks_inside(blocks: Collection[int], depth: int, method: str, hint: str = "") -> None:
    """Raise ValueError when one of ``blocks`` lies outside a model of ``depth`` blocks."""
    outside = [index for index in sorted(blocks) if index >= depth]
    if outside:
        raise ValueError(f"{method} block indices {outside} lie outside this model's {depth} blocks "
                         f"(0..{depth - 1}){hint}")


def checked_blocks(blocks: Sequence[int], method: str, example: Tuple[int, ...]) -> Tuple[int, ...]:
    """``blocks`` as a sorted tuple of distinct 0-based block indices; ValueError naming ``method`` otherwise."""
    indices = tuple(blocks) if isinstance(blocks, Sequence) else ()
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(f"blocks must be a non-empty sequence of 0-based block indices, e.g. {example}, "
                         f"got {blocks!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{method} blocks {indices} name a block twice")
    return tuple(sorted(indices))


def token_capacities(config: Optional[Method], num_tokens: int, prefix: int, depth: int) -> List[int]:
    """The most tokens (prefix included) each of ``depth`` blocks can emit under ``config`` (None: unpatched) from
    ``num_tokens`` entering block 0: every sample a distinct token. The bound of ``ats.gflops`` and the fixed
    widths of static mode."""
    capacities, n = [], num_tokens
    for index in range(depth):
        method = None if config is None else config.method_at(index)
        if method is not None:
            n = method.most_tokens_out(index, n, prefix)
        capacities.append(n)
    return capacities
