"""SAINT (similarity-aware token pruning): the set split and the drop rule by hand, batch independence,
FLOPs against a hand count and FlopCounterMode, bad settings refused, the CLI flags, calibration."""
import argparse
import json
import math

import pytest
import torch
from conftest import contrasted_images, tiny_vit
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.calibration import calibrate
from ats.commands.cli import main
from ats.commands.options import add_config_arguments, config_flags_given, configs_from_arguments
from ats.flops import vit_flops
from ats.saint import alternating_sets, redundancy, similar_tokens


def bools(text: str) -> torch.Tensor:
    return torch.tensor([character == "1" for character in text])


def at_angles(*angles: float) -> torch.Tensor:
    """Unit vectors in the plane at these angles (radians): the cosine of two is the cosine of their difference."""
    angles = torch.tensor(angles, dtype=torch.float64)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).float()


def test_the_sets_alternate_over_the_patch_tokens_from_the_first_one():
    patches = torch.stack((bools("0111110"), bools("0011111")))  # one prefix token and padding; two prefix tokens
    side_a, side_b = alternating_sets(patches)
    assert side_a.tolist() == [bools("0101010").tolist(), bools("0010101").tolist()]
    assert side_b.tolist() == [bools("0010100").tolist(), bools("0001010").tolist()]


def test_redundancy_weighs_the_close_matches_and_falls_back_on_the_mean_similarity():
    similarity = torch.tensor([[[0.95, 0.92, 0.5, 0.99], [0.1, 0.2, 0.3, 0.99]]])
    b_valid = bools("1110")[None]  # the last column is padding: it counts nowhere
    close, score = redundancy(similarity, b_valid, threshold=0.9, gamma=10.0)
    assert close.tolist() == [[2, 0]]
    assert score[0, 0].item() == pytest.approx(2 * math.exp(10 * (0.935 - 0.9)))
    assert score[0, 1].item() == pytest.approx(0.2)


# Patch tokens at positions 1..8 after the class token: A = 1, 3, 5, 7 and B = 2, 4, 6, 8. With threshold 0.9
# (at most 0.451 rad apart): A1 has three close B tokens (2, 4, 6) at mean cosine 0.924, A3 two (2, 4) at
# cosine 1.000, A7 one (8) at 0.921, A5 none. With K = 3 one image drops one token (only A1 has three);
# gamma = 10 ranks A3 (2 e^1.0 = 5.44) above A1 (3 e^0.24 = 3.80), so A3 drops; gamma = 0 ranks by the count.
HAND_WORKED = at_angles(0.0, 0.4, 0.0, 0.01, 0.02, 2.5, 0.8, 1.6, 1.2)


@pytest.mark.parametrize("gamma, dropped, order", [
    (10.0, 3, [0, 3, 2, 1, 4, 7, 6, 5, 8]),
    (0.0, 1, [0, 1, 2, 3, 4, 7, 6, 5, 8]),
])
def test_the_drop_rule_on_a_hand_worked_example(gamma, dropped, order):
    patches = (torch.arange(9) >= 1)[None]
    drop, ordered, last = similar_tokens(HAND_WORKED[None], patches, threshold=0.9, k=3, gamma=gamma)
    assert drop[0].nonzero().flatten().tolist() == [dropped]
    assert ordered[0].tolist() == order  # A positions take A tokens by descending redundancy: 3 or 1, then 7, 5
    assert last[0].tolist() == bools("001010101").tolist()


def test_each_image_drops_its_own_count_and_padding_never_drops():
    alike = at_angles(*[0.0] * 9)  # every A token has four close B tokens
    # five tokens, then padding at angle pi/4: were padding in B, A1 would have three close B tokens
    short = torch.cat((HAND_WORKED[:5], torch.full((4, 2), 7.0)))
    positions = torch.arange(9)
    metric = torch.stack((HAND_WORKED, alike, short))
    patches = torch.stack((positions >= 1, positions >= 1, (positions >= 1) & (positions < 5)))
    drop, order, last = similar_tokens(metric, patches, threshold=0.9, k=3, gamma=10.0)
    assert drop.sum(dim=1).tolist() == [1, 4, 0]  # the short image's A1 and A3 have two close B tokens (2, 4)
    assert order[2].tolist() == list(range(9)) and not last[2].any()  # dropping nothing, it keeps its order
    assert not (drop & ~patches).any()


def test_the_tokens_leave_in_the_authors_order():
    model = ats.patch(tiny_vit(), ats.SAINTConfig(0.5, k=2, blocks=(0,)))
    with torch.no_grad():
        model(contrasted_images(8)[:1])
    stats = ats.last_stats(model)
    source = stats.sampling[0].source_after[0]
    kept = int(stats.tokens_out[0, 0])
    b_tokens = torch.arange(2, 65, 2)  # B: the 2nd, 4th, ... patch token (original index), in order, last
    kept_a = source[1:kept - len(b_tokens)]
    assert 1 < len(kept_a) < 32 and source[0] == 0
    assert torch.equal(source[kept - len(b_tokens):kept], b_tokens)
    assert (kept_a % 2 == 1).all() and not (kept_a.diff() > 0).all()  # A tokens by redundancy, not position


def test_an_images_tokens_do_not_depend_on_its_batch():
    model = ats.patch(tiny_vit(), ats.SAINTConfig(0.5, k=2, blocks=(0, 1, 2)))
    images = contrasted_images(8)
    with torch.no_grad():
        together = model(images)
        counts = ats.last_stats(model).tokens_out
        assert len(set(counts[:, -1].tolist())) > 2  # the images keep different numbers of tokens
        for index, image in enumerate(images):
            assert torch.allclose(model(image[None]), together[index:index + 1], atol=1e-4)
            assert torch.equal(ats.last_stats(model).tokens_out[0], counts[index])


def test_each_images_gflops_are_the_merging_block_formula_on_its_token_counts():
    model = tiny_vit()
    ats.patch(model, ats.SAINTConfig(0.5, k=2, blocks=(0, 1, 2)))
    with torch.no_grad():
        model(contrasted_images(4))
    stats = ats.last_stats(model)
    c, d = 64, 16
    assert len(set(stats.tokens_out[:, 0].tolist())) > 1
    for image in range(4):
        n_in, n_out = stats.tokens[image].tolist(), stats.tokens_out[image].tolist()
        # attention with every token, matching (n_in / 2)^2 d as in a merging block, MLP on the kept tokens
        saint = sum(4 * n_in[i] * c * c + 2 * n_in[i] ** 2 * c + (n_in[i] / 2) ** 2 * d + 8 * n_out[i] * c * c
                    for i in range(3))
        dense = sum((4 + 2 * 4) * n_in[i] * c * c + 2 * n_in[i] ** 2 * c for i in range(3, 6))
        total = 64 * c * 3 * 16 + saint + dense + c * 10  # patch embedding, blocks, head
        assert float(stats.gflops[image]) * 1e9 == pytest.approx(total, rel=1e-6)
    assert (stats.gflops <= ats.gflops(model) * (1 + 1e-9)).all()  # the bound: SAINT blocks that drop nothing


def test_gflops_match_the_counter_but_for_attention_and_the_matching():
    """FlopCounterMode counts the linear layers, the patch embedding and SAINT's A-by-B similarity (a x b x d), not
    the CPU attention; the formula counts attention and ToMe's (n_in / 2)^2 d for the matching."""
    model = tiny_vit()
    ats.patch(model, ats.SAINTConfig(0.5, k=2, blocks=(0, 1, 2)))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(contrasted_images(8)[5:6])
    stats = ats.last_stats(model)
    n_in = stats.tokens[0].tolist()
    assert n_in[1] < n_in[0]
    attention = sum(2 * n * n * 64 for n in n_in)
    matching = sum(((n / 2) ** 2 - math.ceil((n - 1) / 2) * ((n - 1) // 2)) * 16 for n in n_in[:3])
    formula = float(vit_flops(stats.shape, stats.tokens, stats.tokens_out, stats.block_costs)[0])  # float64
    assert formula == pytest.approx(float(stats.gflops[0]) * 1e9, rel=1e-6)
    assert counter.get_total_flops() / 2 == pytest.approx(formula - attention - matching, rel=1e-12)


@pytest.mark.parametrize("options, message", [
    (dict(threshold=0.0), "threshold must be a cosine similarity in (0, 1]"),
    (dict(threshold=1.5), "threshold must be a cosine similarity in (0, 1]"),
    (dict(threshold=-0.3), "threshold must be a cosine similarity in (0, 1]"),
    (dict(threshold=float("nan")), "threshold must be a cosine similarity in (0, 1]"),
    (dict(threshold=True), "threshold must be a cosine similarity in (0, 1]"),
    (dict(threshold="0.9"), "threshold must be a cosine similarity in (0, 1]"),
    (dict(threshold=0.9, k=0), "k must be a whole number >= 1"),
    (dict(threshold=0.9, gamma=-1.0), "gamma must be a finite number >= 0"),
    (dict(threshold=0.9, gamma=float("inf")), "gamma must be a finite number >= 0"),
    (dict(threshold=0.9, blocks=()), "blocks must be a non-empty sequence"),
    (dict(threshold=0.9, blocks=(1, 1)), "name a block twice"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ats.SAINTConfig(**options)


def test_blocks_outside_the_model_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"\[6\] lie outside this model's 6 blocks.*first_half\(threshold, depth=6\)"):
        ats.patch(tiny_vit(), ats.SAINTConfig(0.9, blocks=(4, 6)))


def test_the_default_is_the_first_half_of_the_blocks():
    assert ats.SAINTConfig(0.9).blocks == tuple(range(6)) == ats.SAINTConfig.first_half(0.9, 12).blocks
    assert ats.SAINTConfig.first_half(0.9, depth=24).blocks == tuple(range(12))
    assert ats.SAINTConfig(0.95).describe() == "SAINT threshold=0.95 (K=5, gamma=10) @ blocks 0..5"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_cli_flags_make_saint_configs():
    args = parse("--saint", "0.9", "--saint", "0.95", "--saint-k", "3", "--saint-gamma", "5")
    assert config_flags_given(args)
    assert configs_from_arguments(args, depth=8) == [ats.SAINTConfig(0.9, k=3, gamma=5.0, blocks=(0, 1, 2, 3)),
                                                     ats.SAINTConfig(0.95, k=3, gamma=5.0, blocks=(0, 1, 2, 3))]
    args = parse("--saint", "0.9", "--saint-blocks", "1,2", "--merge", "4")
    assert configs_from_arguments(args, depth=12) == [ats.MergeConfig(4), ats.SAINTConfig(0.9, blocks=(1, 2))]


def test_eval_runs_saint_and_refuses_a_bad_threshold(checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--limit", "4", "--saint", "0.9", "--repeats", "1",
                 "--json"]) == 0
    unpatched, saint = json.loads(capsys.readouterr().out)
    assert (saint["method"], saint["config"]) == ("saint", "SAINT threshold=0.9 (K=5, gamma=10) @ blocks 0..5")
    assert saint["gflops"] <= unpatched["gflops"] * 1.01
    assert main(["eval", "--checkpoint", str(checkpoint), "--saint", "1.5"]) == 2
    assert "threshold must be a cosine similarity in (0, 1]" in capsys.readouterr().err


def test_calibration_finds_a_threshold():
    model = tiny_vit()
    images = contrasted_images(16)
    loader = [(images[:8], torch.zeros(8, dtype=torch.long)), (images[8:], torch.ones(8, dtype=torch.long))]
    found = calibrate(model, loader, fraction=0.7, method="saint", progress=False)
    target = 0.7 * ats.gflops(model)
    assert found.parameter == "threshold" and isinstance(found.config, ats.SAINTConfig)
    assert found.config.blocks == (0, 1, 2) and 0.0 < found.value < 1.0
    assert abs(found.gflops - target) <= 0.02 * target
    assert eval(found.python, {"ats": ats}) == found.config
    assert not ats.is_patched(model)
