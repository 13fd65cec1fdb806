import pytest
import torch
from timm.layers import PatchEmbed

import ats
from ats.adapters import family_of
from ats.models.conv_stem import ConvStemPatchEmbed, stem_widths
from ats.reference import create_reference_cluttered, load_reference_cluttered


def test_the_stem_gives_the_linear_embeddings_grid_and_shape():
    stem = ConvStemPatchEmbed(img_size=56, patch_size=4, in_chans=1, embed_dim=96)
    linear = PatchEmbed(img_size=56, patch_size=4, in_chans=1, embed_dim=96)
    images = torch.randn(2, 1, 56, 56)
    assert stem(images).shape == linear(images).shape == (2, 196, 96)
    assert stem.grid_size == linear.grid_size == (14, 14)
    convolutions = [m for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride) for c in convolutions] == [(48, (2, 2)), (96, (2, 2)), (96, (1, 1))]


def test_stem_widths_double_up_to_the_embedding_width():
    assert stem_widths(96, 4) == [48, 96]
    assert stem_widths(384, 16) == [48, 96, 192, 384]
    assert stem_widths(64, 2) == [64]
    with pytest.raises(ValueError, match="power-of-two patch size"):
        stem_widths(96, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        stem_widths(90, 8)


def test_flops_count_every_stem_convolution_at_its_grid():
    stem_model, linear_model = create_reference_cluttered(conv_stem=True), create_reference_cluttered()
    by_hand = 28 * 28 * 48 * 1 * 9 + 14 * 14 * 96 * 48 * 9 + 14 * 14 * 96 * 96  # two 3x3/2 convs and the 1x1
    linear_embedding = 14 * 14 * 96 * 1 * 4 * 4
    difference = (ats.gflops(stem_model) - ats.gflops(linear_model)) * 1e9
    assert difference == pytest.approx(by_hand - linear_embedding, abs=1)


def test_ats_runs_on_the_conv_stem_model_and_unpatch_restores_it():
    torch.manual_seed(0)
    model = create_reference_cluttered(conv_stem=True).eval()
    images = torch.randn(3, 1, 56, 56)
    with torch.no_grad():
        before = model(images)
        ats.patch(model, ats.ATSConfig.multi_stage(1.0, first=3, depth=12))
        patched = model(images)
        kept = ats.last_stats(model).kept_counts(11)
        ats.unpatch(model)
        assert torch.equal(model(images), before)
    assert patched.shape == (3, 10) and bool((kept < 197).all())
    assert family_of(model).data_config(model)["input_size"] == (1, 56, 56)


def test_the_loader_builds_the_stem_a_checkpoint_holds(tmp_path):
    torch.manual_seed(0)
    trained = create_reference_cluttered(conv_stem=True)
    torch.save(trained.state_dict(), tmp_path / "stem.pt")
    loaded = load_reference_cluttered(tmp_path / "stem.pt")
    assert isinstance(loaded.patch_embed, ConvStemPatchEmbed)
    images = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        assert torch.allclose(loaded(images), trained.eval()(images))
    torch.save(create_reference_cluttered().state_dict(), tmp_path / "linear.pt")
    assert not isinstance(load_reference_cluttered(tmp_path / "linear.pt").patch_embed, ConvStemPatchEmbed)


def test_a_patch_embedding_without_convolutions_is_refused_with_a_clear_error():
    model = create_reference_cluttered()
    model.patch_embed.proj = torch.nn.Identity()
    with pytest.raises(TypeError, match="cannot count FLOPs of a Identity patch embedding"):
        ats.gflops(model)
    with pytest.raises(TypeError, match="expected Conv2d layers"):
        family_of(model).input_size(model)
