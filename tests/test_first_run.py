"""A first run on a model that is not one of the reference models, without --data: eval, bench and visualize
run on the bundled images converted to its input, with top-1 n/a; the commands that need its own classes
say so before any work."""
import json
from pathlib import Path

import pytest
import torch

from ats.adapters import data_config, family_of
from ats.commands.cli import main
from ats.data.build import build_dataset, knows_bundled_classes


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


@pytest.fixture
def hf_vit(tmp_path):
    """A random-init transformers ViT on 3 x 32 x 32 images with 1,000 unnamed classes, saved with save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=48, num_hidden_layers=6,
                       num_attention_heads=3, intermediate_size=96, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


@pytest.mark.parametrize("model", ["deit_tiny_patch16_224", "hf"])
def test_eval_runs_on_the_bundled_images_converted_to_the_model_with_top1_na(model, hf_vit, capsys):
    name = f"hf:{hf_vit}" if model == "hf" else model
    rows, err = run_json(capsys, "eval", "--model", name, "--limit", "3", "--repeats", "1", "--multi-stage", "0.7",
                         "--json")
    assert [row["top1"] for row in rows] == [None, None] and [row["top1_change"] for row in rows] == [None, None]
    assert rows[1]["gflops"] < rows[0]["gflops"] and rows[0]["images"] == 3
    assert "top-1 is n/a" in err and "--data DIR" in err
    assert main(["eval", "--model", name, "--limit", "3", "--repeats", "1", "--multi-stage", "0.7"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[4:6] == ["n/a", "n/a"]


def test_eval_plots_without_labels_draw_the_kept_tokens_only(capsys, tmp_path):
    assert main(["eval", "--model", "deit_tiny_patch16_224", "--limit", "2", "--repeats", "1", "--multi-stage", "0.7",
                 "--plots", str(tmp_path)]) == 0
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["kept-tokens-rho0.7-blocks-3..11.png"]


def test_the_bundled_images_are_converted_to_the_models_input(hf_vit):
    from ats.commands.options import load_hf_model

    model = load_hf_model(str(hf_vit))
    image, label = build_dataset(None, data_config(model), limit=2)[1]
    assert image.shape == (3, 32, 32) and label == 2  # the second test image is a pullover
    config = family_of(model).data_config(model)
    pixels = image * torch.tensor(config["std"])[:, None, None] + torch.tensor(config["mean"])[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
    assert 0 <= pixels.min() and pixels.max() <= 1 and pixels.std() > 0.1  # gray, in all three channels
    assert not knows_bundled_classes(data_config(model))


@pytest.mark.parametrize("command", [["compare"], ["calibrate", "--fraction", "0.6"], ["retention"]])
def test_commands_that_need_the_models_classes_refuse_before_any_work(command, capsys):
    assert main([command[0], "--model", "deit_tiny_patch16_224", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"ats {command[0]} --model deit_tiny_patch16_224 needs --data DIR" in err and "eval:" not in err


def test_bench_and_visualize_run_without_data(capsys, tmp_path):
    rows, _ = run_json(capsys, "bench", "--model", "deit_tiny_patch16_224", "--batch-size", "2", "--repeats", "1",
                       "--warmup", "0", "--multi-stage", "0.7", "--json")
    assert [row["config"] for row in rows] == ["unpatched", "rho=0.7 @ blocks 3..11"]
    entries, _ = run_json(capsys, "visualize", "--model", "deit_tiny_patch16_224", "--num-images", "1",
                          "--out", str(tmp_path), "--json")
    assert entries[0]["label"] == "Ankle boot" and Path(entries[0]["path"]).is_file()
    assert entries[0]["prediction"] not in (None, "Ankle boot")  # an ImageNet class name


@pytest.mark.parametrize("model", ["deit_tiny_patch16_224", "hf:facebook/deit-tiny-patch16-224"])
def test_pretrained_without_a_network_fails_at_once_saying_so(model, monkeypatch, capsys):
    import socket
    import time

    def unreachable(address, timeout):
        assert timeout <= 5
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    assert main(["eval", "--model", model, "--pretrained", "--limit", "1"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "huggingface.co, which cannot be reached (Network is unreachable)" in err and "HF_HUB_OFFLINE=1" in err


def test_hub_offline_skips_the_network_probe(monkeypatch):
    import socket

    from ats.commands.options import require_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: pytest.fail("probed the network"))
    require_hub("deit_tiny_patch16_224")


def test_the_top_level_help_loads_no_command_module(capsys):
    """``ats --help`` lists the commands without importing them (nor torch, timm, matplotlib or transformers: ``ats``
    loads its API on first use); a command's own parser comes with its module."""
    import subprocess
    import sys

    code = ("import sys; from ats.commands.cli import build_parser; build_parser().format_help(); "
            "print(' '.join(name for name in sys.modules if name.startswith('ats.commands.') and name not in "
            "('ats.commands.cli',) or name in ('torch', 'timm', 'matplotlib', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
    assert main([]) == 0 and "accuracy, GFLOPs and throughput" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--num-classes" in capsys.readouterr().out
