"""Retention: distinct tokens kept by K inverse-transform samples, and the scores' effective number of tokens."""
import json

import pytest
import torch
from conftest import random_checkpoint, tiny_vit

import ats
from ats.commands.cli import main
from ats.commands.retention import effective_tokens, measure_retention
from ats.reference import create_reference_model


def sharpened_vit(factor: float):
    """The tiny ViT with its qkv weights scaled by ``factor`` more: the larger, the more peaked its attention."""
    model = tiny_vit()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(factor)
    return model


def test_effective_tokens_of_hand_worked_scores():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    assert effective_tokens(scores).tolist() == pytest.approx([4.0, 1.0, 2.0])
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_tokens(p[None] * 7).item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item())


def test_measure_retention_matches_the_single_stage_config(images):
    model = sharpened_vit(3)
    result = measure_retention(model, images.split(4), k=40, block=3)
    assert not ats.is_patched(model)
    ats.patch(model, ats.ATSConfig.single_stage(40, block=3))
    model(images)
    stats = ats.last_stats(model)
    kept = stats.kept_counts(3).float()
    assert result.kept == pytest.approx(kept.mean().item()) and result.retention == pytest.approx(result.kept / 40)
    assert 1 <= result.kept < 30 and result.images == len(images) and result.num_patches == 64
    assert result.effective_tokens == pytest.approx(effective_tokens(stats.scores[3]).mean().item())
    assert 1 <= result.effective_tokens < 40


def test_flatter_scores_keep_more_distinct_tokens(images):
    flat, peaked, sharpest = (measure_retention(sharpened_vit(factor), [images], k=40) for factor in (1, 3, 10))
    assert flat.retention > 0.9 > peaked.retention > sharpest.retention
    assert flat.effective_tokens > peaked.effective_tokens > sharpest.effective_tokens


def test_measure_retention_refuses_a_patched_model_and_no_batches(model, images):
    with pytest.raises(ValueError, match="no batches"):
        measure_retention(model, [])
    assert not ats.is_patched(model)
    ats.patch(model, ats.ATSConfig.multi_stage(1.0, depth=6))
    with pytest.raises(ValueError, match="unpatched model"):
        measure_retention(model, [images])


def test_retention_command_on_the_reference_model(tmp_path, capsys):
    checkpoint = random_checkpoint(create_reference_model, tmp_path / "reference.pt")
    assert main(["retention", "--checkpoint", str(checkpoint), "--limit", "6", "--batch-size", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["k"] == 108 and result["block"] == 3 and result["images"] == 6 and result["num_patches"] == 196
    assert result["retention"] == pytest.approx(result["kept"] / 108) and 0 < result["kept"] <= 108
    assert main(["retention", "--checkpoint", str(checkpoint), "--limit", "2", "--k", "50"]) == 0
    assert "K = 50" in capsys.readouterr().out
