"""What a model family's adapter tells ATS (``Family``: a description), and the one patched forward that runs any
described model (``patch``, ``run_patched``, ``unpatch``, ``last_stats``).

An adapter says where a model keeps its blocks and their parts (``BlockParts``), how inputs become tokens, what
the model's sizes are and how its inputs are preprocessed. Patching swaps the model's class for a subclass (the
family's ``mixin``, a ``PatchedModel``) whose forward embeds the inputs (``Family.embed``), runs the blocks through
``run_patched`` and turns the packed tokens into the model's own output; the weights stay untouched and
unpatching restores the class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..flops import BlockCost, ViTShape, block_flops, head_cost
from ..merging import restore_rule
from ..method import Method, token_capacities
from ..packing import TORCHSCRIPT_REFUSAL, TokenBatch
from ..stats import ATSStats, ForwardRecord
from ..step import BlockParts, run_blocks

#: How many times any module has been given a submodule (``nn.Module.__setattr__`` of a module, e.g. an
#: adapter library swapping a block's linear layer): block parts cached before a change are stale.
_submodule_changes = [0]


def _count_submodule_change(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    _submodule_changes[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_submodule_change)


class Family:
    """The adapter of one family of models: a description that subclasses fill in."""

    #: How errors and docs name the family, e.g. "timm VisionTransformer".
    name: str = ""
    #: The mixin put before a patched model's own class (its forward); a PatchedModel.
    mixin: type = object
    #: The model classes the family takes (their subclasses too), or class names: a transformers class by its
    #: name, another package's by module and name (``"open_clip.transformer.VisionTransformer"``), so that the
    #: package is imported only when one of its models is met.
    models: Tuple[Union[type, str], ...] = ()

    def check(self, model: nn.Module, config: Optional[Method] = None, static: bool = False) -> None:
        """Raise TypeError naming what in ``model`` ATS cannot run (an unusual block, pooling, ...), and
        ValueError naming why ``config`` (in static mode with ``static``) does not fit it."""
        if config is not None:
            config.check_model(len(self.blocks(model)), self.shape(model).has_class_token)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def block_parts(self, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
        """The parts of every block for a forward on inputs of ``input_size`` (C, H, W), each with its gradient
        checkpointing as the user turned it on the family's way (``BlockParts.checkpoint``)."""
        raise NotImplementedError

    def shape(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ViTShape:
        """The model's sizes for inputs of ``input_size`` (C, H, W), default its own."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> Tuple[int, ...]:
        """(C, H, W) the model takes by default ((T, C, H, W) for a video model)."""
        raise NotImplementedError

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Inputs -> the tokens entering block 0 in the layout ``run_blocks`` takes, [B, N, C']."""
        raise NotImplementedError

    def run_blocks(self, model: nn.Module, x: torch.Tensor, shape: ViTShape, start: int, input_size: Sequence[int],
                   stop: Optional[int] = None) -> Tuple[TokenBatch, ForwardRecord]:
        """``step.run_blocks`` on a patched model's blocks ``start`` to ``stop`` (default: the last); a family whose
        attention depends on positions adds this forward's rotations or biases to the parts here, and one whose
        blocks run on tubes runs ``ats.tubes``."""
        return run_parts(model, cached_block_parts(self, model, input_size)[:stop], x, shape, start)

    def block_costs(self, model: nn.Module, shape: ViTShape, config: Optional[Method]) -> Dict[int, BlockCost]:
        """The FLOPs (n_in, n_out) -> count of every block that is not a standard one (``flops.block_flops``)
        under ``config`` (None: the unpatched model)."""
        return {} if config is None else config.block_costs(shape, shape.has_class_token)

    def data_config(self, model: nn.Module) -> Dict[str, Any]:
        """How the model's inputs are preprocessed, timm-style (input_size, mean, std, interpolation, crop_pct,
        crop_mode; num_frames for a video model), and ``class_names``: its classes by index, or None."""
        raise NotImplementedError


def check_image_size(images: torch.Tensor, expected: Sequence[int], how: str) -> None:
    """Raise ValueError unless ``images`` are [B, *expected]; ``how`` says how to make them so."""
    if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != tuple(expected):
        raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}] for this model, got "
                         f"{list(images.shape)}; {how}")


def owns(family: Family, cls: type) -> bool:
    """Whether models of class ``cls`` (the unpatched class) belong to ``family`` (``Family.models``)."""
    return any(named(cls, model) if isinstance(model, str) else issubclass(cls, model) for model in family.models)


def named(cls: type, name: str) -> bool:
    """Whether ``cls`` is the class ``name``: a transformers class's name, or another's module and name."""
    if "." in name:
        return f"{cls.__module__}.{cls.__qualname__}" == name
    return cls.__name__ == name and cls.__module__.startswith("transformers.")


def check_block_types(blocks: Sequence[nn.Module], kinds: Mapping[type, Collection[type]], supported: str,
                      reasons: Mapping[str, str] = {}) -> None:
    """Raise TypeError naming the first of ``blocks`` whose class is not a key of ``kinds``, or whose attention
    (``attn``) is not of a class its entry names (an empty entry: any); ``supported`` says what ATS takes, and
    ``reasons`` why it refuses known block or attention classes (by class name)."""
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        allowed = kinds.get(type(block))
        if allowed is None or (allowed and type(attn) not in allowed):
            held = "" if attn is None else f" with {type(attn).__name__}"
            reason = reasons.get(type(block).__name__) or reasons.get(type(attn).__name__)
            why = f": {reason}" if reason else ""
            raise TypeError(f"block {index} is a {type(block).__name__}{held}{why}; ATS supports {supported}")


@dataclass
class ATSState:
    """What a patched model carries: its family, config and original class, whether it runs in static mode, the
    last forward's stats and record (``token_map`` reads its restore data and tapped outputs), its shapes by input
    size (C, H, W), and the block parts of its last forward with what they depend on (neither record nor parts
    pickled: they come with the next forward); taps: the blocks whose outputs the running forward keeps; lengths:
    each image's token count where the running forward's inputs come padded (None: all of them)."""

    family: Family
    config: Method
    original_class: Type[nn.Module]
    static: bool = False
    last_stats: Optional[ATSStats] = None
    record: Optional[ForwardRecord] = None
    taps: Tuple[int, ...] = ()
    lengths: Optional[torch.Tensor] = None
    pool_weights: Optional[torch.Tensor] = None
    shapes: Dict[Tuple[int, ...], ViTShape] = field(default_factory=dict)
    parts_key: Any = None
    parts: Optional[List[BlockParts]] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "parts_key": None, "parts": None, "record": None}


class PatchedModel:
    """The base of every family's mixin. A patched class is made at run time (mixin + the model's own
    class), so pickle cannot find it by name: a patched model pickles as (mixin, original class) and
    its state, and unpickles patched, with the same config (torch.save / torch.load, deepcopy,
    multiprocessing)."""

    #: Whether the patched model's token outputs come back as the full grid under a config's ``restore``.
    restores: bool = False

    def ats_logits(self, batch: TokenBatch) -> torch.Tensor:
        """The class logits [B, classes] from the packed tokens after the last block."""
        raise NotImplementedError

    def __prepare_scriptable__(self):
        """torch.jit.script asks this first: refused, with the reason and what to use (``ats.packing``)."""
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


def patch_with(family: Family, model: nn.Module, config: Method, static: bool = False) -> nn.Module:
    """Apply ``config`` to ``model`` of ``family`` in place (in static mode with ``static``); re-patching replaces
    both. A schedule given without a depth is spelt out for the model's (``Method.for_depth``)."""
    config = config.for_depth(len(family.blocks(model)))
    if restore_rule(config.restore) is not None and not family.mixin.restores:
        raise ValueError(f"restore is not supported on {family.name}: its token outputs hold the kept tokens only "
                         "(timm's ViT, Eva and Beit and the Hugging Face image families restore); patch without it")
    family.check(model, config, static)
    state: Optional[ATSState] = getattr(model, "_ats", None)
    original = state.original_class if state is not None else type(model)
    model._ats = ATSState(family=family, config=config, original_class=original, static=static)
    model.__class__ = _patched_class(family.mixin, original)
    return model


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


def run_parts(model: nn.Module, parts: Sequence[BlockParts], x: torch.Tensor, shape: ViTShape,
              start: int) -> Tuple[TokenBatch, ForwardRecord]:
    """``step.run_blocks`` on the blocks ``parts`` of a patched model from ``start``, as it is patched."""
    state: ATSState = model._ats
    return run_blocks(parts, x, state.config, shape.num_prefix_tokens, shape.has_class_token, start, state.static,
                      state.taps, state.lengths)


def cached_block_parts(family: Family, model: nn.Module, input_size: Sequence[int]) -> List[BlockParts]:
    """``family.block_parts`` of a patched model, rebuilt only when the input size, a block's training mode or
    gradient checkpointing changed, or some module was given a new submodule since (building them costs about
    40 us a block, which is noticeable at batch 1; under torch.compile they are built while tracing, so that no
    guard watches the cache)."""
    if torch.compiler.is_compiling() or not hasattr(model, "_ats"):
        return family.block_parts(model, input_size)
    state: ATSState = model._ats
    blocks = family.blocks(model)
    key = (tuple(input_size), _submodule_changes[0], tuple(block.training for block in blocks),
           tuple(_checkpointing(block) for block in blocks), getattr(model, "grad_checkpointing", None))
    if state.parts_key != key:
        state.parts, state.parts_key = family.block_parts(model, input_size), key
    return state.parts


def _checkpointing(block: nn.Module) -> Any:
    """What a block's gradient checkpointing depends on, the transformers way (timm's is the model's flag)."""
    return getattr(block, "gradient_checkpointing", None), getattr(block, "_gradient_checkpointing_func", None)


def cached_shape(family: Family, model: nn.Module, input_size: Sequence[int]) -> ViTShape:
    """``family.shape`` of a patched model, computed once per input size (under torch.compile, once while tracing:
    a graph that read the cache would be compiled again whenever it grew)."""
    if torch.compiler.is_compiling():
        return family.shape(model, input_size)
    shapes = model._ats.shapes
    key = tuple(input_size)
    if key not in shapes:
        shapes[key] = family.shape(model, input_size)
    return shapes[key]


def run_patched(model: nn.Module, x: torch.Tensor, start: int, input_size: Sequence[int],
                stop: Optional[int] = None, taps: Sequence[int] = (), lengths: Optional[torch.Tensor] = None
                ) -> TokenBatch:
    """Run a patched model's blocks ``start`` to ``stop`` (default the last) on the tokens x [B, N, C'] the blocks
    before ``start`` made (``Family.embed``'s layout), keep the forward's statistics and record on the model and
    return the packed tokens; the record keeps the outputs of the blocks ``taps`` (``tapped_maps``). lengths: [B]
    long, each image's token count where inputs come padded (its first ones in x), for ``run_parts``."""
    state: ATSState = model._ats
    shape = cached_shape(state.family, model, input_size)
    state.taps, state.lengths = tuple(taps), lengths
    try:
        batch, record = state.family.run_blocks(model, x, shape, start, input_size, stop)
    finally:
        state.taps, state.lengths = (), None
    state.record = record
    state.last_stats = record.finish(shape, state.family.block_costs(model, shape, state.config))
    state.pool_weights = batch.padded_sizes() * batch.position_mask
    return batch


def token_map(model: nn.Module, batch: TokenBatch, norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The packed tokens after a patched model's last block through its per-token final ``norm``: the kept ones
    [B, m, C] (zeros on padding), or with the config's ``restore`` the full map [B, N, C] in the original order."""
    return model._ats.record.token_map(batch, norm)


def tapped_maps(model: nn.Module, norm: Callable[[torch.Tensor], torch.Tensor]) -> Dict[int, torch.Tensor]:
    """The outputs of the blocks the last forward tapped (``run_patched``'s ``taps``), block index -> token map
    as ``token_map`` gives it (restored from the tokens dropped up to that block)."""
    record: ForwardRecord = model._ats.record
    return {index: record.token_map(batch, norm, dropped) for index, (batch, dropped) in record.outputs.items()}


def as_logits(output) -> torch.Tensor:
    """A forward's class logits: the tensor a timm model returns, or a transformers output's ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"this model returns a {type(output).__name__}, without class logits (a base model with no "
                        "classification head); load the checkpoint with its ...ForImageClassification (or "
                        "...ForVideoClassification) class to measure accuracy")
    return logits


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
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(torch.finfo(weights.dtype).tiny)


def upper_bound_flops(shape: ViTShape, config: Optional[Method], costs: Mapping[int, BlockCost]) -> float:
    """FLOPs per image when every sample is a distinct token (the most a patched forward can cost);
    costs: ``Family.block_costs`` of the model under ``config``."""
    total = shape.patch_embed_flops
    n = shape.num_tokens
    for index, n_out in enumerate(token_capacities(config, n, shape.num_prefix_tokens, shape.depth)):
        total += costs[index](n, n_out) if index in costs else block_flops(shape, n, n)
        n = n_out
    return total + head_cost(shape, n)
