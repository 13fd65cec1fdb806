"""PS-ViT (ats.models.psvit): bilinear sampling, the sampler's points, shapes, gradients and input checks."""
import pytest
import torch

from ats.models import psvit
from ats.models.psvit import PSVIT_TINY_FMNIST, ProgressiveSampler, PSViT, regular_grid, sample_features


def tiny_sampler(feature_size: int, num_points: int, num_iterations: int = 4, embed_dim: int = 8) -> ProgressiveSampler:
    torch.manual_seed(0)
    return ProgressiveSampler(feature_size, embed_dim, num_points, num_iterations, num_heads=2).eval()


def fmnist_model() -> PSViT:
    torch.manual_seed(0)
    return PSViT(**PSVIT_TINY_FMNIST)


def test_initial_grid_samples_match_hand_worked_bilinear_values():
    # 4x4 map 0..15 and a 2x2 grid: the points sit at the cell centres (1, 1), (3, 1), (1, 3), (3, 3), i.e. on the
    # corners shared by four pixels, whose centres are at half-integers, so each value is the mean of a 2x2 block.
    features = torch.arange(16.0).view(1, 1, 4, 4)
    points = tiny_sampler(feature_size=4, num_points=2).initial_points
    assert points.tolist() == [[1.0, 1.0], [3.0, 1.0], [1.0, 3.0], [3.0, 3.0]]
    sampled = sample_features(features, points[None])
    assert sampled.shape == (1, 4, 1)
    expected = [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]
    assert sampled.flatten().tolist() == pytest.approx(expected)
    # x indexes columns and y rows: (1.5, 1) is column 1's centre, halfway between rows 0 and 1: (1 + 5) / 2;
    # (0.5, 1.75) is column 0, a quarter of the way from row 1's centre (1.5) to row 2's (2.5): 0.75 * 4 + 0.25 * 8.
    off_grid = sample_features(features, torch.tensor([[[1.5, 1.0], [0.5, 1.75]]]))
    assert off_grid.flatten().tolist() == pytest.approx([3.0, 0.75 * 4 + 0.25 * 8])


def test_fresh_model_keeps_the_regular_grid():
    model = fmnist_model().eval()
    _, points = model.sample_tokens(torch.randn(2, 1, 28, 28))
    centres = torch.arange(14) + 0.5  # a 14x14 feature map and 14x14 points: every pixel centre, row by row
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
    assert torch.equal(points, grid.expand(2, -1, -1))
    assert torch.equal(regular_grid(14, 14), grid)


def test_fixed_offsets_move_points_and_sampled_tokens(monkeypatch):
    # Features linear in the pixel-centre coordinates, f(x, y) = 10 x + y, are reproduced exactly by bilinear
    # interpolation inside the map, so each iteration's sampled value names the point it was sampled at.
    size, offset = 8, torch.tensor([0.25, -0.375])
    centres = torch.arange(size) + 0.5
    value = 10 * centres[None, :] + centres[:, None]
    features = value.expand(1, 8, size, size).clone()
    sampler = tiny_sampler(feature_size=size, num_points=2)
    with torch.no_grad():
        for head in sampler.offset_heads:
            head.weight.zero_()
            head.bias.copy_(offset)

    seen = []

    def recording_sample(feats, points):
        sampled = sample_features(feats, points)
        seen.append((points.detach().clone(), sampled.detach().clone()))
        return sampled

    monkeypatch.setattr(psvit, "sample_features", recording_sample)
    _, final_points = sampler(features)

    assert len(seen) == 4
    for t, (points, sampled) in enumerate(seen):
        expected = sampler.initial_points + t * offset
        torch.testing.assert_close(points, expected.expand(1, -1, -1))
        hand = 10 * expected[:, 0] + expected[:, 1]
        torch.testing.assert_close(sampled, hand[None, :, None].expand(1, -1, 8))
    torch.testing.assert_close(final_points, (sampler.initial_points + 3 * offset).expand(1, -1, -1))
    assert not torch.allclose(seen[0][1], seen[-1][1])


def test_fmnist_shapes():
    model = fmnist_model().eval()
    images = torch.randn(2, 1, 28, 28)
    tokens, points = model.sample_tokens(images)
    assert tokens.shape == (2, 196, 96) and points.shape == (2, 196, 2)
    assert model.embed(images).shape == (2, 197, 96)
    assert model.forward_features(images).shape == (2, 197, 96)
    assert model(images).shape == (2, 10)
    assert (model.num_prefix_tokens, model.embed_dim, model.num_points, model.depth) == (1, 96, 14, 10)
    assert len(model.blocks) == 10 and len(model.sampler.blocks) == 4 and len(model.sampler.offset_heads) == 3


def test_gradients_reach_stem_sampler_offset_heads_and_blocks():
    model = fmnist_model().train()
    with torch.no_grad():
        for head in model.sampler.offset_heads:
            head.weight.normal_(std=0.05)
            head.bias.fill_(0.3)
    model(torch.randn(4, 1, 28, 28)).logsumexp(dim=1).sum().backward()
    named = {
        "stem": model.stem[0][0].weight,
        "position encoding": model.sampler.pos_embed.weight,
        **{f"sampler block {i}": block.attn.qkv.weight for i, block in enumerate(model.sampler.blocks)},
        **{f"offset head {i}": head.weight for i, head in enumerate(model.sampler.offset_heads)},
        **{f"block {i}": block.mlp.fc1.weight for i, block in enumerate(model.blocks)},
        "class token": model.cls_token,
        "head": model.head.weight,
    }
    for name, parameter in named.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_batch_independence():
    model = fmnist_model().eval()
    with torch.no_grad():
        for head in model.sampler.offset_heads:
            head.weight.normal_(std=0.05)
        images = torch.randn(3, 1, 28, 28)
        batched = model(images)
        for i in range(3):
            torch.testing.assert_close(batched[i:i + 1], model(images[i:i + 1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (1, 28, 28)])
def test_bad_input_shape_names_expected_shape(shape):
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        fmnist_model()(torch.randn(*shape))
