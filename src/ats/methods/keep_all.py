"""Patch a model but drop no token (``KeepAllConfig``): the baseline that separates what running the blocks
through the shared step costs (on CvT: its linear q/k/v projections) from what dropping tokens costs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List

from ..flops import BlockCost, ViTShape
from ..method import FromBlock


@dataclass(frozen=True)
class KeepAllConfig(FromBlock):
    """Patch a model but drop no token: the blocks from ``first`` on run on every token through the shared
    ATS step. On most families that is the unpatched model; on CvT it is the linear-projection model
    (those blocks run without their convolutional q/k/v projections, as ATS needs), the baseline that
    separates what dropping the convolutions costs from what dropping tokens costs."""

    summary: ClassVar[str] = "no dropping: every token through the shared step; on CvT, the linear-projection model"

    first: int = 0

    def patched_blocks(self, depth: int) -> List[int]:
        return []

    def method_at(self, index: int) -> None:
        return None

    def check_model(self, depth: int, has_cls: bool) -> None:
        if self.first >= depth:
            raise ValueError(f"block {self.first} is outside this model's {depth} blocks (0..{depth - 1})")

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return n

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        return {}

    def describe(self) -> str:
        return "keep all" + (f" from block {self.first}" if self.first else "")


