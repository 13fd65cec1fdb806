"""timm Eva (EVA-02, DINOv3, RoPE ViTs, Perception Encoder): rotary embeddings that follow the kept tokens."""
import copy

import pytest
import timm
import torch
from conftest import (
    assert_gradients_reach_every_parameter,
    assert_logits_from_a_shared_prefix,
    assert_pickles_patched,
    assert_unpatch_restores,
    contrasted_images,
)
from timm.models.eva import Eva
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters.eva import EVA

#: Small random-init variants: each rope kind (axial "cat", per-head "mixed", DINOv3's), the two attention
#: classes, fused and separate q/k/v, SwiGLU with and without its norm, q/k norms and the attention output
#: norm, layer scale, registers, no class token, absolute + rotary embeddings, and every pooling.
VARIANTS = {
    "eva02": ("eva02_tiny_patch14_224", {}),
    "eva02, separate qkv, SwiGLU norm": ("eva02_base_patch14_224", {}),
    "eva02, q/k norms, output norm, layer scale": ("eva02_tiny_patch14_224",
                                                   dict(qk_norm=True, scale_attn_inner=True, init_values=0.1)),
    "rope mixed + ape": ("vit_base_patch16_rope_mixed_ape_224", {}),
    "rope axial, registers, no class token": ("vit_base_patch16_rope_reg1_gap_256", {}),
    "dinov3, max pooling": ("vit_small_patch16_dinov3", dict(global_pool="avgmax")),
    "perception encoder, attention pool": ("vit_pe_core_tiny_patch16_384", {}),
}
CONFIG = ats.ATSConfig.multi_stage(0.8, first=1, depth=4)
FUSE_DISTINCT = ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=0.5)


def tiny_eva(variant: str = "eva02", peak: float = 4.0, **overrides) -> Eva:
    """A 4-block Eva on 32x32 images with 4x4 patches (64 patches). ``peak`` scales the query and key
    weights so attention is peaked: images keep different numbers of tokens and positions matter."""
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    sizes = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4, num_classes=10)
    model = timm.create_model(name, pretrained=False, **{**sizes, **kwargs, **overrides}).eval()
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            for layer in (attn.qkv, attn.q_proj, attn.k_proj):
                if layer is not None:
                    layer.weight.mul_(peak)
    return model


def kept_positions(stats, index: int, image: int) -> torch.Tensor:
    kept = stats.kept[index][image]
    return kept[kept >= 0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keeping_every_token_gives_the_unpatched_logits(variant):
    model, images = tiny_eva(variant), contrasted_images()
    with torch.no_grad():
        before = model(images)
        for config in (ats.KeepAllConfig(), ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk"),
                       ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=1.0)):
            ats.patch(model, config)
            assert (model(images) - before).abs().max() < 1e-5, config.describe()
        assert (ats.last_stats(model).tokens == 64 + model.num_prefix_tokens).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("config", [CONFIG, FUSE_DISTINCT], ids=["ats", "fuse-distinct"])
def test_images_do_not_depend_on_their_batch_mates(variant, config):
    model, images = tiny_eva(variant), contrasted_images()
    ats.patch(model, config)
    with torch.no_grad():
        together = model(images)
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(image[None]) for image in images])
    assert (together - alone).abs().max() < 1e-4
    if config is FUSE_DISTINCT or model.cls_token is not None:  # self-attention scores of random weights are flat
        assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"


def gathered(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A rotary table [P, 2d] or [h, P, 2d] at patch positions [n]."""
    return table[positions] if table.ndim == 2 else table[:, positions]


def reference_features(model: Eva, image: torch.Tensor, kept: dict, follow: bool = True) -> torch.Tensor:
    """One image's pooled features from timm's own blocks: an ATS block is timm's block on every token, of whose rows
    the prefix and the kept patch tokens go on (``kept``: block -> kept patch positions); every block
    rotates each token by the table at its patch position (``follow=False``: at the first positions, as if
    the rotation did not follow the tokens)."""
    prefix = model.num_prefix_tokens
    positions = torch.arange(64)
    x = EVA.embed(model, image[None])
    for index, (block, table) in enumerate(zip(model.blocks, EVA.rope_tables(model))):
        x = block(x, rope=gathered(table, positions if follow else torch.arange(len(positions))))
        if index in kept:
            rows = torch.searchsorted(positions, kept[index])
            x = torch.cat((x[:, :prefix], x[:, prefix + rows]), dim=1)
            positions = kept[index]
    return model.forward_head(model.norm(x), pre_logits=True)


@pytest.mark.parametrize("variant", ["eva02", "rope mixed + ape", "dinov3, max pooling"])
@pytest.mark.parametrize("config", [ats.ATSConfig.single_stage(k=24, block=1, sampler="topk"), CONFIG])
def test_each_kept_token_keeps_its_own_rotation(variant, config):
    """Every image keeps other positions; its pooled features are those of timm's blocks run on its kept
    tokens alone, each rotated by the model's own table at the position it came from (with layer scales of 1
    and sharper attention than the other tests, so that rotations at the wrong positions would show)."""
    model, images = tiny_eva(variant, peak=10.0, init_values=1.0), contrasted_images(4)
    ats.patch(model, config)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        stats = ats.last_stats(model)
        plain = ats.unpatch(copy.deepcopy(model))
        first = list(config.budgets)[0]
        assert not torch.equal(kept_positions(stats, first, 0), kept_positions(stats, first, 1))
        for image in range(len(images)):
            kept = {index: kept_positions(stats, index, image) for index in config.budgets}
            assert (reference_features(plain, images[image], kept) - features[image]).abs().max() < 1e-4
        unfollowed = reference_features(plain, images[0], {index: kept_positions(stats, index, 0)
                                                         for index in config.budgets}, follow=False)
    assert (unfollowed - features[0]).abs().max() > 1e-2, "the test must notice rotations at the wrong positions"


def test_unpatch_restores_the_original_forward_exactly():
    model = tiny_eva()
    assert type(model) is Eva
    assert_unpatch_restores(model, CONFIG, contrasted_images())


def unfused(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with timm's attention as matrix products, which FlopCounterMode counts on CPU."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flops_match_pytorchs_flop_counter(variant):
    """The analytic count of the unpatched model (and of a patched one that keeps every token) equals
    FlopCounterMode (2 per multiply-add) on the unpatched model: SwiGLU's three projections, the attention
    pool; rotary embeddings are elementwise, counted by neither."""
    model = tiny_eva(variant)
    with FlopCounterMode(display=False) as counter:
        unfused(model)(contrasted_images(1))
    expected = counter.get_total_flops() / 2
    assert ats.gflops(model) * 1e9 == pytest.approx(expected, rel=1e-12)
    ats.patch(model, ats.KeepAllConfig())
    with torch.no_grad():
        model(contrasted_images(2))
    assert torch.allclose(ats.last_stats(model).gflops.double() * 1e9, torch.tensor(expected, dtype=torch.float64))


def test_sampling_cuts_each_images_flops():
    model = tiny_eva("perception encoder, attention pool")
    unpatched = ats.gflops(model)
    ats.patch(model, CONFIG)
    with torch.no_grad():
        model(contrasted_images())
    gflops = ats.last_stats(model).gflops
    assert (gflops < unpatched).all() and (gflops <= ats.gflops(model) + 1e-12).all()
    assert len(set(gflops.tolist())) > 1


def test_a_dynamic_size_model_takes_other_image_sizes():
    model, images = tiny_eva("dinov3, max pooling"), contrasted_images(4, 48)
    with torch.no_grad():
        before = model(images)
        ats.patch(model, ats.KeepAllConfig())
        assert (model(images) - before).abs().max() < 1e-5
        ats.patch(model, CONFIG)
        together = model(images)
        alone = torch.cat([model(image[None]) for image in images])
    stats = ats.last_stats(model)
    assert stats.grid_size == (12, 12) and (stats.tokens[:, 0] == 144 + 5).all()
    assert (together - alone).abs().max() < 1e-4
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(contrasted_images(1, 34))


@pytest.mark.parametrize("variant", ["eva02", "rope mixed + ape", "perception encoder, attention pool"])
def test_gradients_reach_every_parameter_in_train_mode(variant):
    model = tiny_eva(variant, drop_path_rate=0.1, init_values=1e-2).train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, fuse=True))
    assert_gradients_reach_every_parameter(model, contrasted_images())


def test_torch_save_and_load_keep_the_model_patched():
    assert_pickles_patched(tiny_eva("rope mixed + ape"), CONFIG, contrasted_images())


def test_logits_from_a_shared_prefix_equal_the_whole_forward():
    assert_logits_from_a_shared_prefix(tiny_eva("rope mixed + ape"), CONFIG, contrasted_images(4))


def test_what_the_adapter_refuses():
    model = ats.patch(tiny_eva(), CONFIG)
    for shape in [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 32\]"):
            model(torch.zeros(shape))
    with pytest.raises(ValueError, match="attn_mask"):
        model(contrasted_images(2), attn_mask=torch.ones(2, 65, 65, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="ats.unpatch"):
        model.forward_intermediates(contrasted_images(2))
    with pytest.raises(ValueError, match="patch dropout"):
        ats.patch(tiny_eva(patch_drop_rate=0.5), CONFIG).train()(contrasted_images(2))
    with pytest.raises(ValueError, match="score='self_attention'"):
        ats.patch(tiny_eva("rope axial, registers, no class token"), ats.ATSConfig({1: 0.8}, score="cls"))
    unsupported = {"post-norm": dict(use_post_norm=True), "grouped-query": dict(
        attn_type="rope", qkv_fused=False, num_kv_heads=2), "gated": dict(gated_attn=True)}
    for what, options in unsupported.items():
        with pytest.raises(TypeError, match=what):
            ats.patch(tiny_eva(peak=1.0, **options), CONFIG)
