"""``fuse`` and ``distinct`` on tubes (TimeSformer's divided attention, XViT): dropped tubes fold into their most
similar kept tube in every frame, sizes are per tube, and later attention counts a tube as the tubes it holds."""
import pytest
import torch
import torch.nn.functional as F
from conftest import contrasted_clips

import ats
from ats.adapters.timesformer import TIMESFORMER
from ats.adapters.xvit import XVIT
from ats.merging import tube_unit_vectors
from ats.packing import TokenBatch
from ats.reference import create_reference_video, create_reference_xvit
from ats.stats import ForwardRecord
from ats.tubes import frames_to_tubes, run_tube_blocks, tube_block

FRAMES, POSITIONS, WIDTH, HEADS, DEPTH = 8, 64, 64, 2, 4
MLP = 2 * WIDTH * 4 * WIDTH  # two layers, hidden width 4 C
FUSE = ats.ATSConfig.multi_stage(0.5, first=1, depth=DEPTH, min_tokens=2, fuse=True)
DISTINCT = ats.ATSConfig.multi_stage(0.5, first=1, depth=DEPTH, min_tokens=2, fuse=True, distinct=0.3)


def small_video(peaked: bool = True):
    """The reference TimeSformer's sizes (8 frames of 64 positions, width 64, 2 heads) with 4 blocks, random
    weights; ``peaked`` scales the spatial qkv weights so kept counts differ between clips."""
    torch.manual_seed(0)
    model = create_reference_video(num_hidden_layers=DEPTH).eval()
    if peaked:
        with torch.no_grad():
            for layer in TIMESFORMER.blocks(model):
                layer.attention.attention.qkv.weight.mul_(6)
    return model


def small_xvit(peaked: bool = True):
    """The reference XViT's sizes (8 frames of 64 positions, width 64, 2 heads) with 4 blocks, random weights."""
    torch.manual_seed(0)
    model = create_reference_xvit(depth=DEPTH).eval()
    if peaked:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(6)
    return model


MODELS = {"timesformer": (small_video, lambda output: output.logits), "xvit": (small_xvit, lambda output: output)}


def clips(count: int = 6) -> torch.Tensor:
    return contrasted_clips(count, FRAMES, 64)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("config", [
    ats.ATSConfig(blocks={1: 1000, 3: 1000}, sampler="topk", fuse=True),  # nothing dropped, nothing folded
    ats.ATSConfig.multi_stage(0.5, first=1, depth=DEPTH, fuse=True, distinct=1.0),  # every dropped tube distinct
], ids=["no-drop", "distinct-1"])
def test_keeping_every_tube_gives_the_unpatched_output(name, config):
    make, logits = MODELS[name]
    model = make()
    with torch.no_grad():
        before = logits(model(clips()))
        ats.patch(model, config)
        after = logits(model(clips()))
    assert (before - after).abs().max() < 1e-5
    assert (ats.last_stats(model).tokens_out == POSITIONS + 1).all()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("config", [FUSE, DISTINCT], ids=["fuse", "fuse-distinct"])
def test_clips_do_not_depend_on_their_batch_mates(name, config):
    make, logits = MODELS[name]
    model = ats.patch(make(), config)
    batch = clips()
    with torch.no_grad():
        together = logits(model(batch))
        kept = ats.last_stats(model).tokens_out[:, -1]
        alone = torch.cat([logits(model(clip[None])) for clip in batch])
    assert (together - alone).abs().max() < 1e-4
    assert len(set(kept.tolist())) > 1, "kept-tube counts should differ between clips"


def test_distinct_keeps_more_tubes_and_fuse_changes_the_output():
    model = small_xvit()
    with torch.no_grad():
        outputs, kept = {}, {}
        for name, config in [("plain", ats.ATSConfig.multi_stage(0.5, first=1, depth=DEPTH, min_tokens=2)),
                             ("fuse", FUSE), ("distinct", DISTINCT)]:
            ats.patch(model, config)
            outputs[name] = model(clips())
            kept[name] = ats.last_stats(model).tokens_out[:, -1]
    assert not torch.allclose(outputs["plain"], outputs["fuse"], atol=1e-4)
    assert (kept["distinct"] >= kept["fuse"]).all() and (kept["distinct"] > kept["fuse"]).any()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("config", [FUSE, DISTINCT], ids=["fuse", "fuse-distinct"])
def test_sizes_are_summed_per_tube(name, config):
    """After the last block every clip's patch tubes hold all its positions once: sizes are whole numbers >= 1
    that sum to the positions, and fused tubes hold several."""
    make, _ = MODELS[name]
    model = ats.patch(make(), config)
    with torch.no_grad():
        model(clips())
    sizes = model._ats.pool_weights  # [B, m] each tube's size, 0 on padding
    counts = ats.last_stats(model).tokens_out[:, -1]
    live = sizes > 0
    assert torch.equal(live.sum(dim=1), counts)
    assert torch.equal(sizes[:, 1:].sum(dim=1), torch.full_like(counts, POSITIONS, dtype=sizes.dtype))
    assert torch.equal(sizes, sizes.round()) and sizes[:, 0].eq(1).all() and (sizes > 1).any()


def test_a_dropped_tube_folds_into_its_nearest_kept_tube_in_every_frame():
    """One XViT ATS block with its attention projection and MLP output zeroed returns its input tubes folded: each
    kept tube is the mean of itself and the dropped tubes whose mean over frames of the per-frame cosine of the
    head-averaged (mixed) keys is highest with it, in every frame, with the group's size."""
    model = small_xvit()
    block = model.blocks[0]
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
        x = model.embed(clips(3))  # [B, T, 1 + S, C]
        batch, _ = run_tube_blocks([XVIT.tube_parts(block)], frames_to_tubes(x), FRAMES,
                                   ats.ATSConfig(blocks={0: 0.3}, fuse=True))
        keys = block.attn.mix_qkv(block.attn.qkv(block.norm1(x.transpose(1, 2)))).transpose(1, 2)
        keys = keys[..., WIDTH:2 * WIDTH].unflatten(-1, (HEADS, -1)).mean(dim=-2)  # [B, T, n, d]
    out = batch.pad(batch.rows).unflatten(-1, (FRAMES, -1))
    sizes = batch.padded_sizes()
    for clip in range(3):
        kept = batch.source[clip, :batch.lengths[clip]]
        patches = kept[1:]
        dropped = torch.tensor([p for p in range(1, POSITIONS + 1) if p not in patches.tolist()])
        similarity = torch.stack([F.cosine_similarity(keys[clip, t, dropped, None], keys[clip, t, None, patches],
                                                      dim=-1) for t in range(FRAMES)]).mean(dim=0)
        target = patches[similarity.argmax(dim=1)]
        for slot, position in enumerate(kept.tolist()):
            group = [position] + dropped[target == position].tolist()
            expected = x[clip, :, group].mean(dim=1)  # [T, C]
            assert sizes[clip, slot] == len(group)
            assert torch.allclose(out[clip, slot], expected, atol=1e-5)
        assert len(dropped) > 0 and sizes[clip].max() > 1


def test_tube_similarity_is_the_mean_over_frames_of_per_frame_cosines():
    metric = torch.randn(2, 5, 7, 4)  # [B, T, n, d]
    unit = tube_unit_vectors(metric)
    expected = F.cosine_similarity(metric[:, :, :, None], metric[:, :, None], dim=-1).mean(dim=1)
    assert unit.shape == (2, 7, 20) and torch.allclose(unit @ unit.transpose(1, 2), expected, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_a_tube_of_size_two_attends_as_two_equal_tubes(name):
    """Proportional attention in a later block: a tube of size 2 gives every other tube what two copies of it
    give (log size on its key logit in every frame, the temporal attention within a tube unchanged)."""
    model = MODELS[name][0]()
    with torch.no_grad():
        if name == "xvit":
            parts, tubes = XVIT.tube_parts(model.blocks[1]), frames_to_tubes(model.embed(clips(2)))
        else:
            layer = TIMESFORMER.blocks(model)[1]
            parts, tubes = TIMESFORMER.tube_parts(model, layer), TIMESFORMER.embed(model, clips(2))
        doubled = torch.cat([tubes, tubes[:, 5:6]], dim=1)  # tube 5 twice
        plain = TokenBatch.from_dense(tubes)
        sizes = torch.ones(tubes.shape[:2])
        sizes[:, 5] = 2
        weighted = plain.with_rows(plain.rows, sizes.flatten())
        twice = tube_block(parts, TokenBatch.from_dense(doubled), FRAMES, None, 1, ForwardRecord()).dense()
        once = tube_block(parts, weighted, FRAMES, None, 1, ForwardRecord()).dense()
    assert (once - twice[:, :-1]).abs().max() < 1e-5
    assert not torch.allclose(once, tube_block(parts, plain, FRAMES, None, 1, ForwardRecord()).dense(), atol=1e-4)


def xvit_block_flops(n_in: int, n_out: int, ats_block: bool, similarities: int) -> int:
    """A hand count of an XViT block on one clip: a ViT block in each of T frames, C = A = 64, d = 32."""
    c = WIDTH
    per_frame = 3 * n_in * c * c + 2 * n_out * n_in * c + n_out * c * c + n_out * MLP + ats_block * n_in * c
    return FRAMES * (per_frame + similarities)


def timesformer_block_flops(n_in: int, n_out: int, ats_block: bool, similarities: int) -> int:
    """A hand count of a divided space-time block on one clip, C = A = 64, d = 32."""
    c, t = WIDTH, FRAMES
    temporal = (n_in - 1) * t * (3 * c * c + 2 * t * c + c * c + c * c)
    spatial = t * (3 * n_in * c * c + 2 * n_out * n_in * c + n_out * c * c + ats_block * n_in * c + similarities)
    return temporal + spatial + (1 + (n_out - 1) * t) * MLP


HAND_COUNTS = {  # per model: its block count, and the FLOPs outside the blocks (embedding, head)
    "xvit": (xvit_block_flops, FRAMES * POSITIONS * 64 * WIDTH + 3 * FRAMES * WIDTH ** 2 + 2 * FRAMES ** 2 * WIDTH
             + FRAMES * WIDTH ** 2 + FRAMES * MLP + WIDTH * 20),
    "timesformer": (timesformer_block_flops, FRAMES * POSITIONS * 64 * WIDTH + WIDTH * 20),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("config", [FUSE, DISTINCT], ids=["fuse", "fuse-distinct"])
def test_flops_are_counted_by_hand(name, config):
    """Per clip from its own tube counts, and ``ats.gflops`` (every sample a distinct tube); the similarities
    cost T d per pair of tubes: ``(n_in - n_out) n_out`` pairs with fuse, ``n_in^2`` with distinct."""
    make, _ = MODELS[name]
    block, outside = HAND_COUNTS[name]
    d = WIDTH // HEADS

    def similarities(n_in, n_out):
        return (n_in * n_in if config.distinct else (n_in - n_out) * n_out) * d

    model = ats.patch(make(), config)
    with torch.no_grad():
        model(clips())
    stats = ats.last_stats(model)
    for clip in range(len(stats.gflops)):
        total = outside
        for index, (n_in, n_out) in enumerate(zip(stats.tokens[clip].tolist(), stats.tokens_out[clip].tolist())):
            patched = index >= 1
            total += block(n_in, n_out, patched, similarities(n_in, n_out) if patched else 0)
        assert stats.gflops[clip].item() == pytest.approx(total / 1e9, rel=1e-6)

    bound, n = outside, POSITIONS + 1
    for index in range(DEPTH):
        n_out = n if index == 0 or config.distinct else min(n, 1 + max(n // 2, 2))
        bound += block(n, n_out, index >= 1, similarities(n, n_out) if index >= 1 else 0)
        n = n_out
    assert ats.gflops(model) == pytest.approx(bound / 1e9, rel=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_flow_through_fused_tubes(name):
    make, logits = MODELS[name]
    model = ats.patch(make().train(), DISTINCT)
    loss = logits(model(clips(4))).logsumexp(dim=-1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
