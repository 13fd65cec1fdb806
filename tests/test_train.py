import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import worker_pid

from ats.commands.cli import main


def train_argv(checkpoint, data, out, *extra):
    return ["train", "--checkpoint", str(checkpoint), "--data", str(data), "--limit", "32", "--batch-size", "8",
            "--val-limit", "20", "--multi-stage", "0.72", "--out", str(out), *extra]


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
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

    export = tmp_path / "exported.pt"
    assert main(train_argv(checkpoint, fashion_train, out, "--epochs", "2", "--resume", "--export", str(export))) == 0
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["config"] == "rho=0.72 @ blocks 3..11"
    exported = torch.load(export, weights_only=True)
    assert all(exported[name].dtype == torch.float16 and torch.equal(exported[name], tensor.half())
               for name, tensor in state["model"].items())


@pytest.mark.slow
def test_training_evit_alone_and_stacked_with_ats(checkpoint, fashion_train, tmp_path):
    base = ["train", "--checkpoint", str(checkpoint), "--data", str(fashion_train), "--limit", "16",
            "--batch-size", "8", "--val-limit", "10", "--epochs", "1", "--evit", "0.7"]
    assert main([*base, "--out", str(tmp_path / "evit")]) == 0
    evit = log_lines(tmp_path / "evit")[0]
    assert torch.load(tmp_path / "evit" / "checkpoint.pt", weights_only=False)["config"] == \
        "EViT keep_rate=0.7 @ blocks 3, 6, 9"
    stacked_argv = [*base, "--blocks", "4-5:0.7,7-8:0.7,10-11:0.7", "--stochastic", "--out", str(tmp_path / "both")]
    stacked_argv[2] = str(tmp_path / "evit" / "model.pt")
    assert main(stacked_argv) == 0
    both = log_lines(tmp_path / "both")[0]
    assert 0.2 < evit["gflops"] < 0.23 and both["gflops"] < evit["gflops"]


@pytest.mark.parametrize("extra, message", [
    (["--evit", "0.7", "--multi-stage", "0.7"], "both claim block 3"),
    (["--evit", "0.7", "--evit", "0.5", "--evit-blocks", "1,2"], "training takes one config, got 2"),
    (["--epochs", "0"], "--epochs"),
    (["--single-stage", "108"], "training takes one config"),
    (["--data", "/nonexistent/images"], "does not exist"),
    (["--resume"], "--resume"),
])
def test_training_errors_name_the_problem(extra, message, checkpoint, fashion_train, tmp_path, capsys):
    assert main(train_argv(checkpoint, fashion_train, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("module", [["ats.train"], ["ats", "train"]], ids=["-m ats.train", "-m ats train"])
@pytest.mark.slow
def test_two_processes_keep_identical_replicas(module, checkpoint, fashion_train, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", *module, *train_argv(checkpoint, fashion_train, out, "--epochs", "1", "--limit", "64")[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    checksums = json.loads(re.search(r"replica checksums: (\[.*\])", result.stderr).group(1))
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [line["epoch"] for line in log_lines(out)] == [0]  # rank 0 alone writes the log
    assert (out / "checkpoint.pt").is_file()


def resumable_argv(checkpoint, data, out):
    """Two epochs of four steps, a checkpoint after every step."""
    return train_argv(checkpoint, data, out, "--epochs", "2", "--checkpoint-every", "1", "--stochastic",
                      "--val-limit", "8")[1:]


def kill_after_first_checkpoint(command, out, env) -> int:
    """Start ``command``, SIGKILL its process group once OUT/checkpoint.pt exists, return its exit code."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    return process.wait(timeout=60)


def final_weights(out):
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.slow
def test_a_run_killed_at_any_moment_resumes_to_the_same_weights(processes, checkpoint, fashion_train, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = subprocess.run([*launcher, "-m", "ats", "train", *resumable_argv(checkpoint, fashion_train, whole)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]

    command = [*launcher, "-m", "ats", "train", *resumable_argv(checkpoint, fashion_train, killed)]
    assert kill_after_first_checkpoint(command, killed, env) == -signal.SIGKILL
    state = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert (state["progress"]["epoch"], state["progress"]["step"]) < (1, 4)  # killed before the end
    assert len(state["rng"]) == processes
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, weights = final_weights(whole), final_weights(killed)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    assert log_lines(killed)[-1]["train_loss"] == log_lines(whole)[-1]["train_loss"]


@pytest.mark.slow
def test_a_dead_worker_stops_the_run_naming_its_rank_and_the_run_resumes(checkpoint, fashion_train, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATS_TEST_RUN": "1"}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ats", "train", *resumable_argv(checkpoint, fashion_train, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(worker_pid(1, process.pid), signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", stderr) and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [line["epoch"] for line in log_lines(out)][-1] == 1


def test_resuming_with_another_process_count_is_refused():
    from ats.commands.resume import restore_rng_states, rng_states

    with pytest.raises(ValueError, match=r"written by 2 training process\(es\) and this run has 1; resume with"):
        restore_rng_states(rng_states(1) * 2, rank=0, world_size=1)
