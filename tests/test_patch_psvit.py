"""ATS in the vision transformer module of the library's PS-ViT."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters.psvit import PSVIT
from ats.commands.visualize import image_tokens, token_figure
from ats.models.psvit import PSViT

#: A small PS-ViT on 16x16 images: an 8x8 feature map, 8 x 8 = 64 sampled tokens + 1, 2 iterations, 4 blocks.
TINY = dict(img_size=16, in_chans=3, num_classes=5, stem_channels=(8,), stem_strides=(2,), embed_dim=32,
            num_points=8, num_iterations=2, depth=4, num_heads=2, mlp_ratio=2.0, qkv_bias=True)
CONFIG = ats.ATSConfig.multi_stage(0.8, first=1, depth=4)


def tiny_psvit() -> PSViT:
    """Random weights, qkv of the blocks scaled up so images keep different numbers of tokens, offset heads
    non-zero so the points leave the grid."""
    torch.manual_seed(0)
    model = PSViT(**TINY).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6)
        for head in model.sampler.offset_heads:
            head.weight.normal_(0, 0.05)
    return model


def images(count: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, 16, 16, generator=generator) * torch.linspace(0.2, 3.0, count)[:, None, None, None]


def test_keeping_every_token_gives_the_unpatched_logits_and_unpatch_is_exact():
    model = tiny_psvit()
    x = images()
    with torch.no_grad():
        before = model(x)
        every_token = ats.patch(model, ats.ATSConfig.single_stage(65, block=0, sampler="topk"))(x)
        sampled = ats.patch(model, CONFIG)(x)
        after = ats.unpatch(model)(x)
    assert (every_token - before).abs().max() < 1e-5
    assert torch.equal(after, before) and type(model) is PSViT
    assert not torch.allclose(sampled, before)


def test_images_do_not_depend_on_their_batch_mates():
    model = ats.patch(tiny_psvit(), CONFIG)
    x = images()
    with torch.no_grad():
        together = model(x)
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(image[None]) for image in x])
    assert (together - alone).abs().max() < 1e-4
    assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"


def test_stats_carry_the_sampled_points_in_input_pixels():
    model = tiny_psvit()
    with torch.no_grad():
        _, feature_points = model.sample_tokens(images(2))
        ats.patch(model, CONFIG)(images(2))
    points = ats.last_stats(model).points
    assert torch.allclose(points, feature_points * 2)  # an 8x8 feature map of 16x16 images
    assert not torch.allclose(points[0], PSViT(**TINY).sampler.initial_points * 2)  # they left the grid


def test_flops_match_pytorchs_counter_plus_attention_and_sampling():
    """FlopCounterMode counts convolutions and linear layers (2 per multiply-add) but not CPU attention or
    grid_sample; those are added by hand: 2 n^2 C per encoder layer, 4 C per point and iteration."""
    model = tiny_psvit()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(1))
    attention = 2 * 2 * 64 * 64 * 32 + 4 * 2 * 65 * 65 * 32
    sampling = 2 * 4 * 32 * 64
    assert ats.gflops(model) * 1e9 == counter.get_total_flops() / 2 + attention + sampling
    patched = ats.patch(model, CONFIG)
    with torch.no_grad():
        patched(images())
    stats = ats.last_stats(model)
    assert (stats.gflops * 1e9 < counter.get_total_flops() / 2 + attention + sampling).all()


def test_gradients_reach_the_sampler_and_the_blocks_in_train_mode():
    model = ats.patch(tiny_psvit(), CONFIG).train()
    torch.nn.functional.cross_entropy(model(images()), torch.arange(6) % 5).backward()
    for module in (model.stem, model.sampler.blocks[0], model.sampler.offset_heads[0], model.blocks[3], model.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_bad_input_gets_clear_errors():
    model = tiny_psvit()
    with pytest.raises(ValueError, match=r"outside this model's 4 blocks"):
        ats.patch(model, ats.ATSConfig.single_stage(20, block=4))
    ats.patch(model, CONFIG)
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 3, 16, 16\]"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"takes \(3, 16, 16\) images only"):
        ats.gflops(model, input_size=(3, 32, 32))
    assert PSVIT.data_config(model)["input_size"] == (3, 16, 16)


def test_visualize_draws_the_tokens_at_their_sampled_points():
    model = ats.patch(tiny_psvit(), CONFIG)
    x = images(2)
    with torch.no_grad():
        model(x)
    pixels = torch.rand(2, 16, 16, 3)
    tokens = image_tokens(ats.last_stats(model), pixels, ["a", "b"], CONFIG.describe(), [None, None], [None, None])
    assert torch.equal(tokens[1].points, ats.last_stats(model).points[1])
    figure = token_figure(tokens[1])
    kept_panel = figure.axes[1]
    dropped, kept = (collection.get_offsets() for collection in kept_panel.collections)
    assert len(kept) == int(tokens[1].kept[1].sum()) and len(kept) + len(dropped) == 64
    assert torch.allclose(torch.as_tensor(kept[0], dtype=torch.float32),
                          tokens[1].points[tokens[1].kept[1].flatten()][0] - 0.5)
