"""The bundled reference CvT in the commands: `--model reference-cvt`, `--keep-all`."""
import json

import pytest
import torch

import ats
from ats.commands.cli import main
from ats.reference import load_reference_cvt

pytestmark = pytest.mark.filterwarnings("ignore:CvT. blocks")


def test_eval_runs_the_bundled_cvt_unpatched_linear_and_with_ats(capsys):
    assert main(["eval", "--model", "reference-cvt", "--limit", "48", "--keep-all", "0", "--blocks", "0-8:0.72",
                 "--json"]) == 0
    unpatched, keep_all, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["config"] == "unpatched" and keep_all["method"] == "keep-all" and sampled["method"] == "ats"
    assert unpatched["gflops"] == pytest.approx(ats.gflops(load_reference_cvt()), rel=1e-4)
    assert keep_all["gflops"] > unpatched["gflops"]  # every token is a key without the strided convolutions
    assert sampled["gflops"] < unpatched["gflops"]
    assert unpatched["top1"] > 70.0  # a trained model, not random weights
    assert sampled["kept_tokens_max"] < 197 == keep_all["kept_tokens_min"]


@pytest.mark.slow
def test_train_takes_keep_all_as_its_config(fashion_train, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "reference-cvt", "--data", str(fashion_train), "--limit", "16", "--batch-size",
                 "8", "--val-limit", "8", "--epochs", "1", "--keep-all", "0", "--out", str(out)]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["config"] == "keep all"
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["gflops"] == pytest.approx(0.3453, abs=1e-4)
