"""ATS on Hugging Face CvT: the last stage's blocks, linear projections where ATS needs them, FLOPs."""
import copy
import warnings

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters import logits_from, tokens_before
from ats.adapters.cvt import CVT

#: A 3-stage CvT on 12x12 images: stages of 12x12 (1 block, width 8), 6x6 (2 blocks, 16) and 6x6
#: (4 blocks, 24, with the class token): 36 patch tokens + 1 in the blocks ATS counts.
TINY = dict(num_channels=3, num_labels=5, patch_sizes=[3, 3, 3], patch_stride=[1, 2, 1], patch_padding=[1, 1, 1],
            embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 4], mlp_ratio=[2.0] * 3,
            drop_path_rate=[0.0] * 3, cls_token=[False, False, True], stride_kv=[2] * 3)
CONFIG = ats.ATSConfig.multi_stage(0.7, first=1, depth=4)


def tiny_cvt(name: str = "CvtForImageClassification", **overrides) -> nn.Module:
    """A random-init tiny CvT, its query and key weights of the last stage scaled up so that images keep
    different numbers of tokens; batch norms with non-trivial running statistics. Its input size is
    declared the way the reference CvT declares it (CvT configs name none)."""
    torch.manual_seed(0)
    model = getattr(transformers, name)(transformers.CvtConfig(**{**TINY, **overrides})).eval()
    model.pretrained_cfg = dict(input_size=(3, 12, 12), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                                crop_pct=1.0, crop_mode="center")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        for layer in CVT.blocks(model):
            layer.attention.attention.projection_query.weight.mul_(12)
            layer.attention.attention.projection_key.weight.mul_(12)
    return model


def images(count: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, 12, 12, generator=generator) * torch.linspace(0.2, 3.0, count)[:, None, None, None]


def linear_reference(model: nn.Module, first: int) -> nn.Module:
    """A copy of ``model`` whose last-stage blocks from ``first`` on run transformers' own code with the
    convolutions taken out of their q/k/v projections: the linear-projection model, built independently."""
    model = copy.deepcopy(model)
    for layer in CVT.blocks(model)[first:]:
        attention = layer.attention.attention
        for projection in (attention.convolution_projection_query, attention.convolution_projection_key,
                           attention.convolution_projection_value):
            projection.convolution_projection = nn.Identity()
    return model


def patched(model: nn.Module, config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ats.patch(model, config)


def test_unpatch_restores_the_model_exactly():
    model = tiny_cvt()
    x = images()
    with torch.no_grad():
        before = model(pixel_values=x).logits
        patched(model, CONFIG)
        during = model(pixel_values=x).logits
        ats.unpatch(model)
        after = model(pixel_values=x).logits
    assert type(model) is transformers.CvtForImageClassification
    assert torch.equal(before, after)
    assert not torch.allclose(before, during)


@pytest.mark.parametrize("first", [0, 2])
def test_keeping_every_token_is_the_linear_projection_model(first):
    model = tiny_cvt()
    x = images()
    with torch.no_grad():
        expected = linear_reference(model, first)(pixel_values=x).logits
        keep_all = patched(model, ats.KeepAllConfig(first))(pixel_values=x).logits
        every_token = patched(model, ats.ATSConfig.single_stage(37, block=first, sampler="topk"))(pixel_values=x).logits
        stats = ats.last_stats(model)
    assert (keep_all - expected).abs().max() < 1e-5
    assert (every_token - expected).abs().max() < 1e-5
    assert stats.linear_blocks == tuple(range(first, 4))
    assert (stats.tokens == 37).all()


def test_images_do_not_depend_on_their_batch_mates():
    model = patched(tiny_cvt(), CONFIG)
    x = images()
    with torch.no_grad():
        together = model(pixel_values=x).logits
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(pixel_values=image[None]).logits for image in x])
    assert (together - alone).abs().max() < 1e-4
    assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"
    assert (tokens[:, :2] == 37).all()


def test_the_blocks_before_the_first_patched_one_keep_their_convolutions():
    model = tiny_cvt()
    x = images()
    first = CONFIG.first_block
    with torch.no_grad():
        expected = CVT.embed(model, x)
        height, width = CVT.grid(model, tuple(x.shape[1:]))
        for layer in CVT.blocks(model)[:first]:
            expected = layer(expected, height, width)
        patched(model, CONFIG)
        before = tokens_before(model, x, first)
        resumed = logits_from(model, tokens_before(model, x, 1), 1)
        whole = model(pixel_values=x).logits
    assert torch.allclose(before, expected, atol=1e-6)
    assert torch.allclose(resumed, whole, atol=1e-6)


def test_patching_warns_naming_the_blocks_that_lose_their_convolutions():
    with pytest.warns(UserWarning, match=r"blocks 1\.\.3 of the last stage now run their linear q/k/v projections"):
        ats.patch(tiny_cvt(), CONFIG)


def test_flops_against_a_hand_count():
    model = tiny_cvt()
    c, mlp, heads_out = 24, 2 * 24 * 48, 24 * 5
    # Stage 1 (12x12, width 8, no class token): embedding conv 3x3 from 3 channels; depthwise q conv on
    # 144 positions, k and v on the 6x6 strided grid; q over 144 tokens, k/v over 36; attention; proj; MLP.
    stage1 = 144 * 8 * 3 * 9 + (9 * 8 * (144 + 2 * 36) + 144 * 64 + 2 * 36 * 64 + 2 * 144 * 36 * 8 + 144 * 64
                                + 144 * 2 * 8 * 16)
    # Stage 2 (6x6, width 16, two blocks): embedding conv 3x3 stride 2 from 8 channels; keys on a 3x3 grid.
    stage2 = 36 * 16 * 8 * 9 + 2 * (9 * 16 * (36 + 2 * 9) + 36 * 256 + 2 * 9 * 256 + 2 * 36 * 9 * 16 + 36 * 256
                                    + 36 * 2 * 16 * 32)
    embedding3 = 36 * 24 * 16 * 9
    conv_block = 9 * c * (36 + 2 * 9) + 37 * c * c + 2 * 10 * c * c + 2 * 37 * 10 * c + 37 * c * c + 37 * mlp
    linear_block = 3 * 37 * c * c + 2 * 37 * 37 * c + 37 * c * c + 37 * mlp
    stem = stage1 + stage2 + embedding3
    assert ats.gflops(model) * 1e9 == pytest.approx(stem + 4 * conv_block + heads_out)
    patched(model, ats.KeepAllConfig(1))
    assert ats.gflops(model) * 1e9 == pytest.approx(stem + conv_block + 3 * linear_block + heads_out)
    with torch.no_grad():
        model(pixel_values=images(2))
    assert torch.allclose(ats.last_stats(model).gflops.double() * 1e9,
                          torch.tensor(float(stem + conv_block + 3 * linear_block + heads_out), dtype=torch.float64))


def test_flops_match_pytorchs_flop_counter():
    """The analytic count against torch's FlopCounterMode (2 per multiply-add) on the unpatched model and
    on the linear-projection model transformers runs itself."""
    model = tiny_cvt()
    x = images(1)
    for config, reference in ((None, model), (ats.KeepAllConfig(2), linear_reference(model, 2))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            reference(pixel_values=x)
        if config is not None:
            patched(model, config)
        assert ats.gflops(model) * 1e9 == counter.get_total_flops() / 2


def test_sampling_cuts_the_flops_of_each_image():
    model = patched(tiny_cvt(), CONFIG)
    with torch.no_grad():
        model(pixel_values=images())
    stats = ats.last_stats(model)
    linear_model = ats.gflops(patched(tiny_cvt(), ats.KeepAllConfig(1)))
    assert (stats.gflops < linear_model).all()
    assert len(set(stats.gflops.tolist())) > 1


def test_gradients_reach_the_linear_projections_and_skip_unused_convolutions():
    model = patched(tiny_cvt(), CONFIG).train()
    output = model(pixel_values=images(), labels=torch.arange(6) % 5)
    output.loss.backward()
    blocks = CVT.blocks(model)
    assert blocks[2].attention.attention.projection_key.weight.grad.abs().sum() > 0
    assert blocks[2].attention.attention.convolution_projection_key.convolution_projection.convolution.weight.grad \
        is None
    assert blocks[0].attention.attention.convolution_projection_key.convolution_projection.convolution.weight.grad \
        .abs().sum() > 0


def test_a_training_step_lowers_the_loss_on_its_batch():
    model = patched(tiny_cvt(), CONFIG).train()
    x, labels = images(), torch.arange(6) % 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = model(pixel_values=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_base_model_returns_padded_patch_tokens_and_the_class_token():
    model = tiny_cvt("CvtModel")
    x = images()
    with torch.no_grad():
        full = model(pixel_values=x)
        patched(model, ats.KeepAllConfig(4 - 1))
        same = model(pixel_values=x)
        patched(model, CONFIG)
        output = model(pixel_values=x)
    stats = ats.last_stats(model)
    assert same.last_hidden_state.shape == (6, 36, 24)
    assert torch.allclose(same.cls_token_value, linear_reference(ats.unpatch(model), 3)(pixel_values=x).cls_token_value,
                          atol=1e-5)
    assert full.cls_token_value.shape == output.cls_token_value.shape == (6, 1, 24)
    width = int(stats.tokens_out[:, -1].max()) - 1
    assert output.last_hidden_state.shape == (6, width, 24)
    shortest = int(stats.tokens_out[:, -1].argmin())
    assert (output.last_hidden_state[shortest, int(stats.tokens_out[shortest, -1]) - 1:] == 0).all()


def test_bad_input_gets_clear_errors():
    model = tiny_cvt()
    with pytest.raises(ValueError, match=r"outside this model's 4 blocks \(0\.\.3\)"):
        ats.patch(model, ats.ATSConfig.single_stage(20, block=4))
    with pytest.raises(TypeError, match="no class token in its last stage"):
        ats.patch(tiny_cvt(cls_token=[False, False, False]), CONFIG)
    patched(model, CONFIG)
    with pytest.raises(ValueError, match=r"expected pixel_values of shape \[B, 3, H, W\]"):
        model(pixel_values=torch.zeros(2, 1, 12, 12))
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(pixel_values=images(2), output_hidden_states=True)


def test_cvt13_costs_what_its_paper_says():
    """CvT-13 (transformers' default config) at 224x224: the paper's 4.5 GFLOPs, to within 2%."""
    model = transformers.CvtForImageClassification(transformers.CvtConfig())
    assert ats.gflops(model, input_size=(3, 224, 224)) == pytest.approx(4.5, rel=0.02)
