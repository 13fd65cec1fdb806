"""ATS on transformers' SigLIP 2 (NaFlex): each image a patch sequence of its own length, padding after it
(CI runs this file under transformers 4.x and 5.x)."""
import io

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters import data_config, family_of
from ats.adapters.hf import attention_of

pytestmark = pytest.mark.skipif(not hasattr(transformers, "Siglip2VisionModel"),
                                reason="this transformers has no SigLIP 2")

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_patches=64,
              patch_size=4)
#: Each image's patch grid: a full one, a wide one and a small one (the rest of the 64 patches padding).
SHAPES = torch.tensor([[8, 8], [6, 9], [5, 7], [4, 4]])
CONFIG = ats.ATSConfig.multi_stage(0.7, first=1, depth=4)
KEEP_ALL = ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk")


def tiny(name: str = "Siglip2VisionModel", attention: str = "sdpa", peak: float = 4.0) -> torch.nn.Module:
    """A random-init 4-block model, its query and key weights scaled by ``peak`` so that images keep different
    numbers of tokens."""
    torch.manual_seed(0)
    if name == "Siglip2VisionModel":
        config = transformers.Siglip2VisionConfig(**VISION, attn_implementation=attention)
    else:
        config = transformers.Siglip2Config(vision_config={**VISION, "attn_implementation": attention},
                                            num_labels=10, attn_implementation=attention)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for layer in family_of(model).blocks(model):
            attention_of(layer).q.weight.mul_(peak)
            attention_of(layer).k.weight.mul_(peak)
    return model


def inputs(shapes: torch.Tensor = SHAPES, patches: int = 64) -> dict:
    """What the image processor gives for images of these patch grids: pixel_values [B, N, 3*4*4] (random, with a
    contrast growing with the index; zeros on padding), pixel_attention_mask and spatial_shapes."""
    generator = torch.Generator().manual_seed(1)
    lengths = shapes.prod(1)
    mask = (torch.arange(patches) < lengths[:, None]).long()
    scale = torch.linspace(0.5, 3.0, len(shapes))[:, None, None]
    pixels = torch.randn(len(shapes), patches, 48, generator=generator) * scale * mask[..., None]
    return dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)


def alone(given: dict, image: int) -> dict:
    """Image ``image`` of ``given`` by itself, without its padding."""
    length = int(given["spatial_shapes"][image].prod())
    return dict(pixel_values=given["pixel_values"][image:image + 1, :length],
                pixel_attention_mask=given["pixel_attention_mask"][image:image + 1, :length],
                spatial_shapes=given["spatial_shapes"][image:image + 1])


def primary(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.pooler_output


@pytest.mark.parametrize("name", ["Siglip2VisionModel", "Siglip2ForImageClassification"])
def test_keep_all_is_exact_and_a_batch_equals_its_images_alone(name):
    model, given = tiny(name), inputs()
    valid = given["pixel_attention_mask"].bool()
    with torch.no_grad():
        before = model(**given)
        ats.patch(model, KEEP_ALL)
        kept_all = model(**given)
        assert (primary(kept_all) - primary(before)).abs().max() < 1e-5
        if name == "Siglip2VisionModel":
            difference = (kept_all.last_hidden_state - before.last_hidden_state)[valid]
            assert difference.abs().max() < 1e-5
            assert (kept_all.last_hidden_state[~valid] == 0).all()
        ats.patch(model, CONFIG)
        together = primary(model(**given))
        tokens = ats.last_stats(model).tokens
        separately = torch.cat([primary(model(**alone(given, image))) for image in range(len(SHAPES))])
    assert (together - primary(before)).abs().max() > 1e-3
    assert (together - separately).abs().max() < 1e-5
    assert tokens[:, 0].tolist() == SHAPES.prod(1).tolist(), "each image enters with its own patches"
    assert len(set(tokens[:, -1].tolist())) > 1


def test_a_budget_is_a_share_of_the_images_own_patches_and_padding_is_never_kept():
    model, given = tiny(), inputs()
    ats.patch(model, ats.ATSConfig({1: 0.5}, sampler="topk"))
    with torch.no_grad():
        model(**given)
    stats = ats.last_stats(model)
    lengths = SHAPES.prod(1)
    assert stats.tokens[:, 2].tolist() == (lengths // 2).tolist()
    kept = stats.kept[1]
    assert ((kept < lengths[:, None]) | (kept == -1)).all()


def test_static_mode_keeps_the_same_tokens_with_padding():
    model, given = tiny(), inputs()
    with torch.no_grad():
        adaptive = ats.patch(model, CONFIG)(**given).pooler_output
        static = ats.patch(model, CONFIG, static=True)(**given).pooler_output
    assert (static - adaptive).abs().max() < 1e-5


def test_flops_match_pytorchs_flop_counter_and_each_image_costs_its_own_tokens():
    model, given = tiny(attention="eager"), inputs()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**alone(given, 0))
    assert ats.gflops(model) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-12)
    assert ats.gflops(model, (100, 48)) > ats.gflops(model)
    ats.patch(model, ats.KeepAllConfig())
    with torch.no_grad():
        model(**given)
    gflops = ats.last_stats(model).gflops
    assert gflops[0] == pytest.approx(ats.gflops(ats.unpatch(model)), rel=1e-6)
    assert (gflops[1:] < gflops[0]).all() and gflops[2] < gflops[1]


def test_unpatch_gradients_and_pickling():
    model, given = tiny(), inputs()
    with torch.no_grad():
        before = model(**given).pooler_output
    ats.patch(model, CONFIG)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(**given).pooler_output, model(**given).pooler_output)
    model.train()
    model(**given).pooler_output.square().sum().backward()
    grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    ats.unpatch(model.eval())
    with torch.no_grad():
        assert torch.equal(model(**given).pooler_output, before)


def test_bad_inputs_are_refused_with_the_reason():
    model, given = ats.patch(tiny(), CONFIG), inputs()
    with pytest.raises(ValueError, match="pass the image processor's pixel_values"):
        model(given["pixel_values"])
    with pytest.raises(ValueError, match=r"pixel_values of shape \[B, N, 48\]"):
        model(torch.zeros(2, 3, 32, 32), pixel_attention_mask=given["pixel_attention_mask"],
              spatial_shapes=SHAPES)
    shuffled = dict(given, pixel_attention_mask=given["pixel_attention_mask"].flip(1))
    with pytest.raises(ValueError, match="patches must come first"):
        model(**shuffled)
    with pytest.raises(ValueError, match="fill its spatial_shapes grid"):
        model(**dict(given, spatial_shapes=SHAPES + 1))
    with pytest.raises(ValueError, match="drop interpolate_pos_encoding"):
        model(**given, interpolate_pos_encoding=True)
    with pytest.raises(TypeError, match="run the patched model from Python"):
        data_config(model)


def test_restore_gives_every_position_back_and_zeros_on_padding():
    model, given = tiny(), inputs()
    valid = given["pixel_attention_mask"].bool()
    with torch.no_grad():
        before = model(**given, output_hidden_states=True)
        ats.patch(model, ats.ATSConfig({1: 1000, 3: 1000}, sampler="topk", restore="mix"))
        kept_all = model(**given, output_hidden_states=True)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, restore="mix"))
        restored = model(**given, output_hidden_states=True)
    for after, unpatched in zip((kept_all.last_hidden_state, *kept_all.hidden_states),
                                (before.last_hidden_state, *before.hidden_states)):
        assert (after - unpatched)[valid].abs().max() < 1e-5
    assert restored.last_hidden_state.shape == before.last_hidden_state.shape
    assert len(restored.hidden_states) == len(before.hidden_states)
    assert (restored.last_hidden_state[~valid] == 0).all() and (restored.last_hidden_state[valid] != 0).any(-1).all()
    assert (ats.last_stats(model).tokens[:, -1] < SHAPES.prod(1)).all()
