"""The bundled reference PS-ViT in the commands: `--model reference-psvit`."""
import json

import pytest

import ats
from ats.commands.cli import main
from ats.reference import load_reference_psvit


def test_eval_runs_the_bundled_psvit_unpatched_and_with_ats(capsys):
    assert main(["eval", "--model", "reference-psvit", "--limit", "48", "--multi-stage", "1.0", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["gflops"] == pytest.approx(ats.gflops(load_reference_psvit()), rel=1e-4)
    assert unpatched["top1"] > 70.0  # a trained model, not random weights
    assert sampled["gflops"] < unpatched["gflops"] and sampled["kept_tokens_max"] < 197
    assert sampled["tokens_per_block"][:4] == [197.0] * 4  # ATS from block 3 of the 10 on
