"""ATS on Hugging Face transformers models: ViT, DeiT (and its teacher head), DINOv2 (with registers), in the
layout of the installed transformers (5.18 on: ``attention.q_proj`` and ``mlp``; before: ``attention.attention.query``
and ``intermediate``; CI runs this file under both)."""
import sys

import pytest
import timm
import torch
import transformers
from conftest import assert_bad_input_is_refused, contrasted_images
from timm.models.vision_transformer import VisionTransformer

import ats
from ats.adapters.hf import HF, LAYOUTS, MIN_TRANSFORMERS, attention_of

TINY = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_labels=10)
#: The classes the installed transformers has (I-JEPA and ViT-MAE: test_patch_hf_images.py).
#: Dinov2Backbone needs a restore rule; tests/test_restore.py tests it.
CLASSES = [name for name in LAYOUTS if hasattr(transformers, name)
           and not name.startswith(("IJepa", "ViTMAE", "Dinov2Backbone"))]
CONFIG = ats.ATSConfig.multi_stage(0.87, first=1, depth=6)


def tiny_hf(name: str, attention: str = "sdpa", **overrides) -> torch.nn.Module:
    """A random-init 6-block model of class ``name`` on 32x32 images (64 patches), its query and key
    weights scaled up so that images keep different numbers of tokens."""
    family = name.split("For")[0].removesuffix("Model")
    options = dict(TINY, attn_implementation=attention, **overrides)
    if family.startswith("Dinov2"):
        options.update(mlp_ratio=2)
    else:
        options.update(intermediate_size=128)
    if family == "Dinov2WithRegisters":
        options.update(num_register_tokens=4)
    config = getattr(transformers, f"{family}Config")(**options)
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for layer in HF.blocks(model):
            attention_of(layer).q.weight.mul_(4)
            attention_of(layer).k.weight.mul_(4)
    return model


def primary(output) -> torch.Tensor:
    """What to compare between runs: the logits, or a base model's class-token features."""
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state[:, 0]


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_images_do_not_depend_on_their_batch_mates(name, attention):
    model = tiny_hf(name, attention)
    images = contrasted_images()
    ats.patch(model, CONFIG)
    with torch.no_grad():
        together = primary(model(images))
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([primary(model(image[None])) for image in images])
    assert (together - alone).abs().max() < 1e-4
    assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"
    assert (tokens[:, 0] == 64 + HF.num_prefix_tokens(model)).all()


@pytest.mark.parametrize("name", CLASSES)
def test_keeping_every_token_gives_the_unpatched_output(name):
    model = tiny_hf(name)
    images = contrasted_images()
    with torch.no_grad():
        before = primary(model(images))
        ats.patch(model, ats.ATSConfig(blocks={1: 1000, 3: 1000}, sampler="topk"))
        after = primary(model(images))
    assert (before - after).abs().max() < 1e-5


@pytest.mark.parametrize("name", CLASSES)
def test_unpatch_restores_the_original_forward_exactly(name):
    model = tiny_hf(name)
    original = type(model)
    images = contrasted_images()
    with torch.no_grad():
        before = primary(model(images))
        ats.patch(model, CONFIG)
        patched = primary(model(images))
        ats.unpatch(model)
        after = primary(model(images))
    assert type(model) is original and not hasattr(model, "_ats")
    assert torch.equal(before, after) and not torch.allclose(before, patched)


@pytest.mark.parametrize("name", CLASSES)
def test_gradients_are_finite_in_train_mode(name):
    model = tiny_hf(name, drop_path_rate=0.1) if name.startswith("Dinov2") else tiny_hf(name)
    model.train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True))
    primary(model(contrasted_images())).logsumexp(-1).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None and torch.isfinite(grad).all() for name, grad in grads.items()
               if "mask_token" not in name and "pooler" not in name and "distillation_classifier" not in name)
    assert all(parameter.grad.abs().sum() > 0 for parameter in HF.blocks(model)[-1].parameters())


@pytest.mark.parametrize("name", CLASSES)
def test_bad_input_gets_a_clear_error(name):
    assert_bad_input_is_refused(tiny_hf(name), 6, CONFIG, contrasted_images(2),
                                [(2, 3, 30, 32), (2, 1, 32, 32), (3, 32, 32)], 64)


def test_transformers_older_than_the_adapters_support_is_refused(monkeypatch):
    model = tiny_hf("ViTForImageClassification")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.45.2")  # the module ats imports
    with pytest.raises(TypeError, match=f"transformers 4.45.2 is older.*'transformers>={MIN_TRANSFORMERS}'"):
        ats.patch(model, CONFIG)


def hf_mlp(layer: torch.nn.Module) -> tuple:
    """A transformers ViT layer's two MLP linears, in either layout."""
    return (layer.mlp.fc1, layer.mlp.fc2) if hasattr(layer, "mlp") else (layer.intermediate.dense, layer.output.dense)


def timm_twin(img_size: int = 56) -> tuple:
    """A timm ViT and a transformers ViTForImageClassification with one random state dict (14x14 = 196
    patches + 1 class token at 56x56: the DeiT-S token geometry), copied module by module."""
    torch.manual_seed(0)
    timm_model = VisionTransformer(img_size=img_size, patch_size=4, embed_dim=64, depth=6, num_heads=4,
                                   num_classes=10).eval()
    with torch.no_grad():
        for block in timm_model.blocks:
            block.attn.qkv.weight[:128].mul_(4)
    config = transformers.ViTConfig(image_size=img_size, patch_size=4, hidden_size=64, num_hidden_layers=6,
                                    num_attention_heads=4, intermediate_size=256, layer_norm_eps=1e-6, num_labels=10)
    hf_model = transformers.ViTForImageClassification(config).eval()
    embeddings = hf_model.vit.embeddings
    same = [(timm_model.patch_embed.proj, embeddings.patch_embeddings.projection),
            (timm_model.norm, hf_model.vit.layernorm), (timm_model.head, hf_model.classifier)]
    with torch.no_grad():
        embeddings.cls_token.copy_(timm_model.cls_token)
        embeddings.position_embeddings.copy_(timm_model.pos_embed)
        for block, layer in zip(timm_model.blocks, HF.blocks(hf_model)):
            attn = attention_of(layer)
            same += [(block.norm1, layer.layernorm_before), (block.norm2, layer.layernorm_after),
                     (block.attn.proj, attn.proj), *zip((block.mlp.fc1, block.mlp.fc2), hf_mlp(layer))]
            for linear, weight, bias in zip((attn.q, attn.k, attn.v), block.attn.qkv.weight.chunk(3),
                                            block.attn.qkv.bias.chunk(3)):
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
        for source, target in same:
            target.load_state_dict(source.state_dict())
    assert sum(map(torch.numel, hf_model.parameters())) == sum(map(torch.numel, timm_model.parameters()))
    return timm_model, hf_model


@pytest.mark.parametrize("config", [None, ats.ATSConfig.multi_stage(1.0, depth=6),
                                    ats.ATSConfig.single_stage(k=108, block=3, fuse=True, distinct=0.5)])
def test_a_timm_and_a_transformers_vit_keep_the_same_tokens(config):
    timm_model, hf_model = timm_twin()
    images = contrasted_images(8, 56)
    if config is not None:
        ats.patch(timm_model, config)
        ats.patch(hf_model, config)
    with torch.no_grad():
        timm_logits, hf_logits = timm_model(images), hf_model(images).logits
    assert (timm_logits - hf_logits).abs().max() < 1e-4
    if config is not None:
        timm_stats, hf_stats = ats.last_stats(timm_model), ats.last_stats(hf_model)
        assert torch.equal(timm_stats.tokens, hf_stats.tokens)
        assert all(torch.equal(timm_stats.kept[block], hf_stats.kept[block]) for block in config.budgets)
        assert torch.allclose(timm_stats.gflops, hf_stats.gflops)
        assert timm_stats.tokens[:, -1].float().mean() < 197
    assert ats.gflops(timm_model) == pytest.approx(ats.gflops(hf_model))


def test_deit_with_teacher_keeps_both_prefix_tokens_and_averages_its_heads():
    model = tiny_hf("DeiTForImageClassificationWithTeacher")
    ats.patch(model, ats.ATSConfig.single_stage(k=5, block=1))
    with torch.no_grad():
        output = model(contrasted_images(4))
    stats = ats.last_stats(model)
    assert (stats.tokens[:, 0] == 66).all() and (stats.tokens[:, 2] <= 7).all()
    assert torch.allclose(output.logits, (output.cls_logits + output.distillation_logits) / 2)
    assert (stats.kept[1] < 64).all()


@pytest.mark.parametrize("name", [name for name in CLASSES if name == "Dinov2WithRegistersForImageClassification"])
def test_dinov2_registers_are_prefix_tokens_and_the_mean_skips_padding(name):  # not in transformers 4.46
    model = tiny_hf(name)
    ats.patch(model, CONFIG)
    ats.patch(model.dinov2_with_registers, CONFIG)  # its base model, patched on its own for the features
    images = contrasted_images()
    with torch.no_grad():
        output = model(images)
        features = model.dinov2_with_registers(images).last_hidden_state
    stats = ats.last_stats(model)
    assert stats.shape.num_prefix_tokens == 5 and (stats.tokens[:, 0] == 69).all()
    lengths = stats.tokens_out[:, -1]
    padding = torch.arange(features.shape[1]) >= lengths[:, None]
    assert padding.any() and (features[padding] == 0).all()
    mean = torch.stack([features[i, 5:lengths[i]].mean(0) for i in range(len(images))])
    expected = model.classifier(torch.cat([features[:, 0], mean], dim=1))
    assert (output.logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification"])
def test_other_image_sizes_interpolate_the_position_embedding(name):
    model = tiny_hf(name)
    ats.patch(model, CONFIG)
    images = contrasted_images(4, 48)
    interpolate = dict(interpolate_pos_encoding=True) if name.startswith("ViT") else {}
    with torch.no_grad():
        together = model(images, **interpolate).logits
        alone = torch.cat([model(image[None], **interpolate).logits for image in images])
    stats = ats.last_stats(model)
    assert stats.grid_size == (12, 12) and (stats.tokens[:, 0] == 145).all()
    assert (together - alone).abs().max() < 1e-4
    assert ats.gflops(model, (3, 48, 48)) > ats.gflops(model)


def test_save_pretrained_round_trips_after_unpatch(tmp_path):
    model = tiny_hf("DeiTForImageClassificationWithTeacher")
    images = contrasted_images(4)
    ats.patch(model, CONFIG)
    ats.unpatch(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(images).logits, loaded(images).logits)
    assert set(model.state_dict()) == set(loaded.state_dict())


def test_unsupported_families_are_named():
    supported = r"supports timm VisionTransformer.*Hugging Face ViTModel"
    with pytest.raises(TypeError, match=supported):
        ats.patch(timm.models.mlp_mixer.MlpMixer(img_size=32, patch_size=4, embed_dim=64, num_blocks=2), CONFIG)
    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(depths=[1], hidden_sizes=[8], num_stages=1))
    with pytest.raises(TypeError, match=supported):
        ats.patch(convnext, CONFIG)
    with pytest.raises(TypeError, match="global_pool='max_and_min' is not supported"):
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
        model.global_pool = "max_and_min"
        ats.patch(model, ats.ATSConfig.single_stage(k=10, block=1))


def test_other_attention_implementations_are_refused():
    model = tiny_hf("ViTForImageClassification")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(TypeError, match="attn_implementation='sdpa'"):
        ats.patch(model, CONFIG)
