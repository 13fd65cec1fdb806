import dataclasses
import pickle

import pytest
import timm
import torch
from conftest import contrasted_images, tiny_vit
from timm.models.vision_transformer import VisionTransformer

import ats
from ats import packing
from ats.adapters import logits_from, tokens_before
from ats.sampling import released_sample

CONFIGS = {
    "multi_stage": ats.ATSConfig.multi_stage(0.87, first=1, depth=6),
    "single_stage": ats.ATSConfig.single_stage(k=60, block=1),
    "topk": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, sampler="topk"),
    "released": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, sampler="released"),
    "cls_not_enforced": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, keep_cls=False),
    "self_attention": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, score="self_attention"),
    "min_kept": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, min_kept=12),
    "fuse": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True),
    "fuse_min_kept": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True, min_kept=12),
    "fraction_floor": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True, min_kept=0.8),
    "fuse_distinct": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True, distinct=0.5),
    "padded": ats.ATSConfig.multi_stage(0.87, first=1, depth=6, packing="padded"),
    "merge": ats.MergeConfig(r=6),
    "evit": ats.EViTConfig(0.6, blocks=(1, 3)),
    "evit_ats": ats.StackedConfig(ats.EViTConfig(0.6, blocks=(1, 4)), ats.ATSConfig({2: 0.87, 3: 0.87, 5: 0.87})),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_images_do_not_depend_on_their_batch_mates(name, model, images):
    ats.patch(model, CONFIGS[name])
    with torch.no_grad():
        together = model(images)
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(image[None]) for image in images])
    assert (together - alone).abs().max() < 1e-4
    if name not in ("merge", "topk", "evit"):  # these remove the same number of tokens from every image
        assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"


def test_unpatch_restores_the_original_forward_exactly(model, images):
    with torch.no_grad():
        before = model(images)
        ats.patch(model, CONFIGS["multi_stage"])
        patched = model(images)
        ats.unpatch(model)
        after = model(images)
    assert type(model) is VisionTransformer and not hasattr(model, "_ats")
    assert torch.equal(before, after)
    assert not torch.allclose(before, patched)


def test_keeping_every_token_gives_the_unpatched_logits(model, images):
    with torch.no_grad():
        before = model(images)
        ats.patch(model, ats.ATSConfig(blocks={1: 1000, 3: 1000}, sampler="topk"))
        after = model(images)
    assert (before - after).abs().max() < 1e-5


@pytest.mark.parametrize("slack", [0.0, 1.0])
def test_the_packed_layout_does_not_change_the_logits(slack, model, images, monkeypatch):
    ats.patch(model, CONFIGS["fuse_min_kept"])
    with torch.no_grad():
        chosen = model(images)
        monkeypatch.setattr(packing, "PADDED_LAYOUT_SLACK", slack)
        forced = model(images)
    assert (chosen - forced).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["rows", "padded"])
def test_padding_positions_of_the_features_are_zero(layout, model, images):
    ats.patch(model, ats.ATSConfig.multi_stage(0.87, first=1, depth=6, packing=layout))
    with torch.no_grad():
        features = model.forward_features(images)
    lengths = ats.last_stats(model).tokens_out[:, -1]
    padding = torch.arange(features.shape[1]) >= lengths[:, None]
    assert features.shape[1] == lengths.max() and padding.any()
    assert (features[padding] == 0).all() and (features[~padding].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("config", [CONFIGS["multi_stage"], ats.ATSConfig.single_stage(k=20, block=3)])
def test_logits_from_a_shared_prefix_equal_the_whole_forward(config, model, images):
    ats.patch(model, config)
    with torch.no_grad():
        whole = model(images)
        for start in range(config.first_block + 1):
            resumed = logits_from(model, tokens_before(model, images, start), start)
            assert torch.equal(resumed, whole), f"resuming at block {start}"


def test_forward_tokens_refuses_to_start_after_the_first_patched_block(model, images):
    ats.patch(model, ats.ATSConfig.single_stage(k=20, block=2))
    with torch.no_grad(), pytest.raises(ValueError, match="up to the first patched block"):
        model.forward_tokens(tokens_before(model, images, 2), 3)


def test_repatching_replaces_the_config(model, images):
    ats.patch(model, ats.ATSConfig.single_stage(k=10, block=2))
    ats.patch(model, ats.ATSConfig.single_stage(k=20, block=1))
    with torch.no_grad():
        model(images)
    tokens = ats.last_stats(model).tokens
    assert tokens[:, 2].max() <= 21 and tokens[:, 1].min() == 65
    ats.unpatch(model)
    assert type(model) is VisionTransformer


def test_the_forward_follows_modules_swapped_and_modes_changed_after_patching(model, images):
    """The block parts are cached between forwards; train mode, gradient checkpointing and a swapped
    layer must still take effect, and a patched model must still pickle."""
    ats.patch(model, CONFIGS["multi_stage"])
    with torch.no_grad():
        before = model(images)
    calls = []
    hook = model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))  # block 0: its own forward
    model.train()
    model(images).sum().backward()
    assert len(calls) == 1 and all(parts.training for parts in model._ats.parts)
    model.set_grad_checkpointing()
    model(images).sum().backward()
    assert len(calls) == 3, "checkpointing runs block 0 again in the backward pass"
    hook.remove()
    model.set_grad_checkpointing(False)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), before)
        zero = torch.nn.Linear(model.embed_dim, model.embed_dim)
        torch.nn.init.zeros_(zero.weight), torch.nn.init.zeros_(zero.bias)
        model.blocks[4].attn.proj = zero  # as an adapter library would
        swapped = model(images)
        assert not torch.allclose(swapped, before)
        assert torch.equal(pickle.loads(pickle.dumps(model))(images), swapped)


@pytest.mark.parametrize("name", ["multi_stage", "fuse_min_kept", "fraction_floor", "fuse_distinct",
                                  "cls_not_enforced", "merge", "padded", "evit", "evit_ats"])
def test_gradients_reach_every_parameter_in_train_mode(name, images):
    model = tiny_vit(drop_path_rate=0.1, init_values=1e-2).train()
    ats.patch(model, CONFIGS[name])
    model(images).logsumexp(-1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


def test_drop_path_is_per_image_in_train_mode(images):
    model = tiny_vit(drop_path_rate=0.5).train()
    ats.patch(model, CONFIGS["multi_stage"])
    torch.manual_seed(0)
    together = model(images)
    assert torch.isfinite(together).all()
    assert together.shape == (8, 10)


def test_stats_tokens_and_kept_indices(model, images):
    ats.patch(model, CONFIGS["multi_stage"])
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    assert stats.tokens.shape == (8, 6)
    assert (stats.tokens[:, :2] == 65).all()
    assert (stats.tokens.diff(dim=1) <= 0).all()
    assert torch.equal(stats.tokens[:, 1:], stats.tokens_out[:, :-1])
    for block in range(1, 6):
        kept = stats.kept[block]
        assert torch.equal(stats.kept_counts(block) + 1, stats.tokens_out[:, block])
        valid = kept >= 0
        assert (kept[valid] < 64).all()
        for row, mask in zip(kept, valid):  # ascending original positions, padding last
            assert torch.equal(row[mask], row[mask].sort().values) and not mask[mask.sum():].any()
        if block > 1:
            previous = stats.kept[block - 1]
            for now, before in zip(kept, previous):
                assert set(now[now >= 0].tolist()) <= set(before[before >= 0].tolist())
    assert stats.scores[1].shape == (8, 64) and torch.allclose(stats.scores[1].sum(1), torch.ones(8))
    assert stats.cls_attention[1].shape == (8, 64)
    assert stats.grid_size == (8, 8)


@pytest.mark.parametrize("options", [dict(min_kept=20), dict(min_kept=0.8, fuse=True)])
def test_every_ats_block_keeps_at_least_the_floor(options, model, images):
    config = ats.ATSConfig.multi_stage(0.5, first=1, depth=6, **options)
    ats.patch(model, config)
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    for block in config.budgets:
        assert (stats.kept_counts(block) >= config.kept_floor(stats.tokens[:, block] - 1)).all()
    ats.patch(model, dataclasses.replace(config, min_kept=0))
    with torch.no_grad():
        model(images)
    assert (ats.last_stats(model).tokens[:, -1] < stats.tokens[:, -1]).all(), "the floor must bind at rho=0.5"


def test_distinct_keeps_more_tokens_as_its_threshold_rises(model, images):
    kept = []
    for threshold in (0.0, 0.3, 0.6):
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=6, fuse=True, distinct=threshold))
        with torch.no_grad():
            model(images)
        kept.append(ats.last_stats(model).tokens[:, -1])
    assert (kept[0] <= kept[1]).all() and (kept[1] <= kept[2]).all() and (kept[0] < kept[2]).any()
    assert len(set(kept[2].tolist())) > 1, "distinct tokens depend on the image"


def test_distinct_at_one_keeps_every_token_and_the_unpatched_logits(model, images):
    with torch.no_grad():
        before = model(images)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=6, fuse=True, distinct=1.0))
        after = model(images)
    assert (ats.last_stats(model).tokens == 65).all()
    assert (before - after).abs().max() < 1e-5


def test_topk_keeps_the_top_recorded_scores(model, images):
    ats.patch(model, ats.ATSConfig.single_stage(k=20, block=2, sampler="topk"))
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    expected = stats.scores[2].topk(20, dim=1).indices.sort(dim=1).values
    assert torch.equal(stats.kept[2], expected)


def test_released_sampler_places_points_for_the_models_patch_count(model, images):
    """M = floor(rho * 64) points in every block, whatever entered it, on that block's scores."""
    ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=6, sampler="released"))
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    entering = torch.ones(len(images), 64, dtype=torch.bool)
    for block in range(1, 6):
        scores = stats.scores[block]
        keep = released_sample(scores, entering, 32)
        padding = stats.kept[block] < 0
        kept = torch.zeros(len(images), 65, dtype=torch.bool).scatter_(1, stats.kept[block].masked_fill(padding, 64),
                                                                       True)[:, :64]
        assert torch.equal(kept, keep)
        entering = kept
    assert (stats.tokens_out[:, 1:] - 1 <= 32).all()


def test_gflops_match_a_hand_count(model, images):
    ats.patch(model, CONFIGS["single_stage"])
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    c, hidden, patches = 64, 256, 64
    dense = lambda n: 3 * n * c * c + 2 * n * n * c + n * c * c + 2 * n * c * hidden  # noqa: E731

    def ats_block(n_in, n_out):
        return 3 * n_in * c * c + n_in * c + 2 * n_out * n_in * c + n_out * c * c + 2 * n_out * c * hidden

    for tokens, gflops in zip(stats.tokens.tolist(), stats.gflops.tolist()):
        flops = patches * c * 3 * 16 + c * 10
        flops += dense(65) + ats_block(65, tokens[2]) + sum(dense(n) for n in tokens[2:])
        assert gflops == pytest.approx(flops / 1e9, rel=1e-6)


def test_distilled_deit_keeps_both_prefix_tokens():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=4).eval()
    images = contrasted_images(4, 64)
    ats.patch(model, ats.ATSConfig.single_stage(k=5, block=1))
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(image[None]) for image in images])
    stats = ats.last_stats(model)
    assert (stats.tokens[:, 2] <= 7).all() and (stats.tokens[:, 2] >= 3).all()
    assert (together - alone).abs().max() < 1e-4


def test_register_tokens_are_kept():
    model = tiny_vit(reg_tokens=4)
    ats.patch(model, ats.ATSConfig.single_stage(k=10, block=1))
    with torch.no_grad():
        model(contrasted_images(4))
    stats = ats.last_stats(model)
    assert (stats.tokens[:, 0] == 69).all() and (stats.tokens[:, 2] <= 15).all()
    assert (stats.kept[1] < 64).all()


def test_model_without_class_token_scores_by_self_attention(images):
    """The default score ("auto") is the self-attention score on a model without a class token."""
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="self_attention"):
        ats.patch(model, ats.ATSConfig.single_stage(k=10, block=1, score="cls"))
    outputs = []
    for score in ("self_attention", "auto"):
        ats.patch(model, ats.ATSConfig.single_stage(k=10, block=1, score=score))
        with torch.no_grad():
            together = model(images)
            alone = torch.cat([model(image[None]) for image in images])
        assert (together - alone).abs().max() < 1e-4
        assert (ats.last_stats(model).tokens[:, 2] <= 10).all()
        outputs.append((together, ats.last_stats(model).gflops))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("config, error, message", [
    (ats.ATSConfig.single_stage(k=10, block=6), ValueError, "outside this model's 6 blocks"),
    (ats.MergeConfig(r=4, first=9), ValueError, "outside"),
])
def test_configs_the_model_cannot_take(model, config, error, message):
    with pytest.raises(error, match=message):
        ats.patch(model, config)


def test_modules_that_cannot_be_patched():
    with pytest.raises(TypeError, match="VisionTransformer"):
        ats.patch(torch.nn.Linear(3, 3), ats.ATSConfig.multi_stage(1.0))
    with pytest.raises(TypeError, match="ATSConfig"):
        ats.patch(tiny_vit(), {3: 108})
    with pytest.raises(ValueError, match="not patched"):
        ats.unpatch(tiny_vit())
    with pytest.raises(ValueError, match="not patched"):
        ats.last_stats(tiny_vit())


def test_images_of_the_wrong_shape(model):
    ats.patch(model, CONFIGS["multi_stage"])
    for shape in [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 32\]"):
            model(torch.zeros(shape))


@pytest.mark.parametrize("name, options, why", [
    ("cait_xxs24_224", dict(patch_size=4, depth=2, embed_dim=64, num_heads=4), "class-attention blocks after"),
    ("naflexvit_base_patch16_gap", dict(patch_size=4, depth=2, embed_dim=64, num_heads=4), "packs images"),
    ("vitamin_small_224", {}, r"convolutional stage \(MbConvStages\) before its ViT blocks"),
])
def test_families_ats_refuses_say_why(name, options, why):
    """CaiT, NaFlexViT and ViTamin (a VisionTransformer whose patch embedding is a convolutional network) are
    refused by ats.patch itself, with the reason, not later in the forward."""
    model = timm.create_model(name, pretrained=False, img_size=32, **options)
    with pytest.raises(TypeError, match=why):
        ats.patch(model, ats.ATSConfig.single_stage(k=10, block=1))
    assert not hasattr(model, "_ats")
