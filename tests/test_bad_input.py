"""Unusable images are skipped, named and counted; past --max-bad a run stops; non-finite values are reported."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import contrasted_images, tiny_vit
from PIL import Image
from test_datasets import write_image_folder

from ats.commands.cli import main
from ats.commands.evaluate import evaluate
from ats.data.skipped import SkippedImage, UsableImages, collate_usable

BAD = ("truncated.jpg", "empty.jpg", "text.png")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Nine good 28x28 images in three classes, and three bad ones: a truncated JPEG, an empty file and a
    text file named .png."""
    root = write_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=3, size=(28, 28))
    pixels = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(root / "a" / "whole.jpg")
    data = (root / "a" / "whole.jpg").read_bytes()
    (root / "a" / "whole.jpg").unlink()
    (root / "a" / BAD[0]).write_bytes(data[:len(data) // 2])
    (root / "b" / BAD[1]).write_bytes(b"")
    (root / "c" / BAD[2]).write_text("this is not an image")
    return root


def test_eval_and_compare_skip_and_name_unusable_images(folder, capsys):
    assert main(["eval", "--data", str(folder), "--multi-stage", "1.0", "--repeats", "1", "--max-bad", "0.3",
                 "--workers", "1", "--json"]) == 0  # one worker process: the skipped names cross a process boundary
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(row["images"], row["skipped"]) for row in rows] == [(9, 3), (9, 3)]
    for name in BAD:
        assert sum(name in line and "skipped" in line for line in captured.err.splitlines()) == 1
    assert "9 images evaluated, 3 skipped as unusable" in captured.err
    assert main(["compare", "--data", str(folder), "--rho", "1.0", "--min-kept", "0.9", "--distinct", "0.95",
                 "--merge-r", "8", "--evit", "0.7", "--saint", "0.9", "--repeats", "1", "--max-bad", "0.3", "--plot",
                 str(folder.parent / "frontier.png"), "--json"]) == 0
    assert {row["skipped"] for row in json.loads(capsys.readouterr().out)} == {3}


@pytest.mark.slow
def test_calibrate_and_train_skip_unusable_images(folder, tmp_path, capsys):
    assert main(["calibrate", "--data", str(folder), "--fraction", "0.7", "--method", "evit", "--max-bad", "0.3",
                 "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["images"], found["skipped"]) == (9, 3)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--val-data", str(folder), "--multi-stage", "0.9", "--epochs", "1",
                 "--batch-size", "4", "--max-bad", "0.3", "--out", str(out)]) == 0
    record = json.loads((out / "log.jsonl").read_text())
    assert record["skipped"] == 3 and record["val_skipped"] == 3


@pytest.mark.parametrize("command", [["eval", "--repeats", "1"], ["calibrate", "--fraction", "0.7"]])
def test_more_unusable_images_than_max_bad_stop_the_run(command, folder, capsys):
    assert main([*command, "--data", str(folder)]) == 2  # 3 of 12 is over the default 0.01
    error = capsys.readouterr().err
    assert "of the 12 images could not be used, more than --max-bad 0.01" in error


def test_images_with_non_finite_pixels_are_skipped():
    class Folder:
        samples = [("fine.png", 0), ("nan.png", 1)]

        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.full((1, 4, 4), float("nan") if index else 0.5), index

    batch = collate_usable([UsableImages(Folder())[0], UsableImages(Folder())[1]])
    images, labels = batch
    assert images.shape == (1, 1, 4, 4) and labels.tolist() == [0]
    assert batch.skipped == [SkippedImage("nan.png", "non-finite pixel values after preprocessing")]


def test_non_finite_outputs_are_reported_and_count_as_errors(capsys):
    model = tiny_vit()
    images = contrasted_images()
    with torch.no_grad():
        labels = model(images).argmax(-1)
        model.head.bias[0] = float("nan")
    rows = evaluate(model, [(images, labels)], [None], repeats=1, progress=False)
    assert rows[0].nonfinite == 8 and rows[0].top1 == 0.0
    assert "8 of 8 images gave non-finite logits under unpatched" in capsys.readouterr().err
