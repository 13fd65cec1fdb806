import pytest
import torch

import ats
from ats.methods import TokenBudget


def test_multi_stage_schedule():
    config = ats.ATSConfig.multi_stage(0.7, depth=12)
    assert ats.ATSConfig.multi_stage(0.7).for_depth(12) == config
    assert list(config.budgets) == list(range(3, 12))
    samples = config.budgets[5].samples(torch.tensor([197, 100, 10]), config.min_tokens)
    assert samples.tolist() == [137, 70, 8]
    assert [config.budgets[5].samples(n, config.min_tokens) for n in (197, 100, 10)] == [137, 70, 8]  # one int for all
    assert TokenBudget(k=108).samples(197, 8) == 108
    assert config.describe() == "rho=0.7 @ blocks 3..11"


def test_multi_stage_every_other_block():
    config = ats.ATSConfig.multi_stage(1.0, every=2, score="self_attention", fuse=True)
    assert config.describe() == "rho=1 @ blocks 3..last every 2 (score=self_attention, fuse)"
    assert list(config.for_depth(12).budgets) == [3, 5, 7, 9, 11]
    assert config.for_depth(12).describe() == "rho=1 @ blocks 3..11 every 2 (score=self_attention, fuse)"
    assert ats.ATSConfig.multi_stage(1.0, depth=12, fuse=True, distinct=0.95).describe() == \
        "rho=1 @ blocks 3..11 (fuse, distinct=0.95)"
    uneven = ats.ATSConfig(blocks={3: 1.0, 5: 1.0, 9: 1.0})
    assert uneven.describe() == "rho=1 @ blocks 3, 5, 9"
    assert ats.ATSConfig({3: 0.5, 4: 10}).describe() == "rho=0.5 @ block 3, K=10 @ block 4"


def test_single_stage_and_custom_blocks():
    assert ats.ATSConfig.single_stage(k=108).budgets == {3: TokenBudget(k=108)}
    config = ats.ATSConfig(blocks={6: 56, 3: 0.5}, sampler="topk")
    assert list(config.budgets) == [3, 6] and config.budgets[3] == TokenBudget(rho=0.5)
    assert "topk" in config.describe()


@pytest.mark.parametrize("make, message", [
    (lambda: ats.ATSConfig.single_stage(k=0), "k must be"),
    (lambda: ats.ATSConfig.multi_stage(rho=1.5), "rho must lie in"),
    (lambda: ats.ATSConfig.multi_stage(rho=0.0), "rho must lie in"),
    (lambda: ats.ATSConfig.multi_stage(rho=1.0, every=0), "every must be"),
    (lambda: ats.ATSConfig(blocks={3: 10}, sampler="nearest"), "unknown sampler"),
    (lambda: ats.ATSConfig(blocks={3: 10}, score="value"), "unknown score"),
    (lambda: ats.ATSConfig(blocks={}), "non-empty"),
    (lambda: ats.ATSConfig(blocks={-1: 10}), "0-based"),
    (lambda: ats.ATSConfig(blocks={3: 10}, min_kept=-1), "min_kept"),
    (lambda: ats.ATSConfig(blocks={3: 10}, min_kept=1.5), "min_kept"),
    (lambda: ats.ATSConfig(blocks={3: 10}, min_kept=0.0), "min_kept"),
    (lambda: ats.ATSConfig(blocks={3: 10}, min_kept=True), "min_kept"),
    (lambda: ats.ATSConfig(blocks={3: 10}, packing="dense"), "unknown packing"),
    (lambda: ats.ATSConfig(blocks={3: 10}, distinct=1.5), "distinct must be"),
    (lambda: ats.ATSConfig(blocks={3: 10}, distinct=-0.1), "distinct must be"),
    (lambda: ats.MergeConfig(r=0), "r must be"),
])
def test_bad_configs_are_refused_with_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_budget_types():
    with pytest.raises(TypeError):
        ats.ATSConfig(blocks={3: True})
    with pytest.raises(TypeError):
        ats.ATSConfig(blocks={3: "108"})


def test_kept_floor_is_a_count_or_a_fraction_of_the_patches_entering():
    assert ats.ATSConfig(blocks={3: 10}, min_kept=64).kept_floor(torch.tensor([196, 30])) == 64
    fraction = ats.ATSConfig(blocks={3: 10}, min_kept=0.85)
    assert fraction.kept_floor(torch.tensor([196, 30, 0])).tolist() == [166, 25, 0]
    assert fraction.kept_floor(196) == 166
    assert fraction.describe() == "K=10 @ block 3 (min_kept=0.85)"
