"""A patched model still behaves like the model it came from, in every supported family."""
import io

import pytest
import torch
from conftest import contrasted_images, tiny_vit
from test_patch_hf import tiny_hf

import ats
from ats.patch import as_logits

CONFIG = ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True)
MODELS = {
    "timm ViT": tiny_vit,
    "timm ViT, average pooling": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "ViTForImageClassification": lambda: tiny_hf("ViTForImageClassification"),
    "DeiTForImageClassificationWithTeacher": lambda: tiny_hf("DeiTForImageClassificationWithTeacher"),
    "Dinov2WithRegistersForImageClassification": lambda: tiny_hf("Dinov2WithRegistersForImageClassification"),
}


def config_for(name: str) -> ats.ATSConfig:
    return ats.ATSConfig.multi_stage(0.87, first=1, depth=6, fuse=True, score="self_attention") \
        if "average" in name else CONFIG


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_save_and_load_keep_the_model_patched(name):
    model, config = MODELS[name](), config_for(name)
    ats.patch(model, config)
    images = contrasted_images()
    with torch.no_grad():
        before = as_logits(model(images))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model) and loaded._ats.config == config
    with torch.no_grad():
        assert torch.equal(as_logits(loaded(images)), before)
    ats.unpatch(loaded)
    assert type(loaded).__name__ == type(model).__name__.removeprefix("ATS")


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
