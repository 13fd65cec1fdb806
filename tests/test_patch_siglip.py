"""timm SigLIP: the attention-pool head over each image's valid tokens, and the "auto" score without a class token."""
import copy

import pytest
import timm
import torch
from conftest import (
    assert_gradients_reach_every_parameter,
    assert_pickles_patched,
    assert_unpatch_restores,
    contrasted_images,
)
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import ats

CONFIG = ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=0.5)


def tiny_siglip(**overrides) -> VisionTransformer:
    """A 4-block SigLIP ViT (no class token, attention-pool head) on 32x32 images with 4x4 patches; its query
    and key weights scaled so attention is peaked."""
    torch.manual_seed(0)
    sizes = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4, num_classes=10)
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **{**sizes, **overrides}).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:2 * 64].mul_(4)
    return model


def test_keeping_every_token_gives_the_unpatched_logits():
    model, images = tiny_siglip(), contrasted_images()
    with torch.no_grad():
        before = model(images)
        for config in (ats.KeepAllConfig(), ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk"),
                       ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=1.0)):
            ats.patch(model, config)
            assert (model(images) - before).abs().max() < 1e-5, config.describe()


@pytest.mark.parametrize("config", [ats.ATSConfig.multi_stage(0.8, first=1, depth=4), CONFIG,
                                    ats.ATSConfig.single_stage(k=20, block=1, sampler="topk")])
def test_images_do_not_depend_on_their_batch_mates(config):
    model, images = tiny_siglip(), contrasted_images()
    ats.patch(model, config)
    with torch.no_grad():
        together = model(images)
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(image[None]) for image in images])
    assert (together - alone).abs().max() < 1e-4
    if config is CONFIG:
        assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"


def test_the_default_score_is_self_attention_without_a_class_token():
    model, images = tiny_siglip(), contrasted_images()
    results = []
    for score in ("auto", "self_attention"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, score=score))
        with torch.no_grad():
            results.append((model(images), ats.last_stats(model).gflops))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="no class token"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, score="cls"))


def test_the_pool_attends_over_valid_tokens_in_proportion_to_their_size():
    """With fused tokens, the pool over an image's valid tokens with their log sizes added to the logits is
    the pool over those tokens, each repeated as many times as the patches it holds."""
    model, images = tiny_siglip(), contrasted_images()
    ats.patch(model, CONFIG)
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        sizes = model._ats.pool_weights
        lengths = ats.last_stats(model).tokens_out[:, -1]
        assert (lengths < features.shape[1]).any() and (sizes > 1).any()
        for image in range(len(images)):
            valid = features[image, :lengths[image]]
            repeated = valid.repeat_interleave(sizes[image, :lengths[image]].long(), dim=0)
            assert len(repeated) == 64
            assert (model.attn_pool(repeated[None])[0] - pooled[image]).abs().max() < 1e-5


def test_flops_match_pytorchs_flop_counter_and_count_the_pool_per_token():
    """The unpatched count equals FlopCounterMode (2 per multiply-add, attention as matrix products); a patched
    forward counts the pool's keys, values and attention for each token that leaves the last block."""
    model = tiny_siglip()
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        reference(contrasted_images(1))
    assert ats.gflops(model) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-12)
    ats.patch(model, ats.ATSConfig.single_stage(k=20, block=2, sampler="topk"))
    with torch.no_grad():
        model(contrasted_images())
    stats = ats.last_stats(model)
    c, hidden = 64, 256
    dense = lambda n: 3 * n * c * c + 2 * n * n * c + n * c * c + 2 * n * c * hidden  # noqa: E731
    n_out = 20
    ats_block = 3 * 64 * c * c + 64 * 64 * c + 2 * n_out * 64 * c + n_out * c * c + 2 * n_out * c * hidden
    pool = c * c + c * c + 2 * c * hidden + n_out * (2 * c * c + 2 * c)  # query, proj, MLP; per token kv, attention
    flops = 64 * c * 3 * 16 + 2 * dense(64) + ats_block + dense(n_out) + pool + c * 10
    assert (stats.tokens_out[:, -1] == n_out).all()
    assert torch.allclose(stats.gflops.double(), torch.full((8,), flops / 1e9, dtype=torch.float64), rtol=1e-6)
    assert ats.gflops(model) == pytest.approx(flops / 1e9, rel=1e-9)


def test_unpatch_restores_the_original_forward_exactly():
    model = tiny_siglip()
    assert type(model) is VisionTransformer
    assert_unpatch_restores(model, CONFIG, contrasted_images())


def test_gradients_reach_every_parameter_in_train_mode():
    model = tiny_siglip(drop_path_rate=0.1, init_values=1e-2).train()
    ats.patch(model, CONFIG)
    assert_gradients_reach_every_parameter(model, contrasted_images())


def test_torch_save_and_load_keep_the_model_patched():
    assert_pickles_patched(tiny_siglip(), CONFIG, contrasted_images())


def test_a_pool_with_its_own_position_embedding_is_refused():
    model = tiny_siglip()
    model.attn_pool = AttentionPoolLatent(64, num_heads=4, pos_embed="abs", feat_size=64)
    with pytest.raises(TypeError, match="position embedding"):
        ats.patch(model, CONFIG)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 32\]"):
        ats.patch(tiny_siglip(), CONFIG)(torch.zeros(2, 3, 48, 48))
