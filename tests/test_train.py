import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ats.cli import main


def train_argv(checkpoint, data, out, *extra):
    return ["train", "--checkpoint", str(checkpoint), "--data", str(data), "--limit", "32", "--batch-size", "8",
            "--val-limit", "20", "--multi-stage", "0.72", "--out", str(out), *extra]


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_writes_checkpoints_and_resumes(checkpoint, fashion_train, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(checkpoint, fashion_train, out, "--epochs", "1")) == 0
    first = log_lines(out)
    assert [line["epoch"] for line in first] == [0]
    assert {"train_loss", "lr", "top1", "gflops", "seconds"} <= set(first[0])
    assert first[0]["gflops"] < 0.3  # the patched config's mean GFLOPs, below the unpatched 0.35
    trained = torch.load(out / "model.pt", weights_only=True)
    initial = torch.load(checkpoint, weights_only=True)
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)

    assert main(train_argv(checkpoint, fashion_train, out, "--epochs", "2", "--resume")) == 0
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["config"] == "rho=0.72 @ blocks 3..11"


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs"),
    (["--single-stage", "108"], "one ATS config"),
    (["--data", "/nonexistent/images"], "does not exist"),
    (["--resume"], "--resume"),
])
def test_training_errors_name_the_problem(extra, message, checkpoint, fashion_train, tmp_path, capsys):
    assert main(train_argv(checkpoint, fashion_train, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


def test_two_processes_keep_identical_replicas(checkpoint, fashion_train, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ats.train", *train_argv(checkpoint, fashion_train, out, "--epochs", "1", "--limit", "64")[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    checksums = json.loads(re.search(r"replica checksums: (\[.*\])", result.stderr).group(1))
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [line["epoch"] for line in log_lines(out)] == [0]  # rank 0 alone writes the log
    assert (out / "checkpoint.pt").is_file()
