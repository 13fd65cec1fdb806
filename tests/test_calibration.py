"""Ask for a budget, get a config: the search hits targets, refuses unreachable ones, and repeats itself."""
import json

import pytest
import torch
from conftest import contrasted_images, tiny_vit

import ats
from ats.calibration import BudgetUnreachable, calibrate
from ats.commands.cli import main


@pytest.fixture
def loader():
    images = contrasted_images(16)
    return [(images[:8], torch.zeros(8, dtype=torch.long)), (images[8:], torch.ones(8, dtype=torch.long))]


def mean_gflops(model, loader, config):
    ats.patch(model, config)
    with torch.no_grad():
        total = sum(float(ats.last_stats(model).gflops.sum()) for images, _ in loader if model(images) is not None)
    ats.unpatch(model)
    return total / sum(len(labels) for _, labels in loader)


@pytest.mark.parametrize("method, fraction", [("fuse-distinct", 0.85), ("ats", 0.5), ("topk", 0.7), ("evit", 0.8)])
@pytest.mark.slow
def test_calibration_hits_the_target_within_two_percent(method, fraction, loader):
    model = tiny_vit()
    found = calibrate(model, loader, fraction=fraction, method=method, first=1, evit_blocks=(1, 3), progress=False)
    target = fraction * ats.gflops(model)
    assert found.target_gflops == pytest.approx(target)
    assert abs(found.gflops - target) <= 0.02 * target
    assert mean_gflops(model, loader, found.config) == pytest.approx(found.gflops)  # measured on the config returned
    assert eval(found.python, {"ats": ats}) == found.config
    assert not ats.is_patched(model)


def test_merging_r_is_searched_downwards(loader):
    model = tiny_vit()
    target = mean_gflops(model, loader, ats.MergeConfig(r=5))
    found = calibrate(model, loader, gflops=target, method="merge", progress=False)
    assert found.config == ats.MergeConfig(r=5) and found.gflops == pytest.approx(target)


def test_calibration_is_deterministic_and_leaves_a_patched_model_patched(loader):
    model = ats.patch(tiny_vit(), ats.ATSConfig.single_stage(k=10, block=2))
    first = calibrate(model, loader, fraction=0.85, first=1, progress=False)
    second = calibrate(model, loader, fraction=0.85, first=1, progress=False)
    assert (first.value, first.gflops, first.top1) == (second.value, second.gflops, second.top1)
    assert model._ats.config == ats.ATSConfig.single_stage(k=10, block=2)


def test_an_unreachable_target_is_refused_with_the_nearest_budget(loader):
    model = tiny_vit()
    with pytest.raises(BudgetUnreachable, match=r"cannot reach 0\.0001 GFLOPs.*nearest reachable budget is") as error:
        calibrate(model, loader, gflops=1e-4, method="ats", first=1, progress=False)
    nearest = error.value.nearest
    assert nearest.value == 0.01 and nearest.gflops > 1e-4  # the cheapest rho is the nearest
    assert not ats.is_patched(model)


@pytest.mark.parametrize("options, message", [
    (dict(), "exactly one target"),
    (dict(gflops=1.0, fraction=0.5), "exactly one target"),
    (dict(fraction=1.5), r"fraction must lie in \(0, 1\]"),
    (dict(gflops=-1.0), "must be > 0"),
    (dict(fraction=0.5, method="magic"), "unknown method 'magic'"),
])
def test_bad_requests_name_the_problem(options, message, loader):
    with pytest.raises(ValueError, match=message):
        calibrate(tiny_vit(), loader, progress=False, **options)


def test_cli_calibrates_the_reference_model(checkpoint, capsys):
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--limit", "20", "--fraction", "0.6",
                 "--method", "evit", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["method"] == "evit" and found["parameter"] == "keep_rate"
    assert abs(found["error"]) <= 0.02 and found["fraction"] == pytest.approx(0.6, abs=0.012)
    assert found["config"].startswith("EViT keep_rate=") and found["python"].startswith("ats.EViTConfig(")
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--limit", "20", "--gflops", "0.01",
                 "--method", "ats"]) == 2
    assert "nearest reachable budget" in capsys.readouterr().err
