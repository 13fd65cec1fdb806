"""ATS on Hugging Face VideoMAE and ViViT: tubelet tokens under joint space-time attention (CI runs this file
under transformers 4.x and 5.x)."""

import pytest
import torch
import transformers
from conftest import (
    assert_bad_input_is_refused,
    assert_gflops_match_the_counter,
    assert_pickles_patched,
    contrasted_clips,
)
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters.hf import attention_of
from ats.adapters.hf_video import HF_VIDEO

FRAMES, SIZE = 4, 32
#: 4 frames of 32x32, tubelets of 2 frames x 8 x 8: 2 x 16 = 32 space-time tokens; 4 blocks of width 32.
VIDEO = dict(image_size=SIZE, num_frames=FRAMES, num_channels=1, hidden_size=32, intermediate_size=64,
             num_hidden_layers=4, num_attention_heads=2)


def config(name: str, **fixed):
    """A tiny config of transformers' config class ``name``: VIDEO, ``fixed`` and the overrides of the call on top."""
    return lambda **overrides: getattr(transformers, name)(**{**VIDEO, **fixed, **overrides})


CONFIGS = {
    "VideoMAEModel": config("VideoMAEConfig", patch_size=8, tubelet_size=2, use_mean_pooling=False),
    "VideoMAEForVideoClassification": config("VideoMAEConfig", patch_size=8, tubelet_size=2, num_labels=5),
    "VivitModel": config("VivitConfig", tubelet_size=[2, 8, 8]),
    "VivitForVideoClassification": config("VivitConfig", tubelet_size=[2, 8, 8], num_labels=5),
}
CLASSES = list(CONFIGS)
TOKENS = (FRAMES // 2) * (SIZE // 8) ** 2
CONFIG = ats.ATSConfig.multi_stage(0.8, first=1, depth=4, min_tokens=2)
FUSE_DISTINCT = ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=0.5, min_tokens=2)


def tiny(name: str, attention: str = "sdpa", peak: float = 6.0, **overrides) -> torch.nn.Module:
    """A random-init 4-block video model of class ``name``, its query and key weights scaled by ``peak`` so that
    clips keep different numbers of tokens, its query and value biases drawn at random (they start at zero;
    VideoMAE keeps them apart from its projections before transformers 5.x)."""
    torch.manual_seed(0)
    model = getattr(transformers, name)(CONFIGS[name](attn_implementation=attention, **overrides)).eval()
    with torch.no_grad():
        for layer in HF_VIDEO.blocks(model):
            attn = attention_of(layer)
            attn.q.weight.mul_(peak)
            attn.k.weight.mul_(peak)
            for bias in (attn.q.bias, attn.v.bias, attn.q_bias, attn.v_bias):
                if bias is not None:
                    bias.normal_()
    return model


def clips(count: int = 6) -> torch.Tensor:
    return contrasted_clips(count, FRAMES, SIZE)


def per_clip(model: torch.nn.Module, output) -> list:
    """Each clip's logits, or pooled output, or valid tokens of the last hidden state."""
    for key in ("logits", "pooler_output"):
        if getattr(output, key, None) is not None:
            return list(getattr(output, key))
    counts = ats.last_stats(model).tokens_out[:, -1].tolist()
    return [output.last_hidden_state[clip, :count] for clip, count in enumerate(counts)]


def first(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


@pytest.mark.parametrize("name", CLASSES)
def test_keeping_every_token_gives_the_unpatched_output(name):
    model = tiny(name)
    with torch.no_grad():
        before = first(model(clips()))
        for config in (ats.KeepAllConfig(), ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk")):
            ats.patch(model, config)
            assert (first(model(clips())) - before).abs().max() < 1e-5, config.describe()


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("config", [CONFIG, FUSE_DISTINCT], ids=["ats", "fuse-distinct"])
def test_clips_do_not_depend_on_their_batch_mates(name, config):
    model = ats.patch(tiny(name), config)
    batch = clips()
    with torch.no_grad():
        together = per_clip(model, model(batch))
        stats = ats.last_stats(model)
        alone = [per_clip(model, model(clip[None]))[0] for clip in batch]
    assert max((a - b).abs().max() for a, b in zip(together, alone)) < 1e-4
    assert (stats.tokens[:, 0] == TOKENS + HF_VIDEO.num_prefix_tokens(model)).all()
    assert stats.kept[3].max() < TOKENS, "kept indexes the space-time tokens"
    if config is FUSE_DISTINCT or HF_VIDEO.shape(model).has_class_token:  # flat self-attention of random weights
        assert len(set(stats.tokens[:, -1].tolist())) > 1, "kept-token counts should differ between clips"


@pytest.mark.parametrize("name", CLASSES)
def test_unpatch_restores_the_original_forward_exactly(name):
    model = tiny(name)
    original = type(model)
    with torch.no_grad():
        before = first(model(clips()))
        ats.patch(model, FUSE_DISTINCT)
        patched = per_clip(model, model(clips()))
        ats.unpatch(model)
        after = first(model(clips()))
    assert type(model) is original and torch.equal(before, after)
    assert any(a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(before, patched))


@pytest.mark.parametrize("name", CLASSES)
def test_flops_match_pytorchs_flop_counter(name):
    """Per clip: the tubelet convolution, the blocks on every space-time token, the head; equal to FlopCounterMode
    (2 per multiply-add) on the unpatched model with eager attention, and less per clip once patched."""
    model = tiny(name, "eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clips(1))
    assert_gflops_match_the_counter(model, counter.get_total_flops() / 2, clips(2), clips(), FUSE_DISTINCT)


@pytest.mark.parametrize("name", CLASSES)
def test_gradients_are_finite_in_train_mode(name):
    model = tiny(name, hidden_dropout_prob=0.1).train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, fuse=True, min_tokens=2))
    first(model(clips())).logsumexp(-1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), parameter_name
    for layer in HF_VIDEO.blocks(model):
        assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in layer.parameters())


@pytest.mark.parametrize("name", CLASSES)
def test_torch_save_and_load_keep_the_model_patched(name):
    assert_pickles_patched(tiny(name), CONFIG, clips(), first)


@pytest.mark.parametrize("name", CLASSES)
def test_bad_input_gets_a_clear_error(name):
    model = tiny(name)
    assert_bad_input_is_refused(model, 4, CONFIG, clips(2), [(2, FRAMES, 1, 16, 16), (2, 1, SIZE, SIZE)], TOKENS)
    with pytest.raises(ValueError, match=r"\[B, 4, 1, 32, 32\].*sample 4 frames"):
        model(torch.randn(2, 3, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="interpolate_pos_encoding is not supported"):
        model(clips(2), interpolate_pos_encoding=True)
    assert HF_VIDEO.input_size(model) == (FRAMES, 1, SIZE, SIZE)


def test_videomae_scores_by_self_attention_and_its_first_token_classifier_is_refused():
    model = tiny("VideoMAEForVideoClassification")
    with pytest.raises(ValueError, match="no class token"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, score="cls"))
    with pytest.raises(TypeError, match="use_mean_pooling=True"):
        ats.patch(tiny("VideoMAEForVideoClassification", use_mean_pooling=False), CONFIG)
    ats.patch(model, CONFIG)
    with torch.no_grad():
        logits = model(clips()).logits
    assert logits.shape == (6, 5) and ats.last_stats(model).gflops.shape == (6,)
