"""eval, compare and calibrate under torchrun: two CPU processes (gloo) give the rows one process gives."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import worker_pid

from ats.commands.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ats"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_process(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def two_processes(argv):
    result = subprocess.run([*TORCHRUN, *argv], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def without_throughput(rows):
    return [{key: value for key, value in row.items() if key != "throughput"} for row in rows]


@pytest.mark.slow
def test_eval_on_two_processes_gives_one_processs_rows(capsys):
    argv = ["eval", "--limit", "301", "--batch-size", "50", "--repeats", "1", "--json"]  # 7 batches, the last of 1
    one = one_process(capsys, argv)
    two, stderr = two_processes(argv)
    assert without_throughput(two) == without_throughput(one)
    assert len(two) == 9 and all(row["images"] == 301 for row in two)
    assert "ats eval (2 processes): 301 images evaluated" in stderr
    assert all(row["throughput"] > 0 for row in two)


@pytest.mark.slow
def test_compare_and_calibrate_on_two_processes_give_one_processs_results(capsys, tmp_path):
    compare = ["compare", "--limit", "120", "--batch-size", "50", "--repeats", "1", "--rho", "1.0", "--merge-r", "16",
               "--min-kept", "0.9", "--distinct", "0.95", "--evit", "0.7", "--saint", "0.9", "--json"]
    one = one_process(capsys, [*compare, "--plot", str(tmp_path / "one.png")])
    two, _ = two_processes([*compare, "--plot", str(tmp_path / "two.png")])
    assert without_throughput(two) == without_throughput(one) and (tmp_path / "two.png").is_file()
    calibrate = ["calibrate", "--limit", "130", "--batch-size", "50", "--fraction", "0.6", "--json"]
    one = one_process(capsys, calibrate)
    two, _ = two_processes(calibrate)
    assert two == one and two["images"] == 130


@pytest.mark.slow
def test_a_process_that_dies_stops_the_run_naming_its_rank():
    process = subprocess.Popen([*TORCHRUN, "eval", "--batch-size", "50", "--json"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**ENV, "ATS_TEST_RUN": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            pid = worker_pid(1, process.pid)
            break
        except AssertionError:
            time.sleep(0.2)
    else:
        pytest.fail("the worker of rank 1 never started")
    time.sleep(3)  # inside its share of the batches
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", stderr) and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]


def test_one_process_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--batch-size", "1", "--repeats", "1"]) == 2
    assert "ats bench runs on one process" in capsys.readouterr().err
