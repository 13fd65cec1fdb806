"""What a model family's adapter tells ATS, and the patching every family shares.

An adapter (a ``Family``) says where a model keeps its blocks and their parts (``BlockParts``), how
images become tokens, how tokens become outputs, and what the model's sizes are. Patching swaps the
model's class for a subclass whose forward runs ``ats.step.run_blocks``; the weights stay untouched
and unpatching restores the class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ..config import PatchConfig, token_capacities
from ..flops import BlockCost, ViTShape, block_flops, head_cost
from ..packing import TORCHSCRIPT_REFUSAL, TokenBatch
from ..stats import ATSStats, ForwardRecord
from ..step import BlockParts, run_blocks

#: How many times any module has been given a submodule (``nn.Module.__setattr__`` of a module, e.g. an
#: adapter library swapping a block's linear layer): block parts cached before a change are stale.
_submodule_changes = [0]


def _count_submodule_change(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    _submodule_changes[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_submodule_change)


@dataclass
class ATSState:
    """What a patched model carries: its config, its original class, whether it runs in static mode, the last
    forward's stats, its shapes by input size (C, H, W), and the block parts of its last forward with what they
    depend on (not pickled: they are rebuilt on the first forward)."""

    config: PatchConfig
    original_class: Type[nn.Module]
    static: bool = False
    last_stats: Optional[ATSStats] = None
    pool_weights: Optional[torch.Tensor] = None
    shapes: Dict[Tuple[int, ...], ViTShape] = field(default_factory=dict)
    parts_key: Any = None
    parts: Optional[List[BlockParts]] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "parts_key": None, "parts": None}


class Family:
    """The adapter of one family of models: subclasses fill in where things are."""

    #: How errors and docs name the family, e.g. "timm VisionTransformer".
    name: str = ""
    #: The mixin put before a patched model's own class (it overrides the forward); a PatchedModel.
    mixin: type = object

    def owns(self, cls: type) -> bool:
        """Whether models of class ``cls`` (the unpatched class) belong to this family."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise TypeError naming what in ``model`` ATS cannot run (an unusual block, pooling, ...)."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def block_parts(self, block: nn.Module) -> BlockParts:
        raise NotImplementedError

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        """The model's sizes for images of ``input_size`` (C, H, W), default its own."""
        raise NotImplementedError

    def has_class_token(self, model: nn.Module) -> bool:
        return True

    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        """(C, H, W) the model takes by default."""
        raise NotImplementedError

    def data_config(self, model: nn.Module) -> dict:
        """timm-style preprocessing (input_size, mean, std, interpolation, crop_pct, crop_mode)."""
        raise NotImplementedError

    def class_names(self, model: nn.Module) -> Optional[Sequence[str]]:
        return None

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the tokens entering block 0, [B, N, C']."""
        raise NotImplementedError

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, classes] of ``model`` (patched or not) on images [B, C, H, W]."""
        raise NotImplementedError

    def logits_from_block(self, model: nn.Module, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits of ``model`` (patched or not) from ``run_first_blocks(model, images, start)``: the same as
        ``logits(model, images)``, without running the first ``start`` blocks again."""
        raise NotImplementedError

    def checkpoint_function(self, model: nn.Module, block: nn.Module) -> Optional[Callable]:
        """How to checkpoint ``block`` when the user turned on gradient checkpointing the family's way
        (called like ``torch.utils.checkpoint.checkpoint``), else None."""
        return None

    def all_block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """The parts of every block for a forward on images of ``input_size`` (C, H, W), each with its
        gradient checkpointing."""
        all_parts = []
        for block in self.blocks(model):
            parts = self.block_parts(block)
            parts.checkpoint = self.checkpoint_function(model, block)
            all_parts.append(parts)
        return all_parts

    def block_costs(self, model: nn.Module, shape: ViTShape, config: Optional[PatchConfig]) -> Dict[int, BlockCost]:
        """The FLOPs (n_in, n_out) -> count of every block that is not a standard one (``flops.block_flops``)
        under ``config`` (None: the unpatched model)."""
        return {} if config is None else config.block_costs(shape, self.has_class_token(model))

    def depth(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def run_first_blocks(self, model: nn.Module, images: torch.Tensor, count: int) -> torch.Tensor:
        """The tokens [B, N, C'] after the first ``count`` blocks, run as in the unpatched model (the
        blocks before a patched model's first patched block are exactly these)."""
        x = self.embed(model, images)
        for block in self.blocks(model)[:count]:
            x = block(x)
        return x

    def check_config(self, model: nn.Module, config: PatchConfig) -> None:
        """Raise ValueError naming why ``config`` does not fit ``model``."""
        config.check_model(self.depth(model), self.has_class_token(model))

    def runs_static(self, model: nn.Module) -> bool:
        """Whether ``model``'s blocks run through ``step.run_blocks``, which has a static mode."""
        return True

    def patch(self, model: nn.Module, config: PatchConfig, static: bool = False) -> nn.Module:
        """Apply ``config`` to ``model`` in place (in static mode with ``static``); re-patching replaces both."""
        self.check(model)
        self.check_config(model, config)
        if static and not self.runs_static(model):
            raise ValueError(f"static mode is not available for {type(model).__name__} yet: its blocks run on tubes "
                             "(ats.tubes), which only the adaptive mode packs; patch it without static=True")
        state: Optional[ATSState] = getattr(model, "_ats", None)
        original = state.original_class if state is not None else type(model)
        model._ats = ATSState(config=config, original_class=original, static=static)
        model.__class__ = _patched_class(self.mixin, original)
        return model

    def run_blocks(self, model: nn.Module, x: torch.Tensor, shape: ViTShape, start: int,
                   input_size: Sequence[int]) -> Tuple[TokenBatch, ForwardRecord]:
        """``step.run_blocks`` on a patched model's blocks from ``start`` (a family whose blocks are not
        pre-norm blocks runs them its own way here)."""
        return self.run_parts(model, self.cached_block_parts(model, input_size), x, shape, start)

    def run_parts(self, model: nn.Module, parts: Sequence[BlockParts], x: torch.Tensor, shape: ViTShape,
                  start: int) -> Tuple[TokenBatch, ForwardRecord]:
        """``step.run_blocks`` on the blocks ``parts`` of a patched model from ``start``, as it is patched."""
        state: ATSState = model._ats
        return run_blocks(parts, x, state.config, shape.num_prefix_tokens, self.has_class_token(model), start,
                          state.static)

    def cached_block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """``all_block_parts``, rebuilt only when the input size, a block's training mode or gradient
        checkpointing changed, or some module was given a new submodule since (building them costs
        about 40 us a block, which is noticeable at batch 1)."""
        if torch.compiler.is_compiling():  # built once while tracing, as ``cached_shape``
            return self.all_block_parts(model, input_size)
        state: ATSState = model._ats
        blocks = self.blocks(model)
        key = (tuple(input_size), _submodule_changes[0], tuple(block.training for block in blocks),
               tuple(self.checkpoint_function(model, block) for block in blocks))
        if state.parts_key != key:
            state.parts, state.parts_key = self.all_block_parts(model, input_size), key
        return state.parts

    def cached_shape(self, model: nn.Module, input_size: Sequence[int]) -> ViTShape:
        """``shape`` of a patched model, computed once per input size (under torch.compile, once while tracing:
        a graph that read the cache would be compiled again whenever it grew)."""
        if torch.compiler.is_compiling():
            return self.shape(model, input_size)
        shapes = model._ats.shapes
        key = tuple(input_size)
        if key not in shapes:
            shapes[key] = self.shape(model, input_size)
        return shapes[key]

    def run_patched(self, model: nn.Module, x: torch.Tensor, start: int,
                    input_size: Sequence[int]) -> TokenBatch:
        """Run a patched model's blocks from ``start`` on the tokens x [B, N, C'] (see ``run_blocks``),
        keep the forward's statistics on the model and return the packed tokens."""
        state: ATSState = model._ats
        shape = self.cached_shape(model, input_size)
        batch, record = self.run_blocks(model, x, shape, start, input_size)
        state.last_stats = record.finish(shape, self.block_costs(model, shape, state.config))
        state.pool_weights = batch.padded_sizes() * batch.position_mask
        return batch


class PatchedModel:
    """The base of every family's mixin. A patched class is made at run time (mixin + the model's own
    class), so pickle cannot find it by name: a patched model pickles as (mixin, original class) and
    its state, and unpickles patched, with the same config (torch.save / torch.load, deepcopy,
    multiprocessing)."""

    def __prepare_scriptable__(self):
        """torch.jit.script asks this first: refused, with the reason and what to use (``packing.refuse_tracing``)."""
        raise RuntimeError(TORCHSCRIPT_REFUSAL)

    def __reduce_ex__(self, protocol: int):
        _, _, *state = object.__reduce_ex__(self, max(protocol, 2))
        return (_new_patched, (type(self).__bases__[0], self._ats.original_class), *state)


def _new_patched(mixin: type, base: type) -> nn.Module:
    """An empty instance of the patched class of ``base`` (pickle then restores its state)."""
    return object.__new__(_patched_class(mixin, base))


_PATCHED_CLASSES: Dict[Tuple[type, type], type] = {}


def _patched_class(mixin: type, base: type) -> type:
    if (mixin, base) not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[mixin, base] = type(f"ATS{base.__name__}", (mixin, base), {})
    return _PATCHED_CLASSES[mixin, base]


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's original class; its forward is then exactly the unpatched one."""
    state: Optional[ATSState] = getattr(model, "_ats", None)
    if state is None:
        raise ValueError("this model is not patched with ATS; nothing to unpatch")
    model.__class__ = state.original_class
    del model._ats
    return model


def last_stats(model: nn.Module) -> ATSStats:
    """Statistics of the last forward of a patched model (tokens per block, GFLOPs per image, ...)."""
    state: Optional[ATSState] = getattr(model, "_ats", None)
    if state is None:
        raise ValueError("this model is not patched with ATS; call ats.patch(model, config) first")
    if state.last_stats is None:
        raise ValueError("no forward has run since the model was patched; run model(images) first")
    return state.last_stats


def fit_channels(values: Sequence[float], channels: int) -> Tuple[float, ...]:
    """A per-channel mean or std for ``channels`` channels: as given, or averaged and repeated to fit."""
    values = tuple(values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def masked_features(batch: TokenBatch, features: torch.Tensor) -> torch.Tensor:
    """Per-row features [T, C] -> padded [B, m, C], zeros on padding."""
    x = batch.pad(features)
    return x if batch.full else x * batch.position_mask.unsqueeze(-1)  # a multiply: far cheaper than masked_fill


def valid_mean(x: torch.Tensor, weights: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The mean of features x [B, m, C] over each image's tokens from position ``start`` on, weighted by
    ``weights`` [B, m] (each token's size, 0 on padding) -> [B, C]."""
    x, weights = x[:, start:], weights[:, start:, None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


def upper_bound_flops(shape: ViTShape, config: Optional[PatchConfig], costs: Mapping[int, BlockCost]) -> float:
    """FLOPs per image when every sample is a distinct token (the most a patched forward can cost);
    costs: ``Family.block_costs`` of the model under ``config``."""
    total = shape.patch_embed_flops
    n = shape.num_tokens
    for index, n_out in enumerate(token_capacities(config, n, shape.num_prefix_tokens, shape.depth)):
        total += costs[index](n, n_out) if index in costs else block_flops(shape, n, n)
        n = n_out
    return total + head_cost(shape, n)
