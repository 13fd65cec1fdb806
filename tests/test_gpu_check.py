"""scripts/gpu_check.sh, the one-shot CUDA benchmark, run small on the CPU (DEVICE=cpu QUICK=1)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu_check.sh"


def test_gpu_check_writes_every_run_as_json(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "ATS": f"{sys.executable} -m ats",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(SCRIPT), str(tmp_path)], check=True, env=env, capture_output=True, text=True)
    files = sorted(path.name for path in tmp_path.glob("*.json"))
    assert files == sorted(f"{model}-{run}-bf16.json" for model in ("deit", "reference")
                           for run in ("eager", "fuse-distinct", "compiled", "static"))
    rows = json.loads((tmp_path / "reference-eager-bf16.json").read_text())
    assert [row["config"] for row in rows if row["batch_size"] == 2] == [
        "unpatched", "rho=0.7 @ blocks 3..11", "merge r=13"]
    assert {row["autocast"] for row in rows} == {"bf16"}
    fused = json.loads((tmp_path / "deit-fuse-distinct-bf16.json").read_text())
    assert fused[1]["config"] == "rho=1 @ blocks 3..11 (fuse, distinct=0.95)" and fused[1]["throughput"] > 0
    static = json.loads((tmp_path / "deit-static-bf16.json").read_text())
    assert [row["config"] for row in static] == ["unpatched", "rho=0.7 @ blocks 3..11 [static]"]
    assert static[1]["gflops"] > json.loads((tmp_path / "deit-eager-bf16.json").read_text())[1]["gflops"] - 1e-9
    assert "torch" in (tmp_path / "device.txt").read_text()
