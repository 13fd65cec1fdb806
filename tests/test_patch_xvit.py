"""XViT (space-time mixing attention) and ATS in it: tubes shared by all frames."""
import math

import pytest
import torch
from conftest import contrasted_clips
from torch.utils.flop_counter import FlopCounterMode

import ats
from ats.adapters import family_of, takes_clips
from ats.adapters.family import upper_bound_flops
from ats.adapters.xvit import XVIT
from ats.flops import frames_block_flops
from ats.models.xvit import MixingAttention, XViT, mix_frames
from ats.tubes import frames_to_tubes, tubes_to_frames

FRAMES, SIZE, PATCH, WIDTH, HEADS = 4, 32, 8, 32, 2
POSITIONS = (SIZE // PATCH) ** 2


def tiny_xvit(peaked: bool = True, **overrides) -> XViT:
    """4 frames of 32x32 with 8x8 patches (16 positions), 4 blocks of width 32; ``peaked`` scales the
    qkv weights so kept-token counts differ between clips."""
    kwargs = dict(img_size=SIZE, patch_size=PATCH, in_chans=1, num_frames=FRAMES, num_classes=5, embed_dim=WIDTH,
                  depth=4, num_heads=HEADS, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = XViT(**{**kwargs, **overrides}).eval()
    if peaked:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(6)
    return model


def clips(count: int = 6) -> torch.Tensor:
    """[count, FRAMES, 1, SIZE, SIZE] random clips whose contrast grows with the index."""
    return contrasted_clips(count, FRAMES, SIZE)


CONFIG = ats.ATSConfig.multi_stage(1.0, first=1, depth=4, min_tokens=2)


def slow_mixing_attention(attention: MixingAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's definition with explicit loops: for frame t, head h and token i, keys and values whose channel
    group j (of 2w, each of g channels) comes from frame t + offset_j and whose other channels come from frame t."""
    batch, frames, tokens, dim = x.shape
    heads, d, w = attention.num_heads, attention.head_dim, attention.window
    group = round(attention.mix * d / (2 * w))
    offsets = [*range(-w, 0), *range(1, w + 1)]
    q, k, v = attention.qkv(x).split(dim, dim=-1)
    out = torch.zeros(batch, frames, tokens, dim)
    for t in range(frames):
        for h in range(heads):
            head = slice(h * d, (h + 1) * d)
            keys, values = k[:, t, :, head].clone(), v[:, t, :, head].clone()
            for j, offset in enumerate(offsets):
                channels = slice(j * group, (j + 1) * group)
                source = t + offset
                inside = 0 <= source < frames
                keys[..., channels] = k[:, source, :, head][..., channels] if inside else 0.0
                values[..., channels] = v[:, source, :, head][..., channels] if inside else 0.0
            weights = torch.softmax(q[:, t, :, head] @ keys.transpose(1, 2) / math.sqrt(d), dim=-1)
            out[:, t, :, head] = weights @ values
    return attention.proj(out)


@pytest.mark.parametrize("window, mix", [(1, 0.5), (1, 0.25), (2, 0.5)])
def test_mixing_attention_matches_a_slow_reference(window, mix):
    torch.manual_seed(0)
    attention = MixingAttention(16, num_heads=2, window=window, mix=mix, qkv_bias=True).eval()
    x = torch.randn(2, 5, 7, 16)
    with torch.no_grad():
        assert (attention(x) - slow_mixing_attention(attention, x)).abs().max() < 1e-5


def test_mixing_moves_channels_between_neighbouring_frames():
    x = torch.arange(3.0)[:, None].expand(3, 8).clone()  # frame t holds t + 1 in every channel
    x = x + 1
    mixed = mix_frames(x, window=1, mix=0.5, num_heads=1)  # 2 channels from t - 1, 2 from t + 1, 4 from t
    assert mixed[1].tolist() == [1, 1, 3, 3, 2, 2, 2, 2]
    assert mixed[0].tolist() == [0, 0, 2, 2, 1, 1, 1, 1] and mixed[2].tolist() == [2, 2, 0, 0, 3, 3, 3, 3]


def test_the_model_needs_the_frame_order():
    """Mixing carries information across frames: reversing a clip changes the output."""
    model = tiny_xvit(peaked=False)
    batch = clips(2)
    with torch.no_grad():
        assert not torch.allclose(model(batch), model(batch.flip(1)), atol=1e-4)


def test_keeping_every_token_gives_the_unpatched_output():
    model = tiny_xvit()
    with torch.no_grad():
        before = model(clips())
        ats.patch(model, ats.ATSConfig(blocks={1: 1000, 3: 1000}, sampler="topk"))
        after = model(clips())
    assert (before - after).abs().max() < 1e-5 and takes_clips(model)


def test_clips_do_not_depend_on_their_batch_mates():
    model = ats.patch(tiny_xvit(), CONFIG)
    batch = clips()
    with torch.no_grad():
        together = model(batch)
        tokens = ats.last_stats(model).tokens
        alone = torch.cat([model(clip[None]) for clip in batch])
    assert (together - alone).abs().max() < 1e-4
    assert len(set(tokens[:, -1].tolist())) > 1, "kept-token counts should differ between clips"


def test_unpatch_restores_the_original_forward_exactly():
    model = tiny_xvit()
    with torch.no_grad():
        before = model(clips())
        ats.patch(model, CONFIG)
        patched = model(clips())
        ats.unpatch(model)
        after = model(clips())
    assert type(model) is XViT and torch.equal(before, after) and not torch.allclose(before, patched)


def test_ats_keeps_whole_tubes():
    """Every kept position is kept in all frames, as many as the stats say, each with its own class token."""
    model = ats.patch(tiny_xvit(), CONFIG)
    with torch.no_grad():
        features = model.forward_features(clips())  # [B, T, m, D]
    counts = ats.last_stats(model).tokens_out[:, -1]
    nonzero = features.abs().sum(dim=-1) > 0  # [B, T, m]
    assert torch.equal(nonzero.all(dim=1), nonzero.any(dim=1)), "a position is kept in some frames only"
    assert torch.equal(nonzero.all(dim=1).sum(dim=1), counts)
    assert not torch.allclose(features[:, 0, 0], features[:, 1, 0]), "each frame has its own class token"


def test_frame_layout_round_trips():
    x = torch.randn(2, FRAMES, 5, 8)
    tubes = frames_to_tubes(x)
    assert tubes.shape == (2, 5, FRAMES * 8) and torch.equal(tubes[:, 3].view(2, FRAMES, 8), x[:, :, 3])
    assert torch.equal(tubes_to_frames(tubes, FRAMES), x)


def test_unpatched_flops_match_a_count_of_the_model():
    """The formula's count of the unpatched model equals PyTorch's FLOP counter (2 per multiply-add) on one clip
    plus what that counter leaves out, CPU attention: 2 n^2 C per frame and block, 2 T^2 C for the aggregation."""
    model = tiny_xvit()
    shape = XVIT.shape(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clips(1))
    attention = 4 * FRAMES * 2 * (POSITIONS + 1) ** 2 * WIDTH + 2 * FRAMES ** 2 * WIDTH
    assert upper_bound_flops(shape, None, XVIT.block_costs(model, shape, None)) == \
        counter.get_total_flops() / 2 + attention


def test_flops_are_counted_from_the_kept_tubes():
    """A hand count of one clip: in each of T frames a ViT block on n_in tokens keeping n_out; C = A = 32,
    MLP 2 x 32 x 64."""
    model = ats.patch(tiny_xvit(), CONFIG)
    with torch.no_grad():
        model(clips())
    stats = ats.last_stats(model)
    c, t, mlp = WIDTH, FRAMES, 2 * WIDTH * 2 * WIDTH

    def block(n_in, n_out, ats_block):
        return t * (3 * n_in * c * c + 2 * n_out * n_in * c + n_out * c * c + n_out * mlp + ats_block * n_in * c)

    aggregation = 3 * t * c * c + 2 * t * t * c + t * c * c + t * mlp + c * 5
    for clip in range(len(stats.gflops)):
        n_in, n_out = stats.tokens[clip].tolist(), stats.tokens_out[clip].tolist()
        total = t * POSITIONS * PATCH * PATCH * c + aggregation
        total += sum(block(a, b, index >= 1) for index, (a, b) in enumerate(zip(n_in, n_out)))
        assert stats.gflops[clip].item() == pytest.approx(total / 1e9, rel=1e-6)
    assert frames_block_flops(XVIT.shape(model), t, 17, 9, "cls") == block(17, 9, True)


def test_gradients_flow_in_train_mode():
    model = ats.patch(tiny_xvit(drop_path_rate=0.2).train(), CONFIG)
    loss = torch.nn.functional.cross_entropy(model(clips()), torch.arange(6) % 5)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="fewer than the temporal window's 5 frames"):
        XViT(num_frames=4, window=2)
    with pytest.raises(ValueError, match="0 < mix <= 1"):
        tiny_xvit(mix=0.0)
    model = ats.patch(tiny_xvit(), CONFIG)
    with pytest.raises(ValueError, match=r"\[B, 4, 1, 32, 32\]"):
        model(torch.randn(2, 3, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\[B, 4, 1, 32, 32\]"):
        model(torch.randn(2, FRAMES, 1, 16, 16))
    with pytest.raises(ValueError, match="only ATS runs"):
        ats.patch(model, ats.MergeConfig(r=2))
    with pytest.raises(ValueError, match="class token score with the class token kept"):
        ats.patch(model, ats.ATSConfig.multi_stage(0.6, first=1, depth=4, score="self_attention", fuse=True))
    with pytest.raises(ValueError, match="takes clips of"):
        family_of(model).shape(model, (FRAMES, 1, 16, 16))
