"""Dense features (issue 51): the ``restore`` option gives the full token grid back in the original order, on plain
tensors and in every family's dense outputs (timm forward_features and forward_intermediates on ViT, Eva and Beit,
features_only; transformers' last_hidden_state and hidden_states of DINOv2 and DINOv3, DINOv2's backbone), while
the classification output and ``ats.last_stats`` stay those of the run without it."""
import pytest
import timm
import torch
import transformers
from test_patch_beit import tiny_beit
from test_patch_eva import tiny_eva
from test_patch_hf_images import tiny

import ats
from ats.merging import RESTORE_RULES, DroppedTokens, dropped_tokens, restore_tokens
from ats.reference import create_reference_cvt, create_reference_model

#: One config per method that drops tokens, in 12 blocks of the reference geometry.
DROPPING = {
    "ATS": lambda rule: ats.ATSConfig.multi_stage(0.6, restore=rule),
    "ATS fuse": lambda rule: ats.ATSConfig.multi_stage(0.6, fuse=True, restore=rule),
    "EViT": lambda rule: ats.EViTConfig(0.5, restore=rule),
    "merging": lambda rule: ats.MergeConfig(r=12, restore=rule),
    "SAINT": lambda rule: ats.SAINTConfig(0.3, restore=rule),
    "stacked": lambda rule: ats.StackedConfig(ats.EViTConfig(0.7, blocks=(2,)), ats.ATSConfig({5: 0.5}),
                                              restore=rule),
}


def rows(*values):
    return torch.tensor(values, dtype=torch.float32).unsqueeze(-1)


def test_restore_tokens_resolves_chains_by_each_rule():
    # 5 tokens, one channel: token 3 dropped first (representative 2), then token 2 (representative 1); 0, 1, 4 kept
    first = DroppedTokens(torch.tensor([[3]]), torch.tensor([[2]]), rows(30.0 - 20.0).unsqueeze(0))  # mix offset
    second = DroppedTokens(torch.tensor([[2]]), torch.tensor([[1]]), rows(21.0 - 11.0).unsqueeze(0))
    final = rows(100.0, 111.0, 104.0).unsqueeze(0)
    source = torch.tensor([[0, 1, 4]])
    restored = restore_tokens(final, source, [first, second], 5)[0, :, 0]
    # token 2: 111 + 10 = 121; token 3: 121 + 10 = 131
    assert restored.tolist() == [100.0, 111.0, 121.0, 131.0, 104.0]
    copied = [block._replace(offset=None) for block in (first, second)]
    assert restore_tokens(final, source, copied, 5)[0, :, 0].tolist() == [100.0, 111.0, 111.0, 111.0, 104.0]
    own = [DroppedTokens(torch.tensor([[3]]), torch.tensor([[-1]]), rows(30.0).unsqueeze(0))]
    padded = restore_tokens(rows(1.0, 2.0, 9.0).unsqueeze(0), torch.tensor([[0, 1, -1]]), own, 4)[0, :, 0]
    assert padded.tolist() == [1.0, 2.0, 0.0, 30.0]  # padding goes nowhere, a never-dropped gap stays zero


@pytest.mark.parametrize("rule", RESTORE_RULES)
def test_dropped_tokens_pick_representative_and_offset(rule):
    states = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])
    keys = states.unsqueeze(1) + torch.tensor([0.0, 0.01])  # [B, h, m, d]: 3 is like 1, 4 like 2
    source = torch.arange(5).unsqueeze(0)
    keep = torch.tensor([[True, True, True, False, False]])
    movable = torch.tensor([[False, True, True, True, True]])
    target = torch.tensor([[0, 1, 2, 2, 1]])  # folded against similarity: "fuse" follows the fold, "nearest" not
    dropped = dropped_tokens(rule, states, source, keep, movable, keys, target)
    assert dropped.source.tolist() == [[3, 4]]
    expected = {"fuse": [[2, 1]], "mix": [[2, 1]], "nearest": [[1, 2]], "own": [[-1, -1]]}[rule]
    assert dropped.representative.tolist() == expected
    own = states[0, 3:]
    if rule == "own":
        assert torch.equal(dropped.offset[0], own)
    elif rule == "mix":
        assert torch.allclose(dropped.offset[0], own - states[0, [2, 1]])
    else:
        assert not dropped.offset.any()


def tiny_vit():
    torch.manual_seed(0)
    model = create_reference_model(img_size=16, patch_size=2, embed_dim=48, global_pool="avg").eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)
    return model


IMAGES = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_keep_all_restores_the_unpatched_features():
    model = tiny_vit()
    with torch.no_grad():
        features = model.forward_features(IMAGES)
        _, intermediates = model.forward_intermediates(IMAGES, indices=[1, 6, 11], norm=True)
        for rule in RESTORE_RULES:
            ats.patch(model, ats.KeepAllConfig(restore=rule))
            restored = model.forward_features(IMAGES)
            assert restored.shape == features.shape and torch.allclose(restored, features, atol=1e-5)
        final, restored_intermediates = model.forward_intermediates(IMAGES, indices=[1, 6, 11], norm=True)
    assert torch.allclose(final, features, atol=1e-5)
    for ours, theirs in zip(restored_intermediates, intermediates):
        assert ours.shape == theirs.shape == (3, 48, 8, 8) and torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("method", DROPPING)
def test_restore_gives_the_grid_and_keeps_the_kept_tokens_and_logits(method):
    model = tiny_vit()
    with torch.no_grad():
        ats.patch(model, DROPPING[method](None))
        kept_features, logits = model.forward_features(IMAGES), model(IMAGES)
        stats = ats.last_stats(model)
        source = stats.sampling[max(stats.sampling)].source_after
        assert int(stats.tokens_out[:, -1].min()) < 65  # something was dropped
        for rule in RESTORE_RULES:
            ats.patch(model, DROPPING[method](rule))
            restored, restored_logits = model.forward_features(IMAGES), model(IMAGES)
            restored_stats = ats.last_stats(model)
            assert restored.shape == (3, 1 + 64, 48) and torch.isfinite(restored).all()
            assert torch.equal(restored_logits, logits)
            assert all(torch.equal(restored_stats.kept[i], stats.kept[i]) for i in stats.kept)
            valid = torch.zeros(3, 65, dtype=torch.bool)
            for image in range(3):
                positions = source[image][source[image] >= 0]  # the tokens that reach the end (EViT's fused aside)
                kept_rows = kept_features[image, :len(source[image])][source[image] >= 0]
                assert torch.allclose(restored[image, positions], kept_rows, atol=1e-5)
                valid[image, positions] = True
            assert (restored[~valid].abs().sum(-1) > 0).all()  # every dropped position was given a state
        final, (early, late) = model.forward_intermediates(IMAGES, indices=[1, 11], output_fmt="NLC", norm=True)
    assert torch.allclose(final, restored, atol=1e-6) and late.shape == early.shape == (3, 64, 48)
    assert torch.allclose(late, restored[:, 1:], atol=1e-6)


@pytest.mark.parametrize("method", DROPPING)
def test_static_mode_restores_what_the_adaptive_mode_does(method):
    """In static mode (every block at its capacity) each rule gives the adaptive mode's full grid, and compiles whole
    (dynamo's eager backend: the graph without building kernels)."""
    model = tiny_vit()
    with torch.no_grad():
        for rule in RESTORE_RULES:
            ats.patch(model, DROPPING[method](rule))
            adaptive = model.forward_features(IMAGES)
            ats.patch(model, DROPPING[method](rule), static=True)
            assert (model.forward_features(IMAGES) - adaptive).abs().max() < 1e-5
        if method == "ATS fuse":
            compiled = torch.compile(model.forward_features, backend="eager", fullgraph=True)
            assert (compiled(IMAGES) - adaptive).abs().max() < 1e-5


def test_timm_features_only_and_refusals():
    model = tiny_vit()
    ats.patch(model, ats.ATSConfig.multi_stage(0.6))
    with pytest.raises(NotImplementedError, match="restore"):
        model.forward_intermediates(IMAGES)
    with pytest.raises(ValueError, match="unknown restore rule"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.6, restore="copy"))
    torch.manual_seed(0)
    features = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4,
                                 features_only=True, out_indices=(1, 3)).eval()
    ats.patch(features.model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, restore="mix"))
    with torch.no_grad():
        maps = features(torch.randn(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8)] * 2
    assert ats.last_stats(features.model).tokens_out[:, -1].max() < 65


@pytest.mark.parametrize("make", [tiny_eva, tiny_beit], ids=["eva", "beit"])
def test_eva_and_beit_intermediates_under_restore(make):
    model = make()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.forward_intermediates(images, indices=[0, 3], norm=True)
        ats.patch(model, ats.KeepAllConfig(restore="mix"))
        keep_all = model.forward_intermediates(images, indices=[0, 3], norm=True)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, restore="mix"))
        final, maps = model.forward_intermediates(images, indices=[0, 3], norm=True)
    assert torch.allclose(keep_all[0], reference[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(keep_all[1], reference[1]))
    assert final.shape == reference[0].shape and [m.shape for m in maps] == [m.shape for m in reference[1]]
    assert torch.allclose(maps[0], reference[1][0], atol=1e-5)  # block 0 runs before the first ATS block
    assert ats.last_stats(model).tokens_out[:, -1].max() < final.shape[1]


HF_VISION = dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=2)
HF_MODELS = {
    "Dinov2Model": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**HF_VISION)),
    "DINOv3ViTModel": lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **HF_VISION, num_register_tokens=2, layerscale_value=0.5)),
}


@pytest.mark.parametrize("name", [name for name in HF_MODELS if hasattr(transformers, name)])
def test_hugging_face_hidden_states_under_restore(name):
    torch.manual_seed(0)
    model = HF_MODELS[name]().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images, output_hidden_states=True)
        ats.patch(model, ats.KeepAllConfig(restore="nearest"))
        keep_all = model(images, output_hidden_states=True)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4))
        with pytest.raises(ValueError, match="restore"):
            model(images, output_hidden_states=True)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, restore="mix"))
        restored = model(images, output_hidden_states=True)
    assert torch.allclose(keep_all.last_hidden_state, reference.last_hidden_state, atol=1e-5)
    assert len(keep_all.hidden_states) == len(reference.hidden_states) == 5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(keep_all.hidden_states, reference.hidden_states))
    assert restored.last_hidden_state.shape == reference.last_hidden_state.shape
    assert [h.shape for h in restored.hidden_states] == [h.shape for h in reference.hidden_states]
    assert torch.allclose(restored.hidden_states[1], reference.hidden_states[1], atol=1e-5)  # before ATS
    assert ats.last_stats(model).tokens_out[:, -1].max() < reference.last_hidden_state.shape[1]


def test_dinov2_backbone_feature_maps_under_restore():
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**HF_VISION, out_features=["stage1", "stage4"], reshape_hidden_states=True)
    model = transformers.Dinov2Backbone(config).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="restore"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4))
    with torch.no_grad():
        reference = model(images)
        ats.patch(model, ats.KeepAllConfig(restore="own"))
        keep_all = model(images)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, restore="mix"))
        restored = model(images)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(keep_all.feature_maps, reference.feature_maps))
    assert [m.shape for m in restored.feature_maps] == [(2, 32, 8, 8)] * 2
    assert torch.allclose(restored.feature_maps[0], reference.feature_maps[0], atol=1e-5)
    assert not torch.allclose(restored.feature_maps[1], reference.feature_maps[1], atol=1e-3)


@pytest.mark.parametrize("name", [name for name in ("CLIPVisionModel", "SiglipVisionModel", "BeitModel", "IJepaModel")
                                  if hasattr(transformers, name)])
def test_other_hugging_face_image_families_restore(name):
    model = tiny(name)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images, output_hidden_states=True)
        ats.patch(model, ats.KeepAllConfig(restore=True))
        keep_all = model(images, output_hidden_states=True)
        ats.patch(model, ats.ATSConfig.multi_stage(0.5, first=1, depth=4, restore=True))
        restored = model(images, output_hidden_states=True)
    assert torch.allclose(keep_all.last_hidden_state, reference.last_hidden_state, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(keep_all.hidden_states, reference.hidden_states))
    assert [h.shape for h in restored.hidden_states] == [h.shape for h in reference.hidden_states]
    assert restored.last_hidden_state.shape == reference.last_hidden_state.shape
    assert ats.last_stats(model).tokens_out[:, -1].max() < reference.last_hidden_state.shape[1]


def test_families_without_restore_refuse_it():
    with pytest.raises(ValueError, match="restore is not supported"):
        ats.patch(create_reference_cvt(), ats.ATSConfig.multi_stage(0.7, restore=True))
