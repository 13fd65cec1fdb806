"""A patched model still behaves like the model it came from, in every supported family."""
import dataclasses
import pickle
from typing import Optional

import pytest
import torch
import transformers
from conftest import assert_pickles_patched, contrasted_clips, contrasted_images, tiny_vit
from test_patch_beit import tiny_beit
from test_patch_eva import tiny_eva
from test_patch_hf import tiny_hf
from test_patch_hf_images import tiny
from test_patch_hf_video import FRAMES, SIZE
from test_patch_hf_video import tiny as tiny_video
from test_patch_siglip import tiny_siglip
from torch._dynamo.testing import CompileCounter

import ats
from ats.adapters import family_of, takes_clips
from ats.reference import create_reference_video, create_reference_xvit

CONFIG = ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True)
#: The video models' blocks as wide as the image models' (their clips are larger than their tokens).
VIDEO_BLOCKS = dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4)
MODELS = {
    "timm ViT": tiny_vit,
    "timm ViT, average pooling": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "timm SigLIP (attention pool)": lambda: tiny_siglip(depth=6),
    "timm Eva (mixed RoPE)": lambda: tiny_eva("rope mixed + ape", depth=6),
    "timm Beit (relative position bias)": lambda: tiny_beit("own and shared bias, SwiGLU", depth=6),
    "ViTForImageClassification": lambda: tiny_hf("ViTForImageClassification"),
    "DeiTForImageClassificationWithTeacher": lambda: tiny_hf("DeiTForImageClassificationWithTeacher"),
    "Dinov2WithRegistersForImageClassification": lambda: tiny_hf("Dinov2WithRegistersForImageClassification"),
    "CLIPForImageClassification": lambda: tiny("CLIPForImageClassification", num_hidden_layers=6, peak=3.0),
    "BeitForImageClassification (relative position bias)": lambda: tiny("BeitForImageClassification",
                                                                        num_hidden_layers=6),
    "IJepaForImageClassification (no class token)": lambda: tiny("IJepaForImageClassification", num_hidden_layers=6),
    "DINOv3ViTModel (rotary embeddings)": lambda: tiny("DINOv3ViTModel", num_hidden_layers=6),
    "VideoMAEForVideoClassification (no class token)": lambda: tiny_video("VideoMAEForVideoClassification",
                                                                          peak=3.0, **VIDEO_BLOCKS),
    "VivitForVideoClassification": lambda: tiny_video("VivitForVideoClassification", **VIDEO_BLOCKS),
}
#: The families the installed transformers has (DINOv3 came in 4.56).
MODELS = {name: create for name, create in MODELS.items() if hasattr(transformers, name.split(" ")[0])
          or name.startswith("timm")}


def config_for(name: str) -> ats.ATSConfig:
    """CONFIG, scored by self-attention for timm's average pooling; keeping more of VideoMAE's 32 tokens, whose
    counts vary too little from batch to batch at rho 0.87 for the compile test."""
    if "average" in name:
        return ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True, score="self_attention")
    return ats.ATSConfig.multi_stage(1.0, first=1, depth=6, fuse=True) if name.startswith("VideoMAE") else CONFIG


def inputs_for(model: torch.nn.Module, count: int = 8, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images, or clips for a video model, whose contrast grows with the index (random contrasts with
    ``generator``)."""
    if generator is not None:
        shape = (count, FRAMES, 1, SIZE, SIZE) if takes_clips(model) else (count, 3, 32, 32)
        inputs = torch.randn(shape, generator=generator)
        return inputs * torch.rand(count, *[1] * (len(shape) - 1), generator=generator) * 3
    return contrasted_clips(count, FRAMES, SIZE) if takes_clips(model) else contrasted_images(count)


def main_output(output) -> torch.Tensor:
    """What a forward is compared by: a timm model's logits, a transformers output's logits or, for a base model,
    its pooled output."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if getattr(output, "logits", None) is not None else output.pooler_output


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_save_and_load_keep_the_model_patched(name):
    model = MODELS[name]()
    loaded = assert_pickles_patched(model, config_for(name), inputs_for(model), main_output)
    ats.unpatch(loaded)
    assert type(loaded).__name__ == type(model).__name__.removeprefix("ATS")


def refused_entry_points(name: str):
    """The forward entry points of each family that would skip ATS, as calls on (model, images)."""
    if name.startswith("timm"):
        return {"forward_intermediates": lambda model, images: model.forward_intermediates(images)}
    return {"output_hidden_states": lambda model, images: model(images, output_hidden_states=True),
            "output_attentions": lambda model, images: model(images, output_attentions=True)}


@pytest.mark.parametrize("name", list(MODELS))
def test_entry_points_that_would_skip_ats_are_refused_with_the_way_out(name):
    model = ats.patch(MODELS[name](), config_for(name))
    for entry_point, call in refused_entry_points(name).items():
        with pytest.raises((NotImplementedError, ValueError), match="ats.unpatch") as error:
            call(model, inputs_for(model))
        assert entry_point in str(error.value)


def test_timm_forward_intermediates_is_refused_and_pre_logits_pools_valid_tokens():
    model = ats.patch(tiny_vit(class_token=False, global_pool="avg"), config_for("average"))
    images = contrasted_images()
    with pytest.raises(NotImplementedError, match="ats.unpatch"):
        model.forward_intermediates(images)
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
    lengths = ats.last_stats(model).tokens_out[:, -1]
    assert pooled.shape == (8, 64) and (lengths < features.shape[1]).any()
    sizes = model._ats.pool_weights
    expected = model.fc_norm((features * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True))
    assert torch.allclose(pooled, expected, atol=1e-5)


def turn_on_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing the family's own way."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:  # transformers 4.x
        model.gradient_checkpointing_enable()


def training_step(model: torch.nn.Module, images: torch.Tensor):
    """Seeded forward and backward; returns the logits, the gradients and the bytes saved for backward
    outside checkpointed regions."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = main_output(model(images))
    logits.logsumexp(dim=-1).sum().backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits, gradients, sum(saved)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.slow
def test_gradient_checkpointing_is_honoured_in_ats_blocks(name):
    model = MODELS[name]().train()
    config = dataclasses.replace(config_for(name), stochastic=True)
    ats.patch(model, config)
    images = inputs_for(model)
    logits, gradients, saved = training_step(model, images)
    turn_on_checkpointing(model)
    checkpointed_logits, checkpointed_gradients, checkpointed_saved = training_step(model, images)
    assert torch.equal(checkpointed_logits, logits) and checkpointed_gradients.keys() == gradients.keys()
    for parameter, gradient in gradients.items():
        assert torch.allclose(checkpointed_gradients[parameter], gradient, atol=1e-6), parameter
    assert checkpointed_saved < saved / 20
    assert ats.last_stats(model).tokens_out[:, -1].unique().numel() > 1
    assert pickle.loads(pickle.dumps(model))._ats.config == model._ats.config  # a checkpoint mid-training


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.slow
def test_torch_compile_does_not_recompile_for_new_token_counts(name):
    """Over 10 batches that keep different numbers of tokens, recompiling stops after the first ones: a
    compiled graph takes any token count; only a new packing layout (padded or not, ...) compiles again."""
    model = ats.patch(MODELS[name](), config_for(name))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    generator = torch.Generator().manual_seed(2)
    compiled_frames, widths = [], set()
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(10):
            images = inputs_for(model, generator=generator)
            logits = main_output(compiled(images))
            compiled_frames.append(counter.frame_count)
            widths.add(int(ats.last_stats(model).tokens_out[:, -1].max()))
            assert torch.allclose(logits, main_output(model(images)), atol=1e-5)
    recompiling_batches = sum(after > before for before, after in zip(compiled_frames[1:], compiled_frames[2:]))
    assert len(widths) >= 3 and recompiling_batches <= 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
def test_half_precision_models_run_in_their_dtype(name, dtype):
    """A model cast to float16 or bfloat16: keep-all gives its unpatched output, and fusing, distinct tokens,
    merging and static mode give finite outputs in its dtype."""
    model = MODELS[name]().to(dtype)
    inputs = inputs_for(model).to(dtype)
    configs = [dataclasses.replace(config_for(name), distinct=0.9), ats.MergeConfig(4)]
    with torch.no_grad():
        before = main_output(model(inputs)).float()
        ats.patch(model, ats.KeepAllConfig())
        assert (main_output(model(inputs)).float() - before).abs().max() <= 1e-2 * before.abs().max()
        for config, static in [(config, False) for config in configs] + [(config_for(name), True)]:
            ats.patch(model, config, static=static)
            output = main_output(model(inputs))
            assert output.dtype == dtype and torch.isfinite(output).all(), (config, static)


@pytest.mark.parametrize("name", list(MODELS))
def test_an_empty_batch_gives_an_empty_output(name):
    """A batch of no images (the last shard of an uneven split) passes through a patched model, even where the
    unpatched one fails on it (transformers' ViT and timm's Beit cannot size their attention heads)."""
    model = MODELS[name]()
    inputs = inputs_for(model)
    with torch.no_grad():
        one = main_output(model(inputs[:1]))
        for static in (False, True):
            ats.patch(model, config_for(name), static=static)
            assert main_output(model(inputs[:0])).shape == (0, *one.shape[1:])
            assert ats.last_stats(model).gflops.shape == (0,)


@pytest.mark.parametrize("create", [create_reference_video, create_reference_xvit], ids=["TimeSformer", "XViT"])
def test_an_empty_batch_of_clips_passes_through_the_tube_families(create):
    model = create().eval()
    clips = torch.zeros(1, *family_of(model).input_size(model))
    with torch.no_grad():
        one = main_output(model(clips))
        ats.patch(model, ats.ATSConfig.multi_stage(1.0, first=1, fuse=True, distinct=0.9))
        assert main_output(model(clips[:0])).shape == (0, *one.shape[1:])
