"""The reference XViT in the commands: `--model reference-xvit` on moving-garment clips."""
import json

import pytest
import torch
from conftest import random_checkpoint

import ats
from ats.commands.cli import main
from ats.data.moving_garments import MOVING_GARMENT_CLASSES
from ats.reference import create_reference_xvit


@pytest.fixture
def xvit_checkpoint(tmp_path):
    """A random-init reference XViT's state dict, saved for --checkpoint."""
    return random_checkpoint(create_reference_xvit, tmp_path / "xvit.pt")


def test_the_bundled_xvit_classifies_the_test_clips(capsys):
    """Chance is 5% (20 classes); the bundled XViT scores 68.8% on these 64 clips, 64.1% with ATS."""
    assert main(["eval", "--model", "reference-xvit", "--limit", "64", "--batch-size", "32", "--blocks", "3-7:1.0",
                 "--min-kept", "26", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["top1"] > 50.0 and sampled["top1"] > 50.0
    assert sampled["gflops"] < 0.7 * unpatched["gflops"] and sampled["kept_tokens_max"] == 27


def test_eval_and_bench_run_the_xvit_on_test_clips(xvit_checkpoint, capsys):
    model = ["--model", "reference-xvit", "--checkpoint", str(xvit_checkpoint)]
    assert main(["eval", *model, "--limit", "4", "--batch-size", "2", "--blocks", "3-7:0.5", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["gflops"] == pytest.approx(ats.gflops(create_reference_xvit()), rel=1e-4)
    assert unpatched["kept_tokens_min"] == 65 and unpatched["images"] == 4  # 64 positions and the class token
    assert sampled["gflops"] < 0.8 * unpatched["gflops"] and sampled["tokens_per_block"][:3] == [65.0] * 3
    assert main(["bench", *model, "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--blocks", "3-7:0.5",
                 "--json"]) == 0
    timed = json.loads(capsys.readouterr().out)
    assert timed[1]["gflops"] < 0.8 * timed[0]["gflops"] and timed[1]["throughput"] > 0


@pytest.mark.slow
def test_train_fine_tunes_the_xvit_with_ats(xvit_checkpoint, fashion_train, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "reference-xvit", "--checkpoint", str(xvit_checkpoint), "--data",
                 str(fashion_train), "--limit", "8", "--batch-size", "4", "--val-limit", "4", "--epochs", "1",
                 "--blocks", "3-7:0.7", "--out", str(out)]) == 0
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["gflops"] < ats.gflops(create_reference_xvit())
    trained = torch.load(out / "model.pt", weights_only=False)
    before = torch.load(xvit_checkpoint, weights_only=False)
    assert not torch.equal(trained["head.weight"].float(), before["head.weight"].float())


def test_visualize_draws_the_xvit_tubes(xvit_checkpoint, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["visualize", "--model", "reference-xvit", "--checkpoint", str(xvit_checkpoint), "--num-images",
                 "1", "--blocks", "3-7:0.6", "--out", str(out), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    kept = [entry["kept_per_block"][str(block)] for block in range(3, 8)]
    assert kept == sorted(kept, reverse=True) and kept[-1] < 64
    assert entry["label"] in MOVING_GARMENT_CLASSES and (out / entry["path"].split("/")[-1]).is_file()


def test_a_missing_xvit_checkpoint_names_the_training_command(tmp_path, capsys):
    assert main(["eval", "--model", "reference-xvit", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
