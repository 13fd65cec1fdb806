"""The two seams: a method is one ``Method`` subclass (its config and its block) plus one entry in
``ats.methods.METHODS``, from which ``ats.patch``'s check and message, the exports and the command line's help are
read; a family is a ``Family`` description of at most 12 members that the one patched forward runs."""
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Dict, Tuple

import pytest
import torch
from conftest import tiny_vit

import ats
import ats.methods
from ats.adapters.family import Family
from ats.commands.cli import build_parser
from ats.flops import BlockCost, ViTShape, merge_block_flops
from ats.method import BlockContext, Method
from ats.packing import TokenBatch
from ats.step import BlockParts, attention_half, mlp_half


@dataclass(frozen=True)
class DropLastConfig(Method):
    """A method written against the seam alone: in each of ``blocks``, after attention, each image drops its last
    patch token."""

    summary: ClassVar[str] = "drop each image's last patch token (a test method)"
    blocks: Tuple[int, ...] = (1, 2)

    def most_tokens_out(self, index: int, n: int, prefix: int) -> int:
        return max(n - 1, prefix)

    def block_costs(self, shape: ViTShape, has_cls: bool = True) -> Dict[int, BlockCost]:
        return {index: partial(merge_block_flops, shape) for index in self.blocks}

    def describe(self) -> str:
        return f"drop last @ blocks {self.blocks}"

    def run_block(self, parts: BlockParts, batch: TokenBatch, context: BlockContext) -> TokenBatch:
        batch, _, _ = attention_half(parts, batch)
        patches = batch.patch_positions(context.prefix)
        last = patches & (patches.long().cumsum(dim=1) == patches.long().sum(dim=1, keepdim=True))
        kept, _ = batch.select(batch.position_mask & ~last, capacity=context.capacity)
        context.record.record_sampling(context.index, batch.source, kept.source, None, None)
        return mlp_half(parts, kept)


@pytest.fixture
def registered(monkeypatch):
    """DropLastConfig added to the registry, as its one line in ats/methods/__init__.py would."""
    monkeypatch.setattr(ats.methods, "METHODS", (*ats.methods.METHODS, DropLastConfig))


def test_a_method_outside_the_registry_is_refused_naming_the_registered_ones():
    with pytest.raises(TypeError, match="config must be one of ats.ATSConfig .*ats.KeepAllConfig"):
        ats.patch(tiny_vit(), DropLastConfig())


@pytest.mark.parametrize("static", [False, True])
def test_a_registered_method_runs_through_the_step(registered, static):
    model = tiny_vit().eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        unpatched = model(images)
        ats.patch(model, DropLastConfig(), static=static)
        logits = model(images)
    stats = ats.last_stats(model)
    tokens = stats.tokens_out[0].tolist()
    full = model.patch_embed.num_patches + 1
    assert tokens == [full, full - 1, full - 2] + [full - 2] * (len(model.blocks) - 3)
    assert logits.shape == unpatched.shape and torch.isfinite(logits).all()
    assert not torch.allclose(logits, unpatched)
    assert ats.gflops(model) < ats.gflops(ats.unpatch(model))


def test_every_registered_method_is_exported_named_and_in_the_help():
    with pytest.raises(TypeError) as refused:
        ats.patch(tiny_vit(), object())
    help_text = build_parser("eval")._subparsers._group_actions[0].choices["eval"].format_help()
    for method in ats.methods.METHODS:
        assert getattr(ats, method.__name__) is method and method.__name__ in ats.__all__
        assert f"ats.{method.__name__} ({method.summary})" in str(refused.value)
        assert method.__name__ in " ".join(help_text.split())


def test_a_family_is_a_description_of_at_most_12_members():
    members = [name for name in vars(Family) if not name.startswith("_")]
    assert len(members) <= 12, members


def test_the_old_package_name_is_a_deprecated_alias_and_ats_patch_stays_the_function():
    with pytest.warns(DeprecationWarning, match="ats.patch is now ats.adapters"):
        from ats.patch import FAMILIES
    import ats.adapters

    assert FAMILIES is ats.adapters.FAMILIES
    assert callable(ats.patch) and ats.patch is ats.adapters.patch


def test_submodules_are_attributes_of_the_lazy_package():
    """``import ats`` loads nothing heavy, yet ``ats.adapters``, ``ats.flops``, ... are there on first use, as they
    would be from an eager package; an unknown name is an AttributeError."""
    import subprocess
    import sys

    script = ("import ats, sys; assert 'ats.adapters' not in sys.modules; "
              "assert ats.adapters.FAMILIES and ats.flops.ViTShape and ats.methods.METHODS; "
              "assert not hasattr(ats, 'no_such_module')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
