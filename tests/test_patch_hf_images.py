"""ATS on more Hugging Face image models: CLIP and SigLIP towers and classifiers, DINOv3 (rotary embeddings),
AIMv2, BEiT and Data2Vec-Vision (relative position biases), I-JEPA (no class token), ViT-MAE (mask_ratio 0); each
class the installed transformers has (CI runs this file under transformers 4.x and 5.x)."""
import copy

import pytest
import torch
import transformers
from conftest import (
    assert_bad_input_is_refused,
    assert_gflops_match_the_counter,
    assert_pickles_patched,
    contrasted_images,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters import family_of
from ats.adapters.hf import attention_of

VISION = dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4)
BIASES = dict(use_relative_position_bias=True, use_shared_relative_position_bias=True)


def config(name: str, **fixed):
    """A tiny config of transformers' config class ``name`` (64 patches of 4x4 on 32x32 images), ``fixed``
    and the overrides of the call on top."""
    return lambda **overrides: getattr(transformers, name)(**{**VISION, **fixed, **overrides})


def joint_config(name: str, **fixed):
    """A tiny config of the joint (image and text) config class ``name``: its vision config as ``config``'s, 10
    labels."""
    return lambda attn_implementation, **overrides: getattr(transformers, name)(
        vision_config={**VISION, **fixed, **overrides, "attn_implementation": attn_implementation}, num_labels=10,
        attn_implementation=attn_implementation)


#: Each class's tiny random-init config, from its config class.
CONFIGS = {
    "CLIPVisionModel": config("CLIPVisionConfig"),
    "CLIPVisionModelWithProjection": config("CLIPVisionConfig", projection_dim=16),
    "CLIPForImageClassification": joint_config("CLIPConfig"),
    "SiglipVisionModel": config("SiglipVisionConfig"),
    "SiglipForImageClassification": joint_config("SiglipConfig", vision_use_head=False),
    "DINOv3ViTModel": config("DINOv3ViTConfig", num_register_tokens=2, layerscale_value=0.5),
    "Aimv2VisionModel": config("Aimv2VisionConfig", qkv_bias=True),
    "BeitModel": config("BeitConfig", **BIASES, use_mean_pooling=False),
    "BeitForImageClassification": config("BeitConfig", **BIASES, num_labels=10),
    "Data2VecVisionModel": config("Data2VecVisionConfig", **BIASES),
    "Data2VecVisionForImageClassification": config("Data2VecVisionConfig", use_relative_position_bias=True,
                                                   num_labels=10),
    "IJepaModel": config("IJepaConfig"),
    "IJepaForImageClassification": config("IJepaConfig", num_labels=10),
    "ViTMAEModel": config("ViTMAEConfig", mask_ratio=0.0),
}
CLASSES = [name for name in CONFIGS if hasattr(transformers, name)]


def available(*names: str) -> list:
    """Those of ``names`` the installed transformers has (4.46 has no DINOv3 or I-JEPA)."""
    return [name for name in names if name in CLASSES]
CONFIG = ats.ATSConfig.multi_stage(0.8, first=1, depth=4)
FUSE_DISTINCT = ats.ATSConfig.multi_stage(0.5, first=1, depth=4, fuse=True, distinct=0.5)


def tiny(name: str, attention: str = "sdpa", peak: float = 4.0, **overrides) -> nn.Module:
    """A random-init 4-block model of class ``name``, its query and key weights scaled by ``peak`` so that images
    keep different numbers of tokens, its relative position bias tables drawn at random (they start at zero)."""
    if not getattr(transformers, name)._supports_sdpa:  # BEiT and Data2Vec-Vision before transformers 4.47
        attention = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, name)(CONFIGS[name](attn_implementation=attention, **overrides)).eval()
    with torch.no_grad():
        for layer in family_of(model).blocks(model):
            attn = attention_of(layer)
            attn.q.weight.mul_(peak)
            attn.k.weight.mul_(peak)
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("relative_position_bias_table"):
                parameter.normal_()
    return model


def unpatched_kwargs(name: str, count: int) -> dict:
    """ViT-MAE shuffles its tokens even at mask_ratio 0; this noise keeps them in order, as a patched one does."""
    return dict(noise=torch.arange(64.0).expand(count, 64)) if name == "ViTMAEModel" else {}


def primary(output) -> torch.Tensor:
    """What to compare between runs: the logits, image embeddings or pooled output, else the last hidden state."""
    for key in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return value


def valid_tokens(model: nn.Module, output) -> list:
    """Each image's valid tokens [n, C] of the last hidden state."""
    counts = ats.last_stats(model).tokens_out[:, -1].tolist()
    return [output.last_hidden_state[image, :count] for image, count in enumerate(counts)]


def per_image(model: nn.Module, output) -> list:
    """Each image's primary output, its valid tokens only where it is the last hidden state."""
    value = primary(output)
    return list(value) if value.ndim == 2 else valid_tokens(model, output)


@pytest.mark.parametrize("name", CLASSES)
def test_keeping_every_token_gives_the_unpatched_output(name):
    model, images = tiny(name), contrasted_images()
    with torch.no_grad():
        before = primary(model(images, **unpatched_kwargs(name, len(images))))
        for config in (ats.KeepAllConfig(), ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk")):
            ats.patch(model, config)
            assert (primary(model(images)) - before).abs().max() < 1e-5, config.describe()


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("config", [CONFIG, FUSE_DISTINCT], ids=["ats", "fuse-distinct"])
def test_images_do_not_depend_on_their_batch_mates(name, config):
    model, images = tiny(name), contrasted_images()
    ats.patch(model, config)
    with torch.no_grad():
        together = per_image(model, model(images))
        tokens = ats.last_stats(model).tokens
        alone = [per_image(model, model(image[None]))[0] for image in images]
    assert max((a - b).abs().max() for a, b in zip(together, alone)) < 1e-4
    assert (tokens[:, 0] == 64 + family_of(model).num_prefix_tokens(model)).all()
    if config is FUSE_DISTINCT or family_of(model).shape(model).has_class_token:  # random weights: flat attention
        assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between images"


@pytest.mark.parametrize("name", CLASSES)
def test_unpatch_restores_the_original_forward_exactly(name):
    model, images = tiny(name), contrasted_images()
    original, kwargs = type(model), unpatched_kwargs(name, len(images))
    with torch.no_grad():
        before = primary(model(images, **kwargs))
        ats.patch(model, FUSE_DISTINCT)
        patched = per_image(model, model(images))
        ats.unpatch(model)
        after = primary(model(images, **kwargs))
    assert type(model) is original and not hasattr(model, "_ats")
    assert torch.equal(before, after)
    assert any(a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(before, patched))


@pytest.mark.parametrize("name", CLASSES)
def test_flops_match_pytorchs_flop_counter(name):
    """The analytic count of the unpatched model, and of a patched one that keeps every token, equals
    FlopCounterMode (2 per multiply-add) on the unpatched model with eager attention; a patched one costs less
    per image (rotations and position biases are elementwise, counted by neither). A head's own
    scaled_dot_product_attention (AIMv2's pool) runs its math kernel, which the counter sees."""
    model, image = tiny(name, "eager"), contrasted_images(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(image, **unpatched_kwargs(name, 1))
    assert_gflops_match_the_counter(model, counter.get_total_flops() / 2, contrasted_images(2), contrasted_images(),
                                    FUSE_DISTINCT)


@pytest.mark.parametrize("name", CLASSES)
def test_gradients_are_finite_in_train_mode(name):
    drop_path = dict(drop_path_rate=0.1) if name.startswith(("DINOv3", "Beit", "Data2Vec")) else {}
    model = tiny(name, **drop_path).train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, fuse=True))
    primary(model(contrasted_images())).logsumexp(-1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), parameter_name
    for layer in family_of(model).blocks(model):
        assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in layer.parameters()
                   if parameter.requires_grad)


@pytest.mark.parametrize("name", CLASSES)
def test_torch_save_and_load_keep_the_model_patched(name):
    loaded = assert_pickles_patched(tiny(name), CONFIG, contrasted_images(), primary)
    assert type(ats.unpatch(loaded)).__name__ == name


@pytest.mark.parametrize("name", CLASSES)
def test_bad_input_gets_a_clear_error(name):
    assert_bad_input_is_refused(tiny(name), 4, CONFIG, contrasted_images(2),
                                [(2, 3, 30, 32), (2, 1, 32, 32), (3, 32, 32)], 64)


@pytest.mark.parametrize("name", available("SiglipVisionModel", "SiglipForImageClassification",
                                            "IJepaForImageClassification", "Aimv2VisionModel"))
def test_without_a_class_token_tokens_are_scored_by_self_attention(name):
    model, images = tiny(name), contrasted_images()
    results = []
    for score in ("auto", "self_attention"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, score=score))
        with torch.no_grad():
            results.append(primary(model(images)))
    assert torch.equal(*results)
    with pytest.raises(ValueError, match="no class token"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.8, first=1, depth=4, score="cls"))


@pytest.mark.parametrize("name", available("SiglipVisionModel", "Aimv2VisionModel"))
def test_an_attention_pool_attends_over_valid_tokens_in_proportion_to_their_size(name):
    """With fused tokens, the pool over an image's valid tokens with their log sizes added to the logits is the
    model's own pool over those tokens, each repeated as many times as the patches it holds."""
    model, images = tiny(name), contrasted_images()
    ats.patch(model, FUSE_DISTINCT)
    with torch.no_grad():
        output = model(images)
        sizes = model._ats.pool_weights
        lengths = ats.last_stats(model).tokens_out[:, -1]
        assert (lengths < output.last_hidden_state.shape[1]).any() and (sizes > 1).any()
        for image in range(len(images)):
            valid = output.last_hidden_state[image, :lengths[image]]
            repeated = valid.repeat_interleave(sizes[image, :lengths[image]].long(), dim=0)
            assert len(repeated) == 64
            head = family_of(model).base(model).head
            assert (head(repeated[None])[0] - output.pooler_output[image]).abs().max() < 1e-5


def tower_of(model: nn.Module, name: str) -> nn.Module:
    """A vision tower of class ``name`` with ``model``'s tower weights (its own tower is no model class of its own
    before transformers 5.x), to read the tokens the model's head gets."""
    tower = getattr(transformers, name)(getattr(model.config, "vision_config", model.config)).eval()
    family_of(tower).base(tower).load_state_dict(family_of(model).base(model).state_dict())
    return tower


def run_with_its_tower(name: str, tower_name: str, config, images: torch.Tensor) -> tuple:
    """A tiny ``name`` and its tower as a ``tower_name`` (``tower_of``), both patched with ``config``, and their
    outputs on ``images``."""
    model = tiny(name)
    tower = tower_of(model, tower_name)
    ats.patch(model, config)
    ats.patch(tower, config)
    with torch.no_grad():
        return model, tower, model(images), tower(images)


def test_the_siglip_classifier_averages_valid_tokens_in_proportion_to_their_size():
    """With fused tokens, the logits are the classifier on the mean of each image's valid tokens, each repeated
    as many times as the patches it holds: the tokens of a SiglipVisionModel with the classifier's tower weights,
    patched alike."""
    images = contrasted_images()
    model, tower, output, tower_output = run_with_its_tower("SiglipForImageClassification", "SiglipVisionModel",
                                                            FUSE_DISTINCT, images)
    logits, tokens = output.logits, tower_output.last_hidden_state
    sizes, lengths = tower._ats.pool_weights, ats.last_stats(tower).tokens_out[:, -1]
    assert (lengths < tokens.shape[1]).any() and (sizes > 1).any()
    assert torch.equal(lengths, ats.last_stats(model).tokens_out[:, -1])
    for image in range(len(images)):
        repeated = tokens[image, :lengths[image]].repeat_interleave(sizes[image, :lengths[image]].long(), dim=0)
        assert len(repeated) == 64
        assert (model.classifier(repeated.mean(0)) - logits[image]).abs().max() < 1e-5


def test_a_siglip_classifier_with_an_attention_pool_does_not_run_it():
    """Checkpoints of SiglipForImageClassification keep the tower's attention pool, whose output the unpatched
    forward computes and discards: a patched one does not run it, and counts the FLOPs of the rest (the counter's
    total less the pool's)."""
    model, image = tiny("SiglipForImageClassification", "eager", vision_use_head=True), contrasted_images(1)
    head = family_of(model).base(model).head
    with torch.no_grad():
        before = model(contrasted_images()).logits
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    with FlopCounterMode(display=False) as head_counter, torch.no_grad():
        head(torch.randn(1, 64, 64))
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    ats.patch(model, ats.KeepAllConfig())
    with torch.no_grad():
        assert (model(contrasted_images()).logits - before).abs().max() < 1e-5
    assert not calls
    expected = (counter.get_total_flops() - head_counter.get_total_flops()) / 2
    assert ats.gflops(model) * 1e9 == pytest.approx(expected, rel=1e-12)


def test_clip_pools_its_class_token_through_the_post_layernorm_and_returns_unnormed_tokens():
    model, _, output, tower_output = run_with_its_tower("CLIPVisionModelWithProjection", "CLIPVisionModel", CONFIG,
                                                        contrasted_images())
    embeds, tokens = output.image_embeds, tower_output.last_hidden_state
    post_layernorm = family_of(model).base(model).post_layernorm
    assert torch.allclose(embeds, model.visual_projection(post_layernorm(tokens[:, 0])), atol=1e-6)
    assert (tokens[:, 0].std(-1) - 1).abs().max() > 0.1, "CLIP's last hidden state is not layer-normed"


def kept_positions(model: nn.Module, index: int, image: int) -> torch.Tensor:
    kept = ats.last_stats(model).kept[index][image]
    return kept[kept >= 0]


def kept_rows(positions: torch.Tensor, kept: torch.Tensor, prefix: int) -> torch.Tensor:
    """The rows [prefix + n'] of a sequence of prefix tokens and patches at ``positions`` that hold the prefix and
    the patches at ``kept``."""
    return torch.cat((torch.arange(prefix), prefix + torch.searchsorted(positions, kept)))


def dinov3_reference(model: nn.Module, image: torch.Tensor, kept: dict, follow: bool = True) -> torch.Tensor:
    """One image's final tokens [prefix + n', C] from the model's own layers: an ATS block is the layer on every
    token, of whose rows the prefix tokens and the kept patch tokens go on (``kept``: block -> kept patch
    positions); every layer rotates each patch token by the model's rotary embedding at its patch position
    (``follow=False``: at the first positions, as if the rotation did not follow the tokens)."""
    prefix, positions = 3, torch.arange(64)
    x = model.embeddings(image[None])
    cos, sin = model.rope_embeddings(image[None])
    for index, layer in enumerate(family_of(model).blocks(model)):
        at = positions if follow else torch.arange(len(positions))
        x = layer(x, position_embeddings=(cos[at], sin[at]))
        if index in kept:
            x = x[:, kept_rows(positions, kept[index], prefix)]
            positions = kept[index]
    return model.norm(x)[0]


@pytest.mark.parametrize("name", available("DINOv3ViTModel"))
@pytest.mark.parametrize("config", [ats.ATSConfig.single_stage(k=24, block=1, sampler="topk"), CONFIG])
def test_each_kept_dinov3_token_keeps_its_own_rotation(name, config):
    """Every image keeps other positions; each kept token's output is that of the model's own layers run on the
    image's kept tokens alone, each rotated by the model's rope at the position it came from (layer scales of 1
    and sharper attention than the other tests, so that rotations at the wrong positions would show)."""
    model, images = tiny(name, "eager", peak=10.0, layerscale_value=1.0), contrasted_images(4)
    ats.patch(model, config)
    with torch.no_grad():
        tokens = valid_tokens(model, model(images))
        first = list(config.budgets)[0]
        assert not torch.equal(kept_positions(model, first, 0), kept_positions(model, first, 1))
        kept = [{index: kept_positions(model, index, image) for index in config.budgets} for image in range(4)]
        plain = ats.unpatch(copy.deepcopy(model))
        for image in range(len(images)):
            assert (dinov3_reference(plain, images[image], kept[image]) - tokens[image]).abs().max() < 1e-4
        unfollowed = dinov3_reference(plain, images[0], kept[0], follow=False)
    assert (unfollowed - tokens[0]).abs().max() > 1e-2, "the test must notice rotations at the wrong positions"


@pytest.mark.parametrize("name, options", [(name, {}) for name in available("DINOv3ViTModel")] + [
    ("BeitForImageClassification", {}), ("CLIPVisionModel", dict(interpolate_pos_encoding=True))] + [
    (name, dict(is_native=True)) for name in available("Aimv2VisionModel")])
def test_other_image_sizes(name, options):
    """Rotary embeddings, relative position biases and AIMv2's native sine-cosine embedding are made for the input's
    grid; CLIP's position embedding is resampled with interpolate_pos_encoding."""
    overrides = dict(is_native=options.pop("is_native")) if "is_native" in options else {}
    model, images = tiny(name, **overrides), contrasted_images(4, 48)
    with torch.no_grad():
        before = primary(model(images, **options))
        ats.patch(model, ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk"))
        assert (primary(model(images, **options)) - before).abs().max() < 1e-5
        ats.patch(model, CONFIG)
        together = primary(model(images, **options))
        alone = torch.cat([primary(model(image[None], **options)) for image in images])
    stats = ats.last_stats(model)
    assert stats.grid_size == (12, 12) and (stats.tokens[:, 0] == 144 + family_of(model).num_prefix_tokens(model)).all()
    assert (together - alone).abs().max() < 1e-4
    assert ats.gflops(model, (3, 48, 48)) > ats.gflops(model)


class Gathered(nn.Module):
    """Stands in for a relative position bias module: its bias [1, h, N, N] at the rows and columns ``at``."""

    def __init__(self, bias: torch.Tensor, at: torch.Tensor):
        super().__init__()
        self.bias, self.at = bias, at

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.bias[:, :, self.at][:, :, :, self.at]


def beit_reference(model: nn.Module, image: torch.Tensor, kept: dict, follow: bool = True) -> torch.Tensor:
    """One image's final tokens [1 + n', C] from the model's own layers: an ATS block is the layer on every
    token, of whose rows the class token and the kept patch tokens go on; every layer adds its own bias and the
    shared one at the rows and columns of the tokens' positions, the class token's included (``follow=False``:
    at the first positions). BEiT keeps its own bias module on the layer, Data2Vec-Vision on its attention."""
    base = model.base_model
    resolution, window, positions = (32, 32), (8, 8), torch.arange(64)
    x = base.embeddings(image[None])
    x = x[0] if isinstance(x, tuple) else x
    beit = hasattr(base, "layers")
    shared_module = base.shared_position_bias if beit else getattr(base.encoder, "relative_position_bias", None)
    shared = None if shared_module is None else shared_module(window, dim_size=65)
    for index, layer in enumerate(base.layers if beit else base.encoder.layer):
        tokens = torch.cat((torch.zeros(1, dtype=torch.long), 1 + positions))
        at = tokens if follow else torch.arange(len(tokens))
        owner = layer if beit else layer.attention.attention
        if owner.relative_position_bias is not None:
            owner.relative_position_bias = Gathered(owner.relative_position_bias(window, dim_size=65), at)
        gathered = None if shared is None else shared[:, :, at][:, :, :, at]
        x = layer(x, resolution=resolution, **dict(attention_mask=gathered) if beit else dict(
            relative_position_bias=gathered))
        x = x[0] if isinstance(x, tuple) else x
        if index in kept:
            x = x[:, kept_rows(positions, kept[index], 1)]
            positions = kept[index]
    return base.layernorm(x)[0]


@pytest.mark.parametrize("name", ["BeitForImageClassification", "Data2VecVisionForImageClassification"])
@pytest.mark.parametrize("config", [ats.ATSConfig.single_stage(k=24, block=1, sampler="topk"), CONFIG])
def test_each_kept_token_keeps_its_own_relative_position_bias(name, config):
    """Every image keeps other positions; each kept token's output is that of the model's own layers run on the
    image's kept tokens alone with the bias rows and columns of the positions they came from."""
    model, images = tiny(name, "eager", peak=10.0, layer_scale_init_value=1.0), contrasted_images(4)
    base = model.base_model
    ats.patch(model, config)
    ats.patch(base, config)  # the base model, patched on its own for its tokens
    with torch.no_grad():
        output = base(images)
        tokens = valid_tokens(base, output)
        first = list(config.budgets)[0]
        assert not torch.equal(kept_positions(base, first, 0), kept_positions(base, first, 1))
        plain = ats.unpatch(copy.deepcopy(base))
        for image in range(len(images)):
            kept = {index: kept_positions(base, index, image) for index in config.budgets}
            assert (beit_reference(copy.deepcopy(plain), images[image], kept) - tokens[image]).abs().max() < 1e-4
        kept = {index: kept_positions(base, index, 0) for index in config.budgets}
        unfollowed = beit_reference(copy.deepcopy(plain), images[0], kept, follow=False)
        assert (unfollowed - tokens[0]).abs().max() > 1e-2, "the test must notice biases at the wrong positions"
        assert torch.allclose(model(images).logits, model.classifier(output.pooler_output), atol=1e-5)


@pytest.mark.parametrize("name", available("IJepaModel"))
def test_an_ijepa_pooler_is_refused(name):
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="add_pooling_layer=False"):
        ats.patch(transformers.IJepaModel(CONFIGS[name](attn_implementation="sdpa"), add_pooling_layer=True), CONFIG)


def test_vit_mae_random_masking_is_refused_and_mask_ratio_0_returns_an_empty_mask():
    with pytest.raises(TypeError, match="mask_ratio=0.0"):
        ats.patch(tiny("ViTMAEModel", mask_ratio=0.75), CONFIG)
    model = ats.patch(tiny("ViTMAEModel"), CONFIG)
    with torch.no_grad():
        output = model(contrasted_images(2))
    assert (output.mask == 0).all() and torch.equal(output.ids_restore[1], torch.arange(64))
    with pytest.raises(TypeError, match="does not take noise"):
        model(contrasted_images(2), noise=torch.rand(2, 64))


@pytest.mark.skipif("Aimv2VisionModel" not in CLASSES, reason="this transformers has no AIMv2")
def test_an_aimv2_model_with_a_learnt_position_embedding_takes_only_its_own_size():
    model = ats.patch(tiny("Aimv2VisionModel"), CONFIG)
    with pytest.raises(ValueError, match=r"pixel_values of shape \[B, 3, 32, 32\]"):
        model(contrasted_images(2, 48))
    with pytest.raises(ValueError, match="does not resample"):
        model(contrasted_images(2), interpolate_pos_encoding=True)
