"""EViT on plain tensors, in a model, and stacked with ATS."""
import math

import pytest
import torch
from conftest import tiny_vit

import ats
from ats.adapters.timm import TIMM
from ats.evit import FUSED_SOURCE, attentive_tokens, fuse_inattentive
from ats.flops import block_flops, evit_block_flops, vit_flops


def test_attentive_tokens_and_the_fused_token_by_hand():
    # position 0: class token; 1..5: patches; 6: padding
    attention = torch.tensor([[0.30, 0.05, 0.25, 0.10, 0.20, 0.10, 0.0]])
    patches = torch.tensor([[False, True, True, True, True, True, False]])
    keep = attentive_tokens(attention, patches, keep_rate=0.5)  # ceil(2.5) = 3 of 5 patches
    assert keep.tolist() == [[False, False, True, True, True, False, False]]  # ties: the earlier position
    x = torch.arange(7.0)[None, :, None].repeat(1, 1, 2)  # token i holds (i, i)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0, 3.0, 1.0]])
    fused, size = fuse_inattentive(x, sizes, attention, patches & ~keep)
    # positions 1 and 5, weights 0.05 and 0.10: (0.05 * 1 + 0.10 * 5) / 0.15
    assert fused[0].tolist() == pytest.approx([11 / 3, 11 / 3])
    assert size.tolist() == [5.0]


def test_attentive_tokens_keep_patches_with_zero_attention_when_they_must():
    attention = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    patches = torch.tensor([[False, True, True, True]])
    assert attentive_tokens(attention, patches, keep_rate=0.9).sum() == 3


def test_gradients_flow_through_the_fused_token():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    attention = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    inattentive = torch.tensor([[False, True, False, True, True], [False, False, True, True, False]])
    sizes = torch.ones(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, a: fuse_inattentive(x, sizes, a, inattentive)[0], (x, attention))
    fuse_inattentive(x, sizes, attention, inattentive)[0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).tolist() == inattentive.tolist()


def test_keep_rate_one_gives_the_unpatched_logits(model, images):
    with torch.no_grad():
        expected = model(images)
        ats.patch(model, ats.EViTConfig(1.0, blocks=(1, 3)))
        logits = model(images)
    assert torch.equal(ats.last_stats(model).tokens_out, torch.full((8, 6), 65))
    assert (logits - expected).abs().max() < 1e-5


def test_an_evit_block_keeps_the_attentive_tokens_and_puts_the_fused_one_last(model, images):
    ats.patch(model, ats.EViTConfig(0.5, blocks=(2,)))
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    assert (stats.tokens[:, 3] == 1 + 32 + 1).all()
    cls_attention = stats.cls_attention[2]  # over the 64 patches
    expected = cls_attention.topk(32, dim=1).indices.sort(dim=1).values
    kept = stats.kept[2]
    assert torch.equal(kept[:, :32], expected)
    assert (kept[:, 32] == -1).all()  # the fused token stands for no single patch
    assert (stats.sampling[2].source_after[:, 33] == FUSED_SOURCE).all()


def test_fused_tokens_carry_their_size_into_later_blocks(model, images):
    """A second EViT block may fuse the first one's fused token again; sizes add up to the patches."""
    from ats.step import run_blocks

    config = ats.EViTConfig(0.5, blocks=(1, 3))
    parts = [TIMM.layer_parts(block) for block in model.blocks]
    with torch.no_grad():
        batch, record = run_blocks(parts, TIMM.embed(model, images), config, 1, True)
    sizes = batch.padded_sizes() * batch.position_mask
    assert sizes[:, 1:].sum(dim=1).tolist() == [64.0] * 8
    assert (batch.lengths == 1 + math.ceil(0.5 * math.ceil(0.5 * 64) + 0.5) + 1).all()


def test_stacked_with_ats_the_token_counts_and_flops_add_up(model, images):
    config = ats.StackedConfig(ats.EViTConfig(0.7, blocks=(1, 4)), ats.ATSConfig({2: 0.8, 3: 0.8, 5: 0.8}))
    ats.patch(model, config)
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    tokens_in, tokens_out = stats.tokens, stats.tokens_out
    for block in (1, 4):
        patches = tokens_in[:, block] - 1
        fused = (torch.ceil(patches * 0.7) < patches).long()
        assert torch.equal(tokens_out[:, block], 1 + torch.ceil(patches.double() * 0.7).long() + fused)
    for block in (2, 3, 5):
        assert (tokens_out[:, block] <= 1 + torch.floor(tokens_in[:, block] * 0.8)).all()
    assert torch.equal(tokens_in[:, 1:], tokens_out[:, :-1])
    assert len(set(tokens_out[:, 5].tolist())) > 1
    shape = TIMM.shape(model)
    by_hand = []
    for n_in, n_out in zip(tokens_in.tolist(), tokens_out.tolist()):
        flops = shape.patch_embed_flops + shape.head_flops
        for block in range(6):
            if block in (1, 4):
                flops += evit_block_flops(shape, n_in[block], n_out[block])
            elif block in (2, 3, 5):
                flops += block_flops(shape, n_in[block], n_out[block], score="cls")
            else:
                flops += block_flops(shape, n_in[block], n_out[block])
        by_hand.append(flops / 1e9)
    assert stats.gflops.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert float(stats.gflops.max()) <= ats.gflops(model) + 1e-9
    dense = vit_flops(shape, torch.full((1, 6), 65), torch.full((1, 6), 65), {})
    assert float(stats.gflops.max()) < float(dense) / 1e9


def test_evit_works_on_the_transformers_family():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    images = torch.randn(3, 3, 32, 32)
    ats.patch(model, ats.StackedConfig(ats.EViTConfig(0.5, blocks=(1,)), ats.ATSConfig({2: 0.9})))
    with torch.no_grad():
        together = model(images).logits
        alone = torch.cat([model(image[None]).logits for image in images])
    assert (together - alone).abs().max() < 1e-4
    assert (ats.last_stats(model).tokens[:, 2] == 1 + 32 + 1).all()


@pytest.mark.parametrize("keep_rate", [0.0, -0.5, 1.5, True, "0.7"])
def test_keep_rates_outside_zero_one_are_refused(keep_rate):
    with pytest.raises(ValueError, match=r"keep_rate must lie in \(0, 1\]"):
        ats.EViTConfig(keep_rate)


def test_overlapping_blocks_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"both claim block 3.*if i not in \(3, 6, 9\)"):
        ats.StackedConfig(ats.EViTConfig(0.7), ats.ATSConfig.multi_stage(0.7))
    with pytest.raises(ValueError, match="name a block twice"):
        ats.EViTConfig(0.7, blocks=(3, 3))
    with pytest.raises(TypeError, match="merging runs in every block"):
        ats.StackedConfig(ats.EViTConfig(0.7), ats.MergeConfig(r=4))
    with pytest.raises(ValueError, match="needs the class token"):
        ats.StackedConfig(ats.EViTConfig(0.7), ats.ATSConfig({4: 0.7}, keep_cls=False))


def test_models_evit_cannot_run_on_are_refused(images):
    with pytest.raises(ValueError, match="outside this model's 6 blocks"):
        ats.patch(tiny_vit(), ats.EViTConfig(0.7))  # blocks 3, 6, 9
    with pytest.raises(ValueError, match="no class token"):
        ats.patch(tiny_vit(class_token=False, global_pool="avg"), ats.EViTConfig(0.7, blocks=(1,)))



@pytest.mark.slow
def test_evit_with_ats_honours_gradient_checkpointing_and_compiles(images):
    from test_compatibility import training_step
    from torch._dynamo.testing import CompileCounter

    config = ats.StackedConfig(ats.EViTConfig(0.6, blocks=(1, 4)), ats.ATSConfig({2: 0.87, 3: 0.87}, stochastic=True))
    model = ats.patch(tiny_vit(drop_path_rate=0.1).train(), config)
    logits, gradients, saved = training_step(model, images)
    model.set_grad_checkpointing(True)
    checkpointed_logits, checkpointed_gradients, checkpointed_saved = training_step(model, images)
    assert torch.equal(checkpointed_logits, logits) and checkpointed_saved < saved / 10
    for name, gradient in gradients.items():
        assert torch.allclose(checkpointed_gradients[name], gradient, atol=1e-6), name

    model.eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for scale in (0.5, 1.0, 2.0, 3.0):
            assert torch.allclose(compiled(images * scale), model(images * scale), atol=1e-5)
    assert counter.frame_count > 0
