"""torchvision's VisionTransformer, random init: exact with nothing dropped, a batch equal to its images alone,
unpatch, FLOPs equal to PyTorch's counter, gradients and pickling."""
import pytest
import torch
from conftest import (
    assert_exact_kept_all_and_alone_in_a_batch,
    assert_gradients_reach_every_parameter,
    assert_pickles_patched,
    assert_unpatch_restores,
)
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.vision_transformer import VisionTransformer

import ats

CONFIG = ats.ATSConfig.multi_stage(0.7, first=1)


def tiny_torchvision_vit(**kwargs) -> VisionTransformer:
    """A 4-block, 64-wide torchvision ViT on 32 x 32 images with 4 x 4 patches, random init (its head too: torchvision
    starts it at zero), peaked attention."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10, **kwargs).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
        for block in model.encoder.layers:
            block.self_attention.in_proj_weight.mul_(3.0)
    return model


def images(count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, 32, 32, generator=generator) * torch.linspace(0.2, 2.0, count)[:, None, None, None]


def test_keep_all_is_the_unpatched_model_and_a_batch_is_its_images_alone():
    model = tiny_torchvision_vit()
    assert_exact_kept_all_and_alone_in_a_batch(model, CONFIG, images())


def test_gflops_match_pytorchs_flop_counter():
    """The analytic count equals FlopCounterMode (2 per multiply-add) on the unpatched model, run with autograd on
    so that nn.MultiheadAttention computes its attention as matrix products the counter sees."""
    model = tiny_torchvision_vit()
    for block in model.encoder.layers:
        attention = block.self_attention
        attention.forward = lambda q, k, v, attention=attention, **options: type(attention).forward(
            attention, q, k, v, **{**options, "need_weights": True})
    with FlopCounterMode(display=False) as counter:
        model(images(1))
    assert ats.gflops(model) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    ats.patch(model, CONFIG)
    with torch.no_grad():
        model(images())
    assert (ats.last_stats(model).gflops < ats.gflops(ats.unpatch(model))).all()


def test_unpatch_pickling_gradients_and_a_wrong_size():
    assert_unpatch_restores(tiny_torchvision_vit(), CONFIG, images())
    assert_pickles_patched(tiny_torchvision_vit(), CONFIG, images())
    model = tiny_torchvision_vit(dropout=0.1, attention_dropout=0.1).train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, fuse=True))
    assert_gradients_reach_every_parameter(model, images())
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 32\]"):
        model(torch.zeros(1, 3, 48, 48))
