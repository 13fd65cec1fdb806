"""Several methods on one model, each in its own blocks (``StackedConfig``), e.g. the paper's EViT + ATS."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple, Union

from ..flops import BlockCost, ViTShape
from ..method import Method
from .adaptive_sampling import ATSConfig
from .evit import EVIT_BLOCKS, EViTConfig
from .token_merging import MergeConfig

#: The depth the blocks of stacked configs are compared at before a model is known: deep enough that a schedule
#: running to the last block claims every block another config lists.
STACK_DEPTH = 4096


@dataclass(frozen=True, init=False)
class StackedConfig(Method):
    """Several token-reduction methods on one model, each in its own blocks, e.g. the paper's EViT + ATS
    (supplement Table 5): ``StackedConfig(EViTConfig(0.7), ATSConfig({4: 0.7, 5: 0.7, 7: 0.7, ...}))``;
    ``restore`` (keyword) restores the dropped tokens of all of them (``Method``)."""

    summary: ClassVar[str] = "ATS and EViT stacked, each in its own blocks"

    configs: Tuple[Union[ATSConfig, EViTConfig], ...]

    def __init__(self, *configs: Union[ATSConfig, EViTConfig], restore: Union[None, bool, str] = None) -> None:
        for config in configs:
            if not isinstance(config, (ATSConfig, EViTConfig)):
                raise TypeError(f"StackedConfig stacks ATSConfig and EViTConfig, got {type(config).__name__}"
                                + ("; merging runs in every block from its first, so it cannot share a model"
                                   if isinstance(config, MergeConfig) else ""))
        if len(configs) < 2:
            raise ValueError("StackedConfig takes two or more configs; pass a single config to ats.patch directly")
        owner: dict = {}
        for config in configs:
            for index in config.patched_blocks(STACK_DEPTH):
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
        object.__setattr__(self, "restore", restore)

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

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        return {index: cost for config in self.configs for index, cost in config.block_costs(shape, has_cls).items()}

    def describe(self) -> str:
        return " + ".join(config.describe() for config in self.configs)

    def for_depth(self, depth: int) -> "StackedConfig":
        return StackedConfig(*(config.for_depth(depth) for config in self.configs), restore=self.restore)


def with_ats_options(config: Method, **changes) -> Method:
    """``config`` with ``changes`` (ATSConfig fields, e.g. stochastic=True) made to its ATS configs;
    EViT and merging configs come back as they are."""
    if isinstance(config, ATSConfig):
        return dataclasses.replace(config, **changes)
    if isinstance(config, StackedConfig):
        return StackedConfig(*(with_ats_options(part, **changes) for part in config.configs), restore=config.restore)
    return config


