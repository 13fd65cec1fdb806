import pytest
import timm
import torch

import ats
from ats.adapters.timm import TIMM
from ats.flops import block_flops, merge_block_flops


@pytest.mark.parametrize("name, expected, tolerance", [
    ("deit_small_patch16_224", 4.60, 0.02),
    ("deit_tiny_patch16_224", 1.25, 0.02),
    ("vit_base_patch16_224", 17.56, 0.05),
])
def test_unpatched_gflops_match_the_paper(name, expected, tolerance):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert ats.gflops(model) == pytest.approx(expected, abs=tolerance)


def test_patched_bound_is_a_hand_count():
    with torch.device("meta"):
        model = timm.create_model("deit_small_patch16_224")
    ats.patch(model, ats.ATSConfig.single_stage(k=108, block=3))
    c = 384
    dense = (4 + 2 * 4) * 197 * c * c + 2 * 197 * 197 * c
    ats_block = 3 * 197 * c * c + 197 * c + 2 * 109 * 197 * c + 109 * c * c + 8 * 109 * c * c
    after = (4 + 2 * 4) * 109 * c * c + 2 * 109 * 109 * c
    total = 196 * c * 3 * 256 + c * 1000 + 3 * dense + ats_block + 8 * after
    assert ats.gflops(model) == pytest.approx(total / 1e9, rel=1e-9)
    assert ats.gflops(model) < 3.1
    ats.unpatch(model)


def test_a_fractional_floor_raises_the_bound_to_the_floor():
    with torch.device("meta"):
        model = timm.create_model("deit_small_patch16_224")
    ats.patch(model, ats.ATSConfig(blocks={3: 8}, min_kept=0.5))
    floored = ats.gflops(model)
    ats.patch(model, ats.ATSConfig.single_stage(k=98, block=3))  # floor(0.5 * 196) = 98 patch tokens
    assert floored == pytest.approx(ats.gflops(model), rel=1e-12)


def test_input_size_changes_the_patch_count():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224")
    shape = TIMM.shape(model, (3, 384, 384))
    assert shape.num_patches == 576
    with pytest.raises(ValueError, match="multiple of the patch size"):
        TIMM.shape(model, (3, 100, 100))


def test_block_formula_parts():
    with torch.device("meta"):
        shape = TIMM.shape(timm.create_model("deit_tiny_patch16_224"))
    n_in, n_out = 197, 100
    base = block_flops(shape, n_in, n_out)
    assert block_flops(shape, n_in, n_out, score="cls") - base == n_in * 192
    assert block_flops(shape, n_in, n_out, score="self_attention") - base == n_in * n_in * 192
    assert block_flops(shape, n_in, n_out, fuse=True) - base == (n_in - n_out) * n_out * 64
    assert block_flops(shape, n_in, n_out, fuse=True, distinct=True) - base == n_in * n_in * 64
    assert merge_block_flops(shape, n_in, n_in) == pytest.approx(block_flops(shape, n_in, n_in) + (n_in / 2) ** 2 * 64)
