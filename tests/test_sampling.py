import pytest
import torch

from ats.sampling import (
    class_attention,
    cls_scores,
    inverse_transform_sample,
    masked_softmax_logits,
    released_sample,
    self_attention_scores,
    stable_argsort,
    top_up,
    topk_sample,
    uniform_points,
)


def test_inverse_transform_picks_the_inverse_cdf():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    # y = 1/8, 3/8, 5/8, 7/8 against the CDF 0.1, 0.3, 0.6, 1.0 picks tokens 1, 2, 3, 3
    keep = inverse_transform_sample(scores, torch.tensor([4]))
    assert keep.tolist() == [[False, True, True, True]]


def test_inverse_transform_uses_the_sorted_order():
    scores = torch.tensor([[0.4, 0.0, 0.1, 0.5]])
    keep = inverse_transform_sample(scores, torch.tensor([2]))
    # sorted ascending: 0.0 (1), 0.1 (2), 0.4 (0), 0.5 (3); CDF 0, .1, .5, 1; y = .25, .75 -> tokens 0, 3
    assert keep.tolist() == [[True, False, False, True]]


def test_zero_scores_are_never_sampled():
    scores = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]])
    keep = inverse_transform_sample(scores, torch.tensor([50]))
    assert keep.tolist() == [[False, False, True, True, False]]


def test_duplicates_collapse_and_peaked_scores_keep_fewer():
    flat = torch.full((1, 100), 0.01)
    peaked = torch.softmax(torch.linspace(0, 12, 100), 0)[None]
    k = torch.tensor([50])
    assert inverse_transform_sample(flat, k).sum() == 50
    kept = inverse_transform_sample(peaked, k).sum()
    assert 0 < kept < 30


def test_one_k_for_every_image_is_the_same_as_k_per_image():
    scores = torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(3)) * 2, 1)
    assert torch.equal(inverse_transform_sample(scores, 17), inverse_transform_sample(scores, torch.tensor([17] * 3)))
    assert torch.equal(topk_sample(scores, 17), topk_sample(scores, torch.tensor([17] * 3)))


def test_per_image_budgets():
    scores = torch.full((2, 10), 0.1)
    keep = inverse_transform_sample(scores, torch.tensor([3, 7]))
    assert keep.sum(1).tolist() == [3, 7]


def inverse_cdf_reference(scores, k, points):
    """The definition, one point at a time: each point y picks the first sorted position whose CDF
    reaches y."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for image in range(scores.shape[0]):
        sorted_scores, order = scores[image].sort()
        cdf = sorted_scores.double().cumsum(0)
        cdf = cdf / cdf[-1]
        for y in points[image][: int(k[image])]:
            keep[image, order[int((cdf >= y).nonzero()[0])]] = True
    return keep


def test_deterministic_sampling_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.rand(4, 30, generator=generator) ** 6
        scores[:, :3] = 0.0
        scores = scores / scores.sum(1, keepdim=True)
        k = torch.randint(1, 60, (4,), generator=generator)
        steps = torch.arange(1, 61, dtype=torch.float64)
        grid = (2 * steps - 1)[None] / (2 * k[:, None].double())
        assert torch.equal(inverse_transform_sample(scores, k), inverse_cdf_reference(scores, k, grid))


def test_stochastic_sampling_matches_the_definition_for_its_draws():
    scores = torch.softmax(torch.randn(3, 25, generator=torch.Generator().manual_seed(1)) * 3, 1)
    k = torch.tensor([5, 12, 20])
    draws = uniform_points(k, 20, torch.Generator().manual_seed(2))
    keep = inverse_transform_sample(scores, k, 20, stochastic=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(keep, inverse_cdf_reference(scores, k, draws))


def test_uniform_points_are_sorted_seeded_draws():
    one = uniform_points(torch.tensor([3, 5]), 5, torch.Generator().manual_seed(0))
    again = uniform_points(torch.tensor([3, 5]), 5, torch.Generator().manual_seed(0))
    other = uniform_points(torch.tensor([3, 5]), 5, torch.Generator().manual_seed(1))
    assert torch.equal(one, again) and not torch.equal(one, other)
    assert torch.isinf(one[0, 3:]).all() and torch.isfinite(one[0, :3]).all() and torch.isfinite(one[1]).all()
    assert (one[0, :3].diff() >= 0).all() and (one[1].diff() >= 0).all() and ((one[1] >= 0) & (one[1] < 1)).all()


def test_stochastic_sampling_needs_k_max():
    with pytest.raises(ValueError, match="k_max"):
        inverse_transform_sample(torch.full((1, 4), 0.25), torch.tensor([2]), stochastic=True)


def test_stochastic_sampling_never_picks_zero_scores():
    scores = torch.tensor([[0.0, 0.3, 0.0, 0.7]])
    for seed in range(20):
        keep = inverse_transform_sample(scores, torch.tensor([4]), 4, stochastic=True,
                                        generator=torch.Generator().manual_seed(seed))
        assert not keep[0, 0] and not keep[0, 2]


def test_topk_keeps_the_highest_and_breaks_ties_stably():
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.0, 0.1]])
    assert topk_sample(scores, torch.tensor([3])).tolist() == [[False, True, True, True, False, False]]
    assert topk_sample(scores, torch.tensor([4])).tolist() == [[True, True, True, True, False, False]]
    assert topk_sample(scores, torch.tensor([6])).sum() == 5  # the zero score stays out



def tied_values(trial: int) -> torch.Tensor:
    """[4, n] values from {0, 1, 2, -inf} (many ties), n from 1 to 29 by ``trial``."""
    generator = torch.Generator().manual_seed(trial)
    values = torch.randint(0, 4, (4, 1 + trial % 29), generator=generator).float()
    return values.masked_fill(values == 3, float("-inf"))


def test_topk_keeps_what_a_stable_sort_keeps():
    for trial in range(100):
        scores = tied_values(trial).clamp_min(0.0)
        n = scores.shape[1]
        ranks = torch.empty_like(scores, dtype=torch.long).scatter_(
            1, scores.argsort(dim=1, descending=True, stable=True), torch.arange(n).expand_as(scores))
        per_image = torch.randint(0, n + 3, (4,), generator=torch.Generator().manual_seed(trial))
        assert torch.equal(topk_sample(scores, per_image), (ranks < per_image[:, None]) & (scores > 0))
        for k in (0, 1, n // 2, n, n + 2):
            assert torch.equal(topk_sample(scores, k), (ranks < k) & (scores > 0))


@pytest.mark.parametrize("descending", [False, True])
def test_stable_argsort_is_a_stable_sort(descending):
    for trial in range(100):
        values = tied_values(trial)
        expected = values.argsort(dim=1, descending=descending, stable=True)
        assert torch.equal(stable_argsort(values, descending), expected)

def test_top_up_reaches_min_kept_with_candidates_only():
    scores = torch.tensor([[0.5, 0.2, 0.0, 0.3]])
    keep = torch.tensor([[True, False, False, False]])
    assert top_up(keep, scores, 2).tolist() == [[True, False, False, True]]
    assert top_up(keep, scores, 10).tolist() == [[True, True, False, True]]
    assert torch.equal(top_up(keep, scores, 1), keep)


def test_top_up_takes_a_floor_per_image():
    scores = torch.tensor([[0.5, 0.2, 0.0, 0.3], [0.1, 0.2, 0.3, 0.4]])
    keep = torch.zeros(2, 4, dtype=torch.bool)
    assert top_up(keep, scores, torch.tensor([1, 3])).tolist() == [[True, False, False, False],
                                                                   [False, True, True, True]]


def test_cls_scores_are_attention_times_value_norm():
    torch.manual_seed(0)
    attention = torch.rand(2, 3, 5).softmax(-1)
    v = torch.randn(2, 3, 5, 4)
    candidates = torch.tensor([[False, True, True, True, False]] * 2)
    norm = v.permute(0, 2, 1, 3).reshape(2, 5, 12).norm(dim=-1)
    scores = cls_scores(attention, norm, candidates)
    raw = attention.sum(1) * norm * candidates
    assert torch.allclose(scores, raw / raw.sum(1, keepdim=True), atol=1e-6)
    assert torch.allclose(scores.sum(1), torch.ones(2))


def test_masked_attention_and_self_attention_scores():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[True, True, True, False]])
    attention = masked_softmax_logits(q, k, 8 ** -0.5, mask)
    assert torch.all(attention[..., 3] == 0) and torch.allclose(attention.sum(-1), torch.ones(1, 2, 4))
    candidates = torch.tensor([[False, True, True, False]])
    scores = self_attention_scores(attention, mask, candidates)
    columns = (attention.sum(1) * mask[:, :, None]).sum(1) * candidates
    assert torch.allclose(scores, columns / columns.sum(), atol=1e-6)


@pytest.mark.parametrize("bias", [0.0, 2.0])
def test_key_bias_shifts_attention(bias):
    q, k = torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 3, 4)
    attention = masked_softmax_logits(q, k, 1.0, None, torch.tensor([[bias, 0.0, 0.0]]))
    expected = torch.tensor([torch.e ** bias, 1.0, 1.0])
    assert torch.allclose(attention[0, 0, 0], expected / expected.sum())


def test_class_attention_is_the_class_rows_of_masked_attention():
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 4, 8)  # [B, n, (q, k, v), h, d], the qkv projection's layout
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    bias = torch.rand(2, 5)
    expected = masked_softmax_logits(q[:, :, :1], k, 8 ** -0.5, mask, bias)[:, :, 0]
    attention = class_attention(q[:, :, 0], k, 8 ** -0.5, mask, bias)
    assert attention.shape == (2, 4, 5)
    assert torch.allclose(attention, expected, atol=1e-6)
    assert torch.all(attention[1, :, 3:] == 0)


def released_by_definition(scores: torch.Tensor, candidates: torch.Tensor, points: int) -> torch.Tensor:
    """The released rule written out step by step for one image [n] -> keep mask [n]."""
    index = candidates.nonzero().flatten()
    order = index[scores[index].argsort(stable=True)]
    cdf = scores[order].double().cumsum(0)
    normalised = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = normalised[normalised > 0].min()
    ys = torch.linspace(0, 1, points, dtype=torch.float64) * (1 - start) + start if points > 1 else start[None]
    picks = (ys[:, None] - normalised[None]).abs().argmin(dim=1)  # argmin takes the first on a tie
    keep = torch.zeros_like(candidates)
    keep[order[picks.unique()]] = True
    return keep


def test_released_sampler_on_a_hand_worked_example():
    # Sorted: 0.1 (position 0), 0.2 (2), 0.3 (3), 0.4 (1); CDF 0.1, 0.3, 0.6, 1.0; min-max: 0, 2/9, 5/9, 1.
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0]])
    candidates = torch.tensor([[True, True, True, True, False]])
    # M = 3: points 2/9, 11/18, 1 -> nearest 2/9 (position 2), 5/9 (3), 1 (1); the lowest (0) never.
    assert released_sample(scores, candidates, 3).tolist() == [[False, True, True, True, False]]
    # M = 2: points 2/9 and 1.
    assert released_sample(scores, candidates, 2).tolist() == [[False, True, True, False, False]]
    # M = 9 points on 3 pickable tokens: each picked, duplicates merged.
    assert released_sample(scores, candidates, 9).sum() == 3


def test_released_sampler_takes_the_earlier_token_on_a_tie():
    # Sorted CDF 0.25, 0.5, 1.0 -> min-max 0, 1/3, 1; M = 3 points 1/3, 2/3, 1: 2/3 lies halfway between
    # 1/3 (position 1) and 1 (position 2) and takes the earlier in sorted order, position 1.
    scores = torch.tensor([[0.25, 0.25, 0.5]])
    keep = released_sample(scores, torch.ones_like(scores, dtype=torch.bool), 3)
    assert keep.tolist() == [[False, True, True]]


def test_released_sampler_never_picks_zero_scores_padding_or_non_candidates():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 12, generator=generator)
    scores[:, 5] = 0.0                       # a zero-score candidate
    candidates = torch.ones_like(scores, dtype=torch.bool)
    candidates[:, :1] = False                # the class token
    candidates[2:, 9:] = False               # padding
    keep = released_sample(scores * candidates, candidates, 50)
    assert not keep[:, 0].any() and not keep[:, 5].any() and not keep[2:, 9:].any()
    assert released_sample(scores * candidates, candidates, 3).sum(dim=1).max() <= 3


def test_released_sampler_matches_its_definition_image_by_image():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 40, generator=generator) ** 4
    candidates = torch.rand(6, 40, generator=generator) > 0.2
    for points in (1, 5, 12, 39, 60):
        together = released_sample(scores * candidates, candidates, points)
        for image in range(6):
            expected = released_by_definition(scores[image], candidates[image], points)
            assert torch.equal(together[image], expected)
            one = slice(image, image + 1)
            alone = released_sample((scores * candidates)[one], candidates[one], points)
            assert torch.equal(alone[0], together[image])
