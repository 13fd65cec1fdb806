"""ATS in Hugging Face TimeSformer: tubes under divided attention, tokens under joint and space-only attention."""
import pytest
import torch
from conftest import contrasted_clips
from torch.utils.flop_counter import FlopCounterMode
from transformers import TimesformerConfig, TimesformerForVideoClassification, TimesformerModel
from transformers.models.timesformer.modeling_timesformer import TimesformerDropPath

import ats
from ats.adapters import family_of
from ats.adapters.family import upper_bound_flops
from ats.adapters.timesformer import TIMESFORMER
from ats.flops import divided_block_flops
from ats.sampling import tube_scores
from ats.tubes import from_tubes, to_tubes

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")
FRAMES, SIZE, PATCH = 4, 32, 8
POSITIONS = (SIZE // PATCH) ** 2


def tiny_timesformer(attention_type: str = "divided_space_time", peaked: bool = True,
                     cls=TimesformerForVideoClassification, **overrides):
    """4 frames of 32x32 with 8x8 patches (16 positions), 4 blocks of width 32; ``peaked`` scales the
    spatial qkv weights so kept-token counts differ between clips."""
    kwargs = dict(image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=64, num_labels=5, num_channels=1,
                  attention_type=attention_type)
    torch.manual_seed(0)
    model = cls(TimesformerConfig(**{**kwargs, **overrides})).eval()
    if peaked:
        with torch.no_grad():
            for layer in TIMESFORMER.blocks(model):
                layer.attention.attention.qkv.weight.mul_(6)
    return model


def clips(count: int = 6) -> torch.Tensor:
    """[count, FRAMES, 1, SIZE, SIZE] random clips whose contrast grows with the index."""
    return contrasted_clips(count, FRAMES, SIZE)


CONFIG = ats.ATSConfig.multi_stage(1.0, first=1, depth=4, min_tokens=2)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_keeping_every_token_gives_the_unpatched_output(attention_type):
    model = tiny_timesformer(attention_type)
    with torch.no_grad():
        before = model(clips()).logits
        ats.patch(model, ats.ATSConfig(blocks={1: 1000, 3: 1000}, sampler="topk"))
        after = model(clips()).logits
    assert (before - after).abs().max() < 1e-5


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_clips_do_not_depend_on_their_batch_mates(attention_type):
    model = ats.patch(tiny_timesformer(attention_type), CONFIG)
    batch = clips()
    with torch.no_grad():
        together = model(batch).logits
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(clip[None]).logits for clip in batch])
    assert (together - alone).abs().max() < 1e-4
    assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between clips"


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_unpatch_restores_the_original_forward_exactly(attention_type):
    model = tiny_timesformer(attention_type)
    original = type(model)
    with torch.no_grad():
        before = model(clips()).logits
        ats.patch(model, CONFIG)
        patched = model(clips()).logits
        ats.unpatch(model)
        after = model(clips()).logits
    assert type(model) is original and torch.equal(before, after) and not torch.allclose(before, patched)


def test_divided_attention_keeps_whole_tubes():
    """Every kept position is kept in all frames: the padded last hidden state has, per clip, the class
    token and then whole tubes (T non-zero rows per kept position), as many as the stats say."""
    model = ats.patch(tiny_timesformer(cls=TimesformerModel), CONFIG)
    with torch.no_grad():
        hidden = model(clips()).last_hidden_state
    stats = ats.last_stats(model)
    counts = stats.tokens_out[:, -1]
    tubes = hidden[:, 1:].unflatten(1, (-1, FRAMES))
    nonzero = tubes.abs().sum(dim=-1) > 0
    assert torch.equal(nonzero.all(dim=2), nonzero.any(dim=2)), "a position is kept in some frames only"
    assert torch.equal(nonzero.all(dim=2).sum(dim=1) + 1, counts)
    assert ((stats.kept[3] >= 0).sum(dim=1) == counts - 1).all() and stats.kept[3].max() < POSITIONS


def test_tube_layout_round_trips():
    tokens = torch.randn(2, 1 + POSITIONS * FRAMES, 8)
    tubes = to_tubes(tokens, FRAMES)
    assert tubes.shape == (2, 1 + POSITIONS, FRAMES * 8)
    assert torch.equal(tubes[:, 0].view(2, FRAMES, 8), tokens[:, :1].expand(2, FRAMES, 8))
    assert torch.equal(tubes[:, 3].view(2, FRAMES, 8), tokens[:, 1 + 2 * FRAMES:1 + 3 * FRAMES])
    assert torch.equal(from_tubes(tubes, FRAMES), tokens)


def test_tube_scores_sum_attention_times_value_norm_over_frames():
    attention = torch.tensor([[[[0.5, 0.25, 0.25]], [[0.5, 0.5, 0.0]]]])  # [B=1, T=2, h=1, n=3]
    value_norm = torch.tensor([[[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]]])
    candidates = torch.tensor([[False, True, True]])
    scores = tube_scores(attention, value_norm, candidates)
    assert torch.allclose(scores, torch.tensor([[0.0, 1.0 / 2.0, 1.0 / 2.0]]))  # raw 0.5 + 0.5 and 1.0 + 0.0


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_unpatched_flops_match_a_count_of_the_model(attention_type):
    """The formula's count of the unpatched model equals PyTorch's FLOP counter (which counts 2 per multiply-add)
    on one clip; space-only attention is counted per frame."""
    model = tiny_timesformer(attention_type)
    family = family_of(model)
    shape = family.shape(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clips(1))
    frames = FRAMES if attention_type == "space_only" else 1
    assert upper_bound_flops(shape, None, family.block_costs(model, shape, None)) * frames == \
        counter.get_total_flops() / 2


def test_divided_flops_are_counted_from_the_kept_tubes():
    """A hand count of one clip: T frames, n_in positions in, n_out kept; width C = A = 32, MLP 2 x 32 x 64."""
    model = ats.patch(tiny_timesformer(), CONFIG)
    with torch.no_grad():
        model(clips())
    stats = ats.last_stats(model)
    c, t, mlp = 32, FRAMES, 2 * 32 * 64

    def block(n_in, n_out, ats_block):
        temporal = (n_in - 1) * t * (3 * c * c + 2 * t * c + c * c + c * c)
        spatial = t * (3 * n_in * c * c + 2 * n_out * n_in * c + n_out * c * c + ats_block * n_in * c)
        return temporal + spatial + (1 + (n_out - 1) * t) * mlp

    for clip in range(len(stats.gflops)):
        n_in, n_out = stats.tokens[clip].tolist(), stats.tokens_out[clip].tolist()
        total = t * POSITIONS * PATCH * PATCH * c + c * 5
        total += sum(block(a, b, index >= 1) for index, (a, b) in enumerate(zip(n_in, n_out)))
        assert stats.gflops[clip].item() == pytest.approx(total / 1e9, rel=1e-6)
    assert divided_block_flops(TIMESFORMER.shape(model), t, 17, 17) == block(17, 17, False)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_gradients_flow_in_train_mode(attention_type):
    model = tiny_timesformer(attention_type, attention_probs_dropout_prob=0.1).train()
    for layer in TIMESFORMER.blocks(model):  # this transformers version's config refuses a float drop_path_rate
        layer.drop_path = TimesformerDropPath(0.1)
    ats.patch(model, CONFIG)
    labels = torch.arange(len(clips())) % 5
    if attention_type == "space_only":
        labels = labels.repeat_interleave(FRAMES)
    model(clips(), labels=labels).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    assert TIMESFORMER.blocks(model)[-1].intermediate.dense.weight.grad.abs().sum() > 0


def test_bad_input_gets_a_clear_error():
    model = ats.patch(tiny_timesformer(), CONFIG)
    with pytest.raises(ValueError, match=r"\[B, 4, 1, 32, 32\].*sample 4 frames"):
        model(torch.randn(2, 3, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="expected pixel_values"):
        model(torch.randn(2, FRAMES, 1, 16, 16))
    with pytest.raises(ValueError, match="expected pixel_values"):
        model(torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="only ATS runs"):
        ats.patch(model, ats.MergeConfig(r=2))
    with pytest.raises(ValueError, match="class token score with the class token kept"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.6, first=1, depth=4, score="self_attention", fuse=True))
    with pytest.raises(ValueError, match="output_attentions"):
        model(clips(), output_attentions=True)
