"""ViTs as people run them: configs given without a depth follow the model, timm's dynamic image size, refusals with
their reason, and a sweep over every ViT-like model timm lists, built on the meta device, in which ``ats.patch`` and
``ats.gflops`` either accept a model or refuse it (TypeError/ValueError) alike, and nothing else happens."""
import warnings

import pytest
import timm
import torch
from conftest import tiny_vit
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import ats

#: timm's modules of ViT-like families: every model they register is swept.
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
               "vision_transformer_sam", "deit", "eva", "beit", "cait", "naflexvit", "vitamin")


def vit_like_models():
    return [name for name in timm.list_models() if timm.models.get_model_module_name(name) in VIT_MODULES] \
        if hasattr(timm.models, "get_model_module_name") else \
        [name for name in timm.list_models() if timm.models._registry._model_to_module.get(name) in VIT_MODULES]


def patch_it(model: torch.nn.Module) -> None:
    ats.patch(model, ats.ATSConfig.multi_stage(0.7))


def deep_vit(depth: int = 24) -> VisionTransformer:
    return tiny_vit(depth=depth, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("config, first, every", [(ats.ATSConfig.multi_stage(0.7), 3, 1),
                                                  (ats.ATSConfig.recommended(), 3, 1),
                                                  (ats.ATSConfig.multi_stage(0.9, first=5, every=2), 5, 2)])
def test_a_schedule_without_a_depth_runs_to_the_models_last_block(config, first, every):
    assert config.describe().split(" (")[0].endswith("..last" + (f" every {every}" if every > 1 else ""))
    model = deep_vit()
    ats.patch(model, config)
    blocks = list(range(first, 24, every))
    assert model._ats.config.patched_blocks(24) == blocks
    assert model._ats.config.describe().startswith(f"rho={config.budgets[first].rho:g} @ blocks {first}..{blocks[-1]}")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert sorted(ats.last_stats(model).kept) == blocks


def test_a_stacked_schedule_resolves_and_explicit_blocks_past_the_depth_stay_an_error():
    model = deep_vit(16)
    ats.patch(model, ats.StackedConfig(ats.EViTConfig(0.7, blocks=(2,)), ats.ATSConfig.multi_stage(0.7, first=4)))
    assert model._ats.config.patched_blocks(16) == [2, *range(4, 16)]
    with pytest.raises(ValueError, match=r"ATS block indices \[16\] lie outside this model's 16 blocks"):
        ats.patch(model, ats.ATSConfig({3: 0.7, 16: 0.7}))
    with pytest.raises(ValueError, match=r"ATS block indices \[20\] lie outside this model's 16 blocks"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.7, first=20))


def dynamic_vit(**kwargs) -> VisionTransformer:
    """A DINOv2-style timm ViT (registers, 8 x 8 patches) made with ``dynamic_img_size=True``, attention peaked."""
    model = tiny_vit(img_size=64, patch_size=8, reg_tokens=4, dynamic_img_size=True, **kwargs)
    return model


@pytest.mark.parametrize("size, pad", [(64, False), (48, False), (40, True), (36, True)])
def test_dynamic_image_size_runs_at_any_size_the_model_takes(size, pad):
    model = dynamic_vit(dynamic_img_pad=pad)
    x = torch.randn(3, 3, size, size) * torch.linspace(0.3, 2.0, 3)[:, None, None, None]
    reference = dynamic_vit(dynamic_img_pad=pad)
    for block in reference.blocks:
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reference(x[:1])
    assert ats.gflops(model, (3, size, size)) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    with torch.no_grad():
        before = model(x)
        ats.patch(model, ats.KeepAllConfig())
        assert (model(x) - before).abs().max() < 1e-5
        ats.patch(model, ats.ATSConfig.multi_stage(0.7, first=1))
        together = model(x)
        gflops = ats.last_stats(model).gflops
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert (together - alone).abs().max() < 1e-5
    assert (gflops * 1e9 < counter.get_total_flops() / 2).all()


def test_a_size_the_model_does_not_take_is_refused():
    model = ats.patch(dynamic_vit(), ats.ATSConfig.multi_stage(0.7, first=1))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ats.gflops(model, (3, 36, 36))


@pytest.mark.parametrize("block, reason", [(ParallelThingsBlock, "two or more attention branches side by side"),
                                           (ParallelScalingBlock, "its attention and MLP run in parallel")])
def test_parallel_blocks_are_refused_with_the_reason_by_patch_and_gflops(block, reason):
    model = tiny_vit(peaked=False, block_fn=block)
    for call in (lambda: ats.patch(model, ats.ATSConfig.multi_stage(0.7)), lambda: ats.gflops(model)):
        with pytest.raises(TypeError, match=f"block 0 is a {block.__name__}: .*{reason}"):
            call()


def test_gflops_refuses_a_hybrid_that_patch_refuses():
    with torch.device("meta"):
        model = timm.create_model("vit_small_r26_s32_224")
    for call in (lambda: ats.patch(model, ats.ATSConfig.multi_stage(0.7)), lambda: ats.gflops(model)):
        with pytest.raises(TypeError, match="convolutional stage"):
            call()


@pytest.mark.slow
def test_every_vit_like_timm_model_is_accepted_or_refused_with_a_reason():
    """Each model patches and counts, or both refuse it with TypeError/ValueError; no other exception."""
    names = vit_like_models()
    assert len(names) > 200
    outcomes, crashes = {}, []
    warnings.simplefilter("ignore")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        results = []
        for call in (patch_it, ats.gflops):
            try:
                call(model)
                results.append("accepted")
            except (TypeError, ValueError) as error:
                results.append(f"refused: {str(error).split(';')[0]}")
            except Exception as error:  # noqa: BLE001  what the sweep is for
                crashes.append(f"{name}: {type(error).__name__}: {error}")
        outcomes[name] = results
    assert not crashes, crashes
    inconsistent = [name for name, (patched, counted) in outcomes.items()
                    if (patched == "accepted") != (counted == "accepted")]
    assert not inconsistent, inconsistent
    assert sum(patched == "accepted" for patched, _ in outcomes.values()) > 200


#: transformers classes refused on purpose: config, its options for a tiny model, and a phrase of the reason.
HF_REFUSED = {
    "SwinModel": ("SwinConfig", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1],
                                     window_size=2), "attends only within its local window"),
    "PixtralVisionModel": ("PixtralVisionConfig", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, image_size=32, patch_size=4),
                           "block-diagonal mask"),
    "Aimv2Model": ("Aimv2Config", dict(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, image_size=32, patch_size=4),
                                       text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=32)), "patch its image tower"),
    "SamVisionModel": ("SamVisionConfig", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               image_size=32, patch_size=4, output_channels=8, mlp_dim=32,
                                               global_attn_indexes=[0]), "convolutional over the whole token grid"),
}


@pytest.mark.parametrize("name", list(HF_REFUSED))
def test_hugging_face_classes_ats_cannot_take_are_refused_with_the_reason(name):
    transformers = pytest.importorskip("transformers")
    config_class, options, reason = HF_REFUSED[name]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    model = getattr(transformers, name)(getattr(transformers, config_class)(**options))
    for call in (patch_it, ats.gflops):
        with pytest.raises(TypeError, match=f"ATS does not support .*{name}: .*{reason}"):
            call(model)
