"""scripts/train_reference.py run small: what seeds the training canvases, and resuming."""
import json

import torch
from conftest import load_script

from ats.data.cluttered import cluttered_test
from ats.data.fashion_mnist import bundled_test_set

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
