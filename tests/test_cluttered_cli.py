"""The reference ViT on cluttered Fashion-MNIST in the commands: `--model reference-cluttered`."""
import json

import pytest
import torch
from conftest import random_checkpoint

import ats
from ats.adapters import data_config
from ats.commands.cli import main
from ats.data.build import build_dataset, training_set
from ats.data.cluttered import ClutteredFashionMNIST, cluttered_test
from ats.reference import create_reference_cluttered, create_reference_model, load_reference_cluttered


@pytest.fixture
def cluttered_checkpoint(tmp_path):
    """A random-init cluttered reference ViT's state dict, saved for --checkpoint."""
    return random_checkpoint(create_reference_cluttered, tmp_path / "cluttered.pt")


@pytest.mark.slow
def test_the_trained_cluttered_model_classifies_the_test_canvases(capsys):
    """Chance is 10%; the model in checkpoints/ scores far above it with and without ATS."""
    assert main(["eval", "--model", "reference-cluttered", "--limit", "64", "--batch-size", "32", "--single-stage",
                 "108", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["top1"] > 50.0 and sampled["top1"] > 40.0 and sampled["gflops"] < unpatched["gflops"]


def test_the_cluttered_model_reads_canvases_and_the_others_do_not(fashion_train):
    model = create_reference_cluttered()
    test_set = build_dataset(None, data_config(model), limit=3)
    assert test_set[0][0].shape == (1, 56, 56)
    assert torch.equal(test_set[2][0], cluttered_test()[2][0])
    assert isinstance(training_set(fashion_train, data_config(model)), ClutteredFashionMNIST)
    assert build_dataset(None, data_config(create_reference_model()))[0][0].shape == (1, 28, 28)
    assert ats.gflops(model) == pytest.approx(ats.gflops(create_reference_model()), rel=0.02)


def test_a_missing_cluttered_checkpoint_names_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_reference.py --arch cluttered"):
        load_reference_cluttered(tmp_path / "missing.pt")


def test_eval_runs_the_cluttered_model_on_canvases(cluttered_checkpoint, capsys):
    model = ["--model", "reference-cluttered", "--checkpoint", str(cluttered_checkpoint)]
    assert main(["eval", *model, "--limit", "4", "--batch-size", "2", "--single-stage", "108", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["gflops"] == pytest.approx(ats.gflops(create_reference_cluttered()), rel=1e-4)
    assert unpatched["kept_tokens_min"] == 197 and unpatched["images"] == 4
    assert sampled["gflops"] < unpatched["gflops"] and sampled["kept_tokens_max"] <= 109


@pytest.mark.slow
def test_train_fine_tunes_the_cluttered_model_on_canvases(cluttered_checkpoint, fashion_train, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "reference-cluttered", "--checkpoint", str(cluttered_checkpoint), "--data",
                 str(fashion_train), "--limit", "8", "--batch-size", "4", "--val-limit", "4", "--epochs", "1",
                 "--multi-stage", "0.7", "--out", str(out)]) == 0
    trained = torch.load(out / "model.pt", weights_only=False)
    before = torch.load(cluttered_checkpoint, weights_only=False)
    assert not torch.equal(trained["head.weight"].float(), before["head.weight"].float())
