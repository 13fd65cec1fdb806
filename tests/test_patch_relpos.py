"""timm's relative-position ViTs (VisionTransformerRelPos), random init: exact with nothing dropped, a batch equal to
its images alone with the biases gathered at the kept tokens, FLOPs equal to PyTorch's counter, unpatch, pickling,
gradients, and the post-norm variant refused with the reason."""
import pytest
import timm
import torch
from conftest import (
    assert_exact_kept_all_and_alone_in_a_batch,
    assert_gradients_reach_every_parameter,
    assert_pickles_patched,
    assert_unpatch_restores,
)
from torch.utils.flop_counter import FlopCounterMode

import ats

CONFIG = ats.ATSConfig.multi_stage(0.7, first=1, score="self_attention")
#: A bias MLP per block, with a class token; shared table biases; no class token (the self-attention score).
VARIANTS = {"mlp bias, class token": "vit_relpos_medium_patch16_cls_224",
            "shared bias": "vit_srelpos_small_patch16_224", "no class token": "vit_relpos_small_patch16_224"}


def tiny_relpos(variant: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(VARIANTS[variant], img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4,
                              **kwargs).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)
            if hasattr(block.attn.rel_pos, "mlp"):  # timm starts the bias MLP's last layer at zero
                torch.nn.init.normal_(block.attn.rel_pos.mlp.fc2.weight, std=0.1)
    return model


def images(count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, 32, 32, generator=generator) * torch.linspace(0.2, 2.0, count)[:, None, None, None]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_all_is_the_unpatched_model_and_a_batch_is_its_images_alone(variant):
    model = tiny_relpos(variant)
    assert_exact_kept_all_and_alone_in_a_batch(model, CONFIG, images())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gflops_match_pytorchs_flop_counter(variant):
    """The analytic count equals FlopCounterMode (2 per multiply-add) on the unpatched model with its attention as
    matrix products, less what making the biases costs (once per forward, whatever the batch: not counted)."""
    model = tiny_relpos(variant)
    for block in model.blocks:
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(1))
    with FlopCounterMode(display=False) as biases, torch.no_grad():
        for module in [model.shared_rel_pos, *(block.attn.rel_pos for block in model.blocks)]:
            if module is not None:
                module.get_bias()
    expected = (counter.get_total_flops() - biases.get_total_flops()) / 2
    assert ats.gflops(model) * 1e9 == pytest.approx(expected, rel=1e-9)


def test_unpatch_pickling_gradients_and_the_post_norm_variant():
    assert_unpatch_restores(tiny_relpos("mlp bias, class token"), CONFIG, images())
    assert_pickles_patched(tiny_relpos("shared bias"), CONFIG, images())
    model = tiny_relpos("no class token", drop_path_rate=0.1).train()  # a class token's row has no bias
    ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, fuse=True, score="self_attention"))
    assert_gradients_reach_every_parameter(model, images())
    with torch.device("meta"):
        post_norm = timm.create_model("vit_relpos_small_patch16_rpn_224")
    with pytest.raises(TypeError, match="ResPostRelPosBlock with RelPosAttention: it normalises after each residual"):
        ats.patch(post_norm, CONFIG)
