import torch

from ats.merging import bipartite_soft_matching, cosine_similarity, fold, keep_distinct, nearest_kept
from ats.packing import TokenBatch


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
    x = torch.tensor([[[1.0], [3.0], [10.0]]])
    sizes = torch.tensor([[1.0, 3.0, 2.0]])
    target = torch.tensor([[1, 1, 2]])
    folded, new_sizes = fold(x, sizes, target)
    assert folded[0, 1, 0] == (1 * 1 + 3 * 3) / 4 and folded[0, 2, 0] == 10
    assert new_sizes[0, 1:].tolist() == [4.0, 2.0]


def test_nearest_kept_sends_dropped_tokens_to_their_closest_kept_token():
    metric = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    keep = torch.tensor([[True, False, True, False]])
    movable = torch.ones(1, 4, dtype=torch.bool)
    assert nearest_kept(cosine_similarity(metric), keep, movable).tolist() == [[0, 0, 2, 2]]


def test_keep_distinct_keeps_one_token_of_each_unrepresented_group():
    # 1 resembles kept 0; 2, 3 and 4 resemble each other but not 0, and 3 scores highest among them
    metric = torch.tensor([[[1.0, 0.0], [0.95, 0.05], [0.1, 1.0], [0.0, 1.0], [0.05, 1.0], [0.7, 0.7]]])
    keep = torch.tensor([[True, False, False, False, False, False]])
    movable = torch.tensor([[True, True, True, True, True, False]])
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.1, 0.0]])
    similarity = cosine_similarity(metric)
    kept = keep_distinct(similarity, keep, movable, scores, threshold=0.9)
    assert kept.tolist() == [[True, False, False, True, False, False]]
    assert nearest_kept(similarity, kept, movable).tolist() == [[0, 0, 3, 3, 3, 5]]
    assert keep_distinct(similarity, keep, movable, scores, threshold=1.0)[0, :5].all()
    assert torch.equal(keep_distinct(similarity, keep, movable, scores, threshold=0.0), keep)


def test_bipartite_matching_merges_r_tokens_of_set_a_into_set_b():
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [1.0, 1.0]]])
    movable = torch.tensor([[False, True, True, True, True]])
    target = bipartite_soft_matching(metric, 1, movable)
    # A = positions 1, 3 (even ranks), B = 2, 4; position 1 matches 2 best
    assert target.tolist() == [[0, 2, 2, 3, 4]]
    assert (bipartite_soft_matching(metric, 5, movable) != torch.arange(5)).sum() == 2
