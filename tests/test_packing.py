import torch

import ats
from ats.merging import (
    bipartite_soft_matching,
    fold,
    gather_tokens,
    keep_distinct,
    nearest_kept,
    positions_of,
    unit_vectors,
)
from ats.packing import TokenBatch, _kept_first


def test_with_lengths_takes_each_images_first_tokens_and_pads_the_rest():
    x = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    for static in (False, True):
        batch = TokenBatch.from_dense(x, static=static).with_lengths(torch.tensor([4, 2, 3]))
        assert batch.width == 4 and batch.lengths.tolist() == [4, 2, 3] and not batch.full
        assert batch.source.tolist() == [[0, 1, 2, 3], [0, 1, -1, -1], [0, 1, 2, -1]]
        padded = batch.pad(batch.rows) * batch.position_mask[..., None]
        assert torch.equal(padded, x * batch.position_mask[..., None])
        assert batch.live_tokens.tolist() == [4, 2, 3] and batch.common_live_tokens is None
    whole = TokenBatch.from_dense(x).with_lengths(torch.tensor([4, 4, 4]))
    assert whole.full and whole.in_source_order and torch.equal(whole.dense(), x)


def test_select_packs_kept_tokens_to_the_front_in_order():
    x = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    batch = TokenBatch.from_dense(x)
    keep = torch.tensor([[True, False, True, True], [True, False, False, True]])
    packed, rows_from = batch.select(keep)
    assert packed.width == 3 and packed.lengths.tolist() == [3, 2]
    assert packed.source.tolist() == [[0, 2, 3], [0, 3, -1]]
    assert torch.equal(packed.pad(packed.rows)[0], x[0, [0, 2, 3]])
    assert torch.equal(packed.pad(packed.rows)[1, :2], x[1, [0, 3]])
    assert packed.pad(packed.rows)[1, 2].abs().sum() == 0
    assert rows_from.tolist() == [0, 2, 3, 4, 7]
    assert packed.key_mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(packed.unpad(packed.pad(packed.rows)), packed.rows)
    assert packed.image_of_row.tolist() == [0, 0, 0, 1, 1]


def test_little_padding_keeps_the_padded_layout():
    x = torch.randn(2, 20, 2)
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, 19] = False  # 1 of 40 positions is padding
    packed, _ = TokenBatch.from_dense(x).select(keep)
    assert packed.row_index is None and packed.rows.shape[0] == 40 and not packed.full
    assert packed.key_mask[1].tolist() == [True] * 19 + [False]
    keep[1, 10:] = False  # 10 of 40 positions are padding
    packed, _ = TokenBatch.from_dense(x).select(keep)
    assert packed.row_index is not None and packed.rows.shape[0] == 30


def test_common_live_tokens_only_while_every_image_has_as_many():
    batch = TokenBatch.from_dense(torch.randn(3, 5, 2))
    assert batch.common_live_tokens == 5 and batch.patch_positions(1).tolist() == [[False] + [True] * 4] * 3
    uneven, _ = batch.select(torch.tensor([[True] * 5, [True, True, False, True, False], [True] * 5]))
    assert uneven.common_live_tokens is None and uneven.live_tokens.tolist() == [5, 3, 5]
    assert uneven.patch_positions(1).tolist()[1] == [False, True, True, False, False]
    even, _ = batch.select(torch.tensor([[True, False, True, True, True]] * 3))
    assert even.common_live_tokens == 4
    even.cls_live = torch.tensor([True, False, True])
    assert even.common_live_tokens is None


def test_padded_packing_keeps_every_position():
    x = torch.randn(2, 4, 2)
    keep = torch.tensor([[True, True, True, True], [True, False, False, True]])
    packed, _ = TokenBatch.from_dense(x, keep_padding=True).select(keep)
    assert packed.rows.shape[0] == 8 and packed.row_index is None and not packed.full
    assert packed.key_mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_sizes_become_a_log_bias_on_the_keys():
    batch = TokenBatch.from_dense(torch.randn(1, 3, 2)).with_rows(torch.randn(3, 2), torch.tensor([1.0, 2.0, 4.0]))
    bias = batch.attention_mask[0, 0, 0]
    assert torch.allclose(bias, torch.log(torch.tensor([1.0, 2.0, 4.0])))
    assert not batch.is_dense


def test_fold_averages_groups_by_size():
    x = torch.tensor([[1.0], [3.0], [10.0]])
    sizes = torch.tensor([1.0, 3.0, 2.0])
    target = torch.tensor([1, 1, 2])
    folded, new_sizes = fold(x, sizes, target)
    assert folded[1, 0] == (1 * 1 + 3 * 3) / 4 and folded[2, 0] == 10
    assert new_sizes.tolist() == [0.0, 4.0, 2.0]  # token 0 moved away
    for dtype in (torch.float16, torch.bfloat16):  # the token that moved away holds zeros, not 0 / 0
        folded, _ = fold(x.to(dtype), sizes.to(dtype), target)
        assert folded[0, 0] == 0 and folded[1, 0] == 2.5


def test_rows_at_maps_each_rows_target_position_to_its_row():
    x = torch.arange(8.0).reshape(2, 4, 1)
    keep = torch.tensor([[True, False, True, True], [False, True, True, False]])
    for keep_padding in (False, True):
        packed, _ = TokenBatch.from_dense(x, keep_padding=keep_padding).select(keep)
        # packed: image 0 holds tokens 0, 2, 3 and image 1 tokens 5, 6; image 0 sends positions 0 and 1 to
        # position 2 (token 3) and 2 to 0 (token 0); image 1 sends both its positions to 1 (token 6)
        target = torch.tensor([[2, 2, 0], [1, 1, 2]])
        moved = packed.pad(packed.rows.index_select(0, packed.rows_at(target)))[:, :, 0]
        valid = packed.position_mask
        assert moved[valid].tolist() == [3.0, 3.0, 0.0, 6.0, 6.0]


def test_nearest_kept_sends_dropped_tokens_to_their_closest_kept_token():
    unit = unit_vectors(torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]]))
    keep = torch.tensor([[True, False, True, False]])
    movable = torch.ones(1, 4, dtype=torch.bool)
    assert nearest_kept(unit, keep, movable).tolist() == [[0, 0, 2, 2]]


def test_keep_distinct_keeps_one_token_of_each_unrepresented_group():
    # 1 resembles kept 0; 2, 3 and 4 resemble each other but not 0, and 3 scores highest among them
    unit = unit_vectors(torch.tensor([[[1.0, 0.0], [0.95, 0.05], [0.1, 1.0], [0.0, 1.0], [0.05, 1.0], [0.7, 0.7]]]))
    keep = torch.tensor([[True, False, False, False, False, False]])
    movable = torch.tensor([[True, True, True, True, True, False]])
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.1, 0.0]])
    kept = keep_distinct(unit, keep, movable, scores, threshold=0.9)
    assert kept.tolist() == [[True, False, False, True, False, False]]
    assert nearest_kept(unit, kept, movable).tolist() == [[0, 0, 3, 3, 3, 5]]
    assert keep_distinct(unit, keep, movable, scores, threshold=1.0)[0, :5].all()
    assert torch.equal(keep_distinct(unit, keep, movable, scores, threshold=0.0), keep)


def test_positions_of_a_mask_in_order_and_the_tokens_there():
    x = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    index, valid = positions_of(mask)
    assert index.tolist() == [[1, 2], [0, 1]] and valid.tolist() == [[True, True], [True, False]]
    assert torch.equal(gather_tokens(x, index), x.gather(1, index[..., None].expand(-1, -1, 2)))
    assert positions_of(torch.zeros(2, 3, dtype=torch.bool))[0].shape == (2, 0)


def test_distinct_ties_go_to_the_later_position_and_images_keeping_nothing_keep_one_of_a_group():
    unit = unit_vectors(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]).expand(2, 3, 2))
    keep = torch.tensor([[False, False, True], [False, False, False]])
    scores = torch.tensor([[0.3, 0.3, 0.1], [0.2, 0.1, 0.1]])
    movable = torch.ones(2, 3, dtype=torch.bool)
    kept = keep_distinct(unit, keep, movable, scores, threshold=0.9)
    assert kept.tolist() == [[False, True, True], [True, False, True]]
    assert nearest_kept(unit, kept, movable).tolist() == [[1, 1, 2], [0, 0, 2]]
    assert nearest_kept(unit, keep, movable)[1].tolist() == [0, 1, 2]  # nothing kept: nothing moves


def test_bipartite_matching_merges_r_tokens_of_set_a_into_set_b():
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])
    movable = torch.tensor([[False, True, True, True, True, True]])
    target, side_b = bipartite_soft_matching(metric, 1, movable)
    # as in ToMe: A = even positions 2, 4 (0 is the class token), B = odd positions 1, 3, 5;
    # position 2 matches 1 best (cosine 0.999), position 4 matches 1, 3 and 5 equally (0.707)
    assert side_b.tolist() == [[False, True, False, True, False, True]]
    assert target.tolist() == [[0, 1, 1, 3, 4, 5]]
    # at most half the movable tokens merge (ToMe: (tokens - protected) // 2): 5 // 2 = 2
    assert (bipartite_soft_matching(metric, 5, movable)[0] != torch.arange(6)).sum() == 2


def test_merging_blocks_order_tokens_as_tome_does(model, images):
    """After a merging block: the class token, the unmerged set-A tokens, then set B (ToMe's order)."""
    ats.patch(model, ats.MergeConfig(r=8, first=2))
    with torch.no_grad():
        model(images)
    stats = ats.last_stats(model)
    source = stats.sampling[2].source_after[0]
    assert source[0] == 0 and len(source) == 65 - 8
    unmerged_a, side_b = source[1:1 + 32 - 8], source[1 + 32 - 8:]
    assert (unmerged_a % 2 == 0).all() and (unmerged_a.diff() > 0).all()
    assert torch.equal(side_b, torch.arange(1, 65, 2))
    assert stats.tokens_out[0, 2:].tolist() == [57, 49, 41, 33]


def test_select_puts_the_positions_marked_last_after_the_others():
    batch = TokenBatch.from_dense(torch.randn(2, 5, 3))
    kept, _ = batch.select(torch.tensor([[True, True, False, True, True], [True, False, True, True, False]]),
                           last=torch.tensor([[False, True, False, False, False], [False] * 5]))
    assert kept.source.tolist() == [[0, 3, 4, 1], [0, 2, 3, -1]]
    assert kept.last_rows.tolist() == [3, 6]


def test_the_packing_order_is_a_stable_sort_of_kept_then_last():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        keep, last = torch.rand(4, 30, generator=generator) < 0.5, torch.rand(4, 30, generator=generator) < 0.5
        rank = keep.to(torch.uint8) * 2 - (keep & last).to(torch.uint8)
        assert torch.equal(_kept_first(keep, last), rank.sort(dim=1, descending=True, stable=True).indices)
        assert torch.equal(_kept_first(keep, None), keep.sort(dim=1, descending=True, stable=True).indices)
