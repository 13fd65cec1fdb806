"""scripts/train_reference.py run small: what seeds the training canvases, resuming, and the video options."""
import json

import pytest
import torch
from conftest import load_script

from ats.data.cluttered import cluttered_test
from ats.data.fashion_mnist import bundled_test_set
from ats.data.moving_garments import ClipSpec, split_labels

THREADS = str(torch.get_num_threads())  # the script sets its --threads for the whole process


def test_canvases_are_rendered_with_1000_seed_plus_epoch(monkeypatch, tmp_path):
    """--seed 0 renders epoch e's canvases with seed e (the runs in docs/reference-model.md); another --seed,
    for a further phase from a checkpoint, draws canvases no earlier epoch saw."""
    script = load_script("train_reference")
    monkeypatch.setattr(script, "fashion_mnist_train", bundled_test_set)  # no Debian package needed
    seeds = []

    def render_canvas(*args, **kwargs):
        seeds.append(kwargs.get("seed", args[4] if len(args) > 4 else 0))
        return script_render(*args, **kwargs)

    def train(seed: int) -> None:
        script.main(["--arch", "cluttered", "--img-size", "28", "--epochs", "2", "--limit", "4", "--batch-size", "4",
                     "--test-limit", "2", "--threads", THREADS, "--seed", str(seed), "--out-dir",
                     str(tmp_path / f"seed{seed}")])

    script_render = script.render_canvas
    monkeypatch.setattr(script, "render_canvas", render_canvas)
    for seed in (0, 1):
        train(seed)
        log = (tmp_path / f"seed{seed}" / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in log] == [0, 1]
    test_seed = cluttered_test().seed
    assert [seed for seed in seeds if seed != test_seed] == [0] * 4 + [1] * 4 + [1000] * 4 + [1001] * 4

    seeds.clear()  # the same command again resumes after the last epoch: nothing more to train
    train(1)
    assert [seed for seed in seeds if seed != test_seed] == []


def test_reverse_twins_are_the_clips_played_backwards_with_the_direction_flipped(monkeypatch):
    """--reverse-twins: each clip is followed (in the second half of the batch) by its frames in reverse order,
    labelled with the same garment and the other direction, and that label is the twin's true motion."""
    script = load_script("train_reference")
    monkeypatch.setattr(script, "fashion_mnist_train", bundled_test_set)
    data = script.ClipData(ClipSpec(clutter=0), limit=16, test_limit=2, reverse_twins=True)
    clips, labels = data.batch(torch.arange(6), render_seed=5, generator=torch.Generator())
    assert clips.shape == (12, 8, 1, 64, 64) and labels.shape == (12,)
    torch.testing.assert_close(clips[6:], clips[:6].flip(1), rtol=0, atol=0)
    garment, direction = split_labels(labels)
    assert torch.equal(garment[6:], garment[:6]) and torch.equal(direction[6:], 1 - direction[:6])
    bright = (clips > clips.amin()).float()[:, :, 0]  # the garment (no clutter), [N, T, H, W]
    columns = torch.arange(64, dtype=torch.float32)
    centre = (bright.sum(dim=2) * columns).sum(dim=-1) / bright.sum(dim=(2, 3))  # [N, T]
    assert torch.equal((centre[:, -1] > centre[:, 0]).long(), direction)

    plain = script.ClipData(ClipSpec(clutter=0), limit=16, test_limit=2)
    clips_plain, labels_plain = plain.batch(torch.arange(6), render_seed=5, generator=torch.Generator())
    assert torch.equal(clips_plain, clips[:6]) and torch.equal(labels_plain, labels[:6])


def test_time_sincos_sets_the_timesformer_time_embeddings(monkeypatch, tmp_path):
    """--time-sincos A replaces the TimeSformer's time embeddings (zeros at initialisation) by A times the
    sinusoid table before training; other architectures refuse it."""
    script = load_script("train_reference")
    table = script.sincos_table(8, 64)
    assert table.shape == (8, 64)
    assert torch.equal(table[0], torch.tensor([0.0, 1.0] * 32))  # sin 0, cos 0
    assert torch.allclose(table[3, :2], torch.stack([torch.tensor(3.0).sin(), torch.tensor(3.0).cos()]))
    assert (torch.cdist(table, table) + torch.eye(8)).min() > 0.5  # every frame its own vector

    monkeypatch.setattr(script, "fashion_mnist_train", bundled_test_set)
    started = {}
    create = script.create

    def first_forward(module, inputs) -> None:
        started.setdefault("time", module.timesformer.embeddings.time_embeddings.detach().clone())

    def created(*args):
        model = create(*args)
        model.register_forward_pre_hook(first_forward)
        return model

    monkeypatch.setattr(script, "create", created)
    script.main(["--arch", "video", "--time-sincos", "0.5", "--reverse-twins", "--epochs", "1", "--limit", "2",
                 "--batch-size", "1", "--test-limit", "2", "--threads", THREADS, "--out-dir", str(tmp_path)])
    torch.testing.assert_close(started["time"][0], 0.5 * table)
    with pytest.raises(SystemExit, match="--arch video"):
        script.main(["--arch", "xvit", "--time-sincos", "0.5", "--out-dir", str(tmp_path / "xvit")])
    with pytest.raises(SystemExit, match="video models"):
        script.main(["--arch", "vit", "--reverse-twins", "--out-dir", str(tmp_path / "vit")])
