"""open_clip's VisionTransformer (``model.visual`` of its CLIP models), random init: exact with nothing dropped, a
batch equal to its images alone, ``encode_image`` and zero-shot classification through a patched tower, pooling
variants, FLOPs equal to PyTorch's counter, gradients, pickling, and the TimmModel towers patched through their
trunk."""
import types

import open_clip
import pytest
import torch
from conftest import assert_gradients_reach_every_parameter, assert_pickles_patched, assert_unpatch_restores
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ats

CONFIG = ats.ATSConfig.multi_stage(0.7, first=1)


def tiny_clip(**vision) -> open_clip.CLIP:
    """An open_clip CLIP with a 4-block, 64-wide image tower on 32 x 32 images, random init."""
    torch.manual_seed(0)
    vision_cfg = dict(image_size=32, patch_size=4, width=64, layers=4, head_width=16, **vision)
    text_cfg = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(3.0)
    return model


def images(count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, 32, 32, generator=generator) * torch.linspace(0.2, 2.0, count)[:, None, None, None]


VARIANTS = {"class token": {}, "mean pooling": dict(pool_type="avg"), "late norm": dict(final_ln_after_pool=True),
            "attentional pooler": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
            "quickgelu, layer scale": dict(ls_init_value=0.1)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_all_is_the_unpatched_tower_and_a_batch_is_its_images_alone(variant):
    model = tiny_clip(**VARIANTS[variant])
    x = images()
    with torch.no_grad():
        before = model.encode_image(x)
        ats.patch(model.visual, ats.KeepAllConfig())
        assert (model.encode_image(x) - before).abs().max() < 1e-5
        ats.patch(model.visual, CONFIG)
        together = model.encode_image(x)
        kept = ats.last_stats(model.visual).tokens_out[:, -1]
        alone = torch.cat([model.encode_image(x[i:i + 1]) for i in range(len(x))])
    assert (together - alone).abs().max() < 1e-5
    assert kept.unique().numel() > 1


def test_zero_shot_classification_runs_through_the_patched_tower():
    model = tiny_clip()
    text = torch.randint(0, 50, (5, 8))
    with torch.no_grad():
        classes = model.encode_text(text, normalize=True)
        ats.patch(model.visual, CONFIG)
        probabilities = (100 * model.encode_image(images(), normalize=True) @ classes.T).softmax(dim=-1)
    assert probabilities.shape == (3, 5) and torch.allclose(probabilities.sum(-1), torch.ones(3))
    assert ats.last_stats(model.visual).gflops.max() < ats.gflops(ats.unpatch(model.visual))


def test_output_tokens_come_back_padded():
    model = tiny_clip(output_tokens=True)
    ats.patch(model.visual, CONFIG)
    with torch.no_grad():
        pooled, tokens = model.visual(images())
    kept = ats.last_stats(model.visual).tokens_out[:, -1] - 1
    assert pooled.shape == (3, 24) and tokens.shape[:2] == (3, int(kept.max()))
    for image, count in enumerate(kept.tolist()):
        assert (tokens[image, count:] == 0).all() and (tokens[image, :count].abs().sum(-1) > 0).all()


def _attention_as_matrix_products(block, q_x, k_x=None, v_x=None, attn_mask=None):
    return block.attn(q_x, q_x, q_x, need_weights=True)[0]


def _weighing(attention: torch.nn.MultiheadAttention):
    """``attention``'s forward with need_weights=True, whatever its caller asks."""
    def forward(query, key, value, **options):
        return type(attention).forward(attention, query, key, value, **{**options, "need_weights": True})
    return forward


@pytest.mark.parametrize("variant", ["class token", "attentional pooler"])
def test_gflops_match_pytorchs_flop_counter(variant):
    """The analytic count equals FlopCounterMode (2 per multiply-add) on the unpatched tower with its attention as
    matrix products (need_weights=True, with autograd on: nn.MultiheadAttention's fused kernel is not counted)."""
    visual = tiny_clip(**VARIANTS[variant]).visual
    for block in visual.transformer.resblocks:
        block.attention = types.MethodType(_attention_as_matrix_products, block)
    if visual.attn_pool is not None:
        visual.attn_pool.attn.forward = _weighing(visual.attn_pool.attn)
    with FlopCounterMode(display=False) as counter:
        visual(images(1))
    assert ats.gflops(visual) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_unpatch_pickling_and_gradients():
    model = tiny_clip()
    assert_unpatch_restores(model.visual, CONFIG, images())
    assert_pickles_patched(model.visual, CONFIG, images())
    visual = tiny_clip().visual.train()
    ats.patch(visual, ats.ATSConfig.multi_stage(0.8, first=1, fuse=True))
    visual.proj.requires_grad_(True)
    assert_gradients_reach_every_parameter(visual, images())


def test_a_timm_tower_is_patched_through_its_trunk():
    """open_clip's TimmModel (SigLIP's, EVA's, PE's towers) wraps a timm model and a head of its own: patching the
    wrapper patches the trunk, and encode_image, GFLOPs (with the wrapper's head), stats and unpatch take the
    wrapper."""
    torch.manual_seed(0)
    vision_cfg = dict(timm_model_name="test_vit", timm_pool="token", timm_proj="linear", image_size=160)
    text_cfg = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    tower = model.visual
    with torch.no_grad():
        for block in tower.trunk.blocks:
            block.attn.qkv.weight.mul_(6.0)
    x = images_of_size(4, 160)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        tower(x[:1])
    head = tower.head.proj.in_features * tower.head.proj.out_features
    assert ats.gflops(tower) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-12)
    assert ats.gflops(tower) * 1e9 == pytest.approx(ats.gflops(tower.trunk) * 1e9 + head, rel=1e-12)
    with torch.no_grad():
        before = model.encode_image(x)
        assert ats.patch(tower, ats.KeepAllConfig()) is tower and ats.is_patched(tower)
        assert ats.is_patched(tower.trunk) and type(tower) is open_clip.timm_model.TimmModel
        assert (model.encode_image(x) - before).abs().max() < 1e-5
        ats.patch(tower, ats.ATSConfig.multi_stage(0.7, first=1))
        together = model.encode_image(x)
        stats, trunk_stats = ats.last_stats(tower), ats.last_stats(tower.trunk)
        alone = torch.cat([model.encode_image(x[i:i + 1]) for i in range(len(x))])
    assert (together - alone).abs().max() < 1e-5 and stats.tokens_out[:, -1].unique().numel() > 1
    assert torch.allclose(stats.gflops.double() * 1e9, trunk_stats.gflops.double() * 1e9 + head)
    assert ats.unpatch(tower) is tower and not ats.is_patched(tower.trunk)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), before)


def images_of_size(count: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 2.0, count)[:, None, None, None]
    return torch.randn(count, 3, size, size, generator=generator) * scale


def test_the_command_line_takes_an_open_clip_tower_and_a_timm_towers_trunk():
    from timm.models.vision_transformer import VisionTransformer

    from ats.commands.options import load_package_model

    clip = load_package_model("open_clip:ViT-B-32", pretrained=False)
    siglip = load_package_model("open_clip:ViT-B-16-SigLIP", pretrained=False)
    assert isinstance(clip, open_clip.transformer.VisionTransformer) and isinstance(siglip, VisionTransformer)
    assert ats.gflops(siglip) == pytest.approx(ats.gflops(open_clip.create_model("ViT-B-16-SigLIP").visual))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_package_model("open_clip:ViT-X-99", pretrained=False)
