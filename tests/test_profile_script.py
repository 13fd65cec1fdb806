"""scripts/profile_ats.py: the op groups, the interleaved timing and the lower bound, run small."""
import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_ats.py"


def load_script():
    spec = importlib.util.spec_from_file_location("profile_ats", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_interleaved_timing_calls_every_run_once_per_round():
    calls = []
    ms = load_script().interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # one untimed round, then three timed ones
    assert set(ms) == {"a", "b"} and all(value >= 0 for value in ms.values())


def test_profile_prints_the_groups_and_the_bound(capsys):
    assert load_script().main(["--model", "deit_tiny_patch16_224", "--batch-size", "1", "--repeats", "1"]) == 0
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
