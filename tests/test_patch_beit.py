"""timm Beit: relative position biases gathered at the kept tokens' positions."""
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
from timm.models.beit import Beit
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters.beit import BEIT

#: Small random-init variants: a bias table in every block, one shared by all blocks, both, and none (an
#: absolute position embedding only); average and class-token pooling.
VARIANTS = {
    "beit": ("beit_base_patch16_224", {}),
    "beit v2, token pooling": ("beitv2_base_patch16_224", dict(global_pool="token")),
    "shared bias": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    "own and shared bias, SwiGLU": ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True, swiglu_mlp=True)),
    "absolute position embedding": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_abs_pos_emb=True)),
}
CONFIG = ats.ATSConfig.multi_stage(0.8, first=1, depth=4)


def tiny_beit(variant: str = "beit", peak: float = 4.0, **overrides) -> Beit:
    """A 4-block Beit on 32x32 images with 4x4 patches (64 patches), its bias tables drawn at random (timm
    starts them at zero) and its query and key weights scaled by ``peak``."""
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    sizes = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4, num_classes=10)
    model = timm.create_model(name, pretrained=False, **{**sizes, **kwargs, **overrides}).eval()
    with torch.no_grad():
        tables = [block.attn.relative_position_bias_table for block in model.blocks]
        if model.rel_pos_bias is not None:
            tables.append(model.rel_pos_bias.relative_position_bias_table)
        for table in tables:
            if table is not None:
                table.normal_()
        for block in model.blocks:
            block.attn.qkv.weight[:2 * 64].mul_(peak)
    return model


def kept_positions(stats, index: int, image: int) -> torch.Tensor:
    kept = stats.kept[index][image]
    return kept[kept >= 0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keeping_every_token_gives_the_unpatched_logits(variant):
    model, images = tiny_beit(variant), contrasted_images()
    with torch.no_grad():
        before = model(images)
        for config in (ats.KeepAllConfig(), ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk"),
                       ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=1.0)):
            ats.patch(model, config)
            assert (model(images) - before).abs().max() < 1e-5, config.describe()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("config", [CONFIG, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=0.5),
                                    ats.EViTConfig(0.6, blocks=(1, 3))], ids=["ats", "fuse-distinct", "evit"])
def test_images_do_not_depend_on_their_batch_mates(variant, config):
    model, images = tiny_beit(variant), contrasted_images()
    ats.patch(model, config)
    with torch.no_grad():
        together = model(images)
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(image[None]) for image in images])
    assert (together - alone).abs().max() < 1e-4
    if not isinstance(config, ats.EViTConfig):  # EViT keeps as many tokens of every image
        assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"


def reference_features(model: Beit, image: torch.Tensor, kept: dict, follow: bool = True) -> torch.Tensor:
    """One image's pooled features from timm's own blocks: an ATS block is timm's block on every token, of
    whose rows the class token and the kept patch tokens go on (``kept``: block -> kept patch positions);
    every block adds its bias (and the shared one) at the rows and columns of the tokens' positions, the
    class token's included (``follow=False``: at the first positions)."""
    tokens = torch.arange(65)
    x = BEIT.embed(model, image[None])
    shared = BEIT.shared_bias(model)
    for index, block in enumerate(model.blocks):
        at = tokens if follow else torch.arange(len(tokens))
        if block.attn.relative_position_bias_table is not None:
            own = block.attn._get_rel_pos_bias()
            block.attn._get_rel_pos_bias = lambda own=own, at=at: own[:, :, at][:, :, :, at]
        x = block(x, shared_rel_pos_bias=None if shared is None else shared[:, at][:, :, at])
        if index in kept:
            x = x[:, torch.cat((torch.zeros(1, dtype=torch.long), 1 + torch.searchsorted(tokens[1:] - 1, kept[index])))]
            tokens = torch.cat((tokens[:1], 1 + kept[index]))
    return model.forward_head(model.norm(x), pre_logits=True)


@pytest.mark.parametrize("variant", ["beit", "shared bias", "own and shared bias, SwiGLU"])
@pytest.mark.parametrize("config", [ats.ATSConfig.single_stage(k=24, block=1, sampler="topk"), CONFIG])
def test_each_kept_token_keeps_its_own_bias(variant, config):
    """Every image keeps other positions; its pooled features are those of timm's blocks run on its kept
    tokens alone with the bias rows and columns of the positions they came from."""
    model, images = tiny_beit(variant, peak=10.0, init_values=1.0), contrasted_images(4)
    ats.patch(model, config)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        stats = ats.last_stats(model)
        first = list(config.budgets)[0]
        assert not torch.equal(kept_positions(stats, first, 0), kept_positions(stats, first, 1))
        for image in range(len(images)):
            plain = ats.unpatch(copy.deepcopy(model))
            kept = {index: kept_positions(stats, index, image) for index in config.budgets}
            assert (reference_features(plain, images[image], kept) - features[image]).abs().max() < 1e-4
        plain = ats.unpatch(copy.deepcopy(model))
        unfollowed = reference_features(plain, images[0], {index: kept_positions(stats, index, 0)
                                                           for index in config.budgets}, follow=False)
    assert (unfollowed - features[0]).abs().max() > 1e-2, "the test must notice biases at the wrong positions"


def test_the_class_tokens_scores_carry_the_bias():
    """The class token's attention that scores the tokens is the block's own, bias included."""
    model, images = tiny_beit(peak=10.0, init_values=1.0), contrasted_images(2)
    ats.patch(model, ats.ATSConfig.single_stage(k=24, block=1))
    captured = {}
    plain = ats.unpatch(copy.deepcopy(model))
    plain.blocks[1].attn.fused_attn = False
    plain.blocks[1].attn.attn_drop.register_forward_hook(lambda module, args, out: captured.update(attention=out))
    with torch.no_grad():
        model(images)
        plain(images)
    expected = captured["attention"][:, :, 0]  # [B, h, 65], timm's attention of the class token
    assert torch.allclose(ats.last_stats(model).cls_attention[1], expected.mean(1)[:, 1:], atol=1e-6)


def test_unpatch_restores_the_original_forward_exactly():
    model = tiny_beit()
    assert type(model) is Beit
    assert_unpatch_restores(model, CONFIG, contrasted_images())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flops_match_pytorchs_flop_counter(variant):
    """The analytic count equals FlopCounterMode (2 per multiply-add) on the unpatched model with its attention
    as matrix products; adding the biases to the logits is elementwise, counted by neither."""
    model = tiny_beit(variant)
    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        reference(contrasted_images(1))
    expected = counter.get_total_flops() / 2
    assert ats.gflops(model) * 1e9 == pytest.approx(expected, rel=1e-12)
    ats.patch(model, CONFIG)
    with torch.no_grad():
        model(contrasted_images())
    gflops = ats.last_stats(model).gflops.double() * 1e9
    assert (gflops < expected).all() and len(set(gflops.tolist())) > 1


def test_gradients_reach_every_parameter_in_train_mode():
    model = tiny_beit("own and shared bias, SwiGLU", drop_path_rate=0.1).train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, fuse=True))
    assert_gradients_reach_every_parameter(model, contrasted_images())


def test_torch_save_and_load_keep_the_model_patched():
    assert_pickles_patched(tiny_beit("own and shared bias, SwiGLU"), CONFIG, contrasted_images())


def test_logits_from_a_shared_prefix_equal_the_whole_forward():
    assert_logits_from_a_shared_prefix(tiny_beit("own and shared bias, SwiGLU"), CONFIG, contrasted_images(4))


def test_what_the_adapter_refuses():
    model = ats.patch(tiny_beit(), CONFIG)
    for shape in [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 32\]"):
            model(torch.zeros(shape))
    with pytest.raises(NotImplementedError, match="ats.unpatch"):
        model.forward_intermediates(contrasted_images(2))
    with pytest.raises(ValueError, match="outside this model's 4 blocks"):
        ats.patch(tiny_beit(), ats.ATSConfig.single_stage(k=10, block=4))
