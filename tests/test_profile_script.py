"""scripts/profile_ats.py: the op groups, the interleaved timing and the lower bound, run small."""
import re

from conftest import load_script


def test_interleaved_timing_calls_every_run_once_per_round():
    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    ms = load_script("profile_ats").interleaved_ms(runs, repeats=3)
    assert calls == ["a", "b"] * 4  # one untimed round, then three timed ones
    assert set(ms) == {"a", "b"} and all(value >= 0 for value in ms.values())


def test_profile_prints_the_groups_and_the_bound(capsys):
    argv = ["--model", "deit_tiny_patch16_224", "--batch-size", "1", "--repeats", "1"]
    assert load_script("profile_ats").main(argv) == 0
    out = capsys.readouterr().out
    shares = [float(share) for share in re.findall(r"^\| [^|]+ \| ([\d.]+)% \|$", out, re.MULTILINE)]
    assert len(shares) == 7 and abs(sum(shares) - 100) < 0.5
    rows = re.findall(r"^\| (unpatched|patched|lower bound[^|]*) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| (\d+) \|$", out,
                      re.MULTILINE)
    assert [row[0].split(":")[0] for row in rows] == ["unpatched", "patched", "lower bound"]
    ops = {row[0].split(":")[0]: int(row[3]) for row in rows}
    assert ops["patched"] > ops["unpatched"]  # ATS dispatches its own ops on top of the model's
    assert "mean tokens entering each block: [197, 197, 197, 197, 138, 97" in out
    assert re.search(r"reaches \d\.\d{3} of the bound's speed", out)


def test_count_ops_prints_ops_and_host_reads_per_forward(capsys):
    argv = ["--count-ops", "--model", "deit_tiny_patch16_224", "--batch-size", "2", "--count-batch-size", "1",
            "--merge", "13"]
    assert load_script("profile_ats").main(argv) == 0
    rows = re.findall(r"^\| ([^|]+) \| (adaptive|static|-) \| 1 \| (\d+) \| (\d+) \|$", capsys.readouterr().out,
                      re.MULTILINE)
    table = {(config, mode): (int(ops), int(reads)) for config, mode, ops, reads in rows}
    rho = "rho=0.7 @ blocks 3..11"
    assert set(table) == {("unpatched", "-"), (rho, "adaptive"), (rho, "static"), ("merge r=13", "adaptive"),
                          ("merge r=13", "static")}
    assert table["unpatched", "-"][1] == 0 and table[rho, "static"][1] == 0 and table["merge r=13", "static"][1] == 0
    assert table[rho, "adaptive"][1] == 9  # one read of the kept counts per ATS block
    assert table[rho, "adaptive"][0] > table["unpatched", "-"][0]
