"""The cluttered segmentation benchmark (issue 51): masks from the canvases, the metric, the bundled head and
``ats segment``."""
import json

import torch

import ats
from ats.commands.cli import main
from ats.data.cluttered import DEFAULT_CANVAS_SPEC, target_box
from ats.data.cluttered_segmentation import (
    BACKGROUND,
    class_iou,
    cluttered_segmentation_test,
    confusion,
    mean_iou,
    patch_labels,
    target_pixels,
)
from ats.reference import load_reference_cluttered, load_reference_segmentation_head


def test_patch_labels_mark_the_target_garment_and_nothing_else():
    data = cluttered_segmentation_test()
    image, mask = data[3]
    label = int(data.labels[3])
    top, left, height, width = target_box(3, data.seed, DEFAULT_CANVAS_SPEC)
    pixels = target_pixels(data.images, 3, DEFAULT_CANVAS_SPEC, data.seed)
    assert pixels.any() and not pixels[:top].any() and not pixels[:, :left].any()
    assert not pixels[top + height:].any() and not pixels[:, left + width:].any()
    assert image.shape == (1, 56, 56) and mask.shape == (14, 14)
    assert set(mask.unique().tolist()) == {label, BACKGROUND}
    rows, columns = (mask == label).nonzero().unbind(1)
    assert rows.min() >= top // 4 and rows.max() <= (top + height - 1) // 4
    assert columns.min() >= left // 4 and columns.max() <= (left + width - 1) // 4
    half = torch.zeros(8, 8, dtype=torch.bool)
    half[:2, :4] = True  # half of patch (0, 0), a quarter of patch (0, 1)
    half[:1, 4:] = True
    assert patch_labels(half, 3).tolist() == [[3, BACKGROUND], [BACKGROUND, BACKGROUND]]


def test_mean_iou_counts_each_class_seen_or_predicted():
    target = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 1])
    matrix = confusion(predicted, target, classes=4)
    assert matrix.sum() == 5 and matrix[0, 1] == 1
    assert torch.allclose(class_iou(matrix)[:3], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.isnan(class_iou(matrix)[3])
    assert abs(mean_iou(matrix) - 100 / 3) < 1e-9


def test_the_bundled_head_segments_the_unpatched_and_the_restored_maps():
    data = cluttered_segmentation_test()
    images = torch.stack([data[index][0] for index in range(8)])
    masks = torch.stack([data[index][1] for index in range(8)])
    model, head = load_reference_cluttered(), load_reference_segmentation_head()
    with torch.no_grad():
        unpatched = head(model.forward_features(images)).argmax(dim=1)
        ats.patch(model, ats.ATSConfig.recommended(restore=True))
        restored = model.forward_features(images)
        patched = head(restored).argmax(dim=1)
    assert restored.shape == (8, 197, 96)
    assert ats.last_stats(model).tokens_out[:, -1].max() < 197
    assert (unpatched == masks).float().mean() > 0.9 and (patched == masks).float().mean() > 0.85
    assert mean_iou(confusion(unpatched, masks)) > 40


def test_segment_command_reports_each_rule_and_merging(capsys):
    assert main(["segment", "--limit", "4", "--batch-size", "4", "--distinct", "0.95", "--rules", "own", "mix",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows] == ["unpatched", "ATSConfig", "ATSConfig", "MergeConfig"]
    assert [row["rule"] for row in rows] == [None, "own", "mix", "fuse"]
    unpatched, own, mix, merge = rows
    assert unpatched["saved"] == 0 and own["saved"] > 30 and own["gflops"] == mix["gflops"]
    assert abs(merge["gflops"] - own["gflops"]) < 0.01 and all(row["images"] == 4 for row in rows)
