"""The commands on a Hugging Face model: --model hf:DIR, the reference model converted by its script."""
import json
from pathlib import Path

import pytest
from conftest import load_script
from test_datasets import write_image_folder

from ats.adapters.hf import HF
from ats.commands.cli import main


@pytest.fixture
def hf_reference(checkpoint, tmp_path):
    """The random-init reference checkpoint, converted into a transformers ViTForImageClassification folder."""
    script = load_script("convert_reference_to_hf")
    out = tmp_path / "reference-hf"
    assert script.main(["--out", str(out), "--checkpoint", str(checkpoint)]) == 0
    return out


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_the_converted_reference_equals_the_timm_one(hf_reference, checkpoint, capsys):
    flags = ["--limit", "24", "--batch-size", "8", "--repeats", "1", "--multi-stage", "1.0", "--single-stage", "108",
             "--fuse", "--distinct", "0.5", "--json"]
    timm_rows = run_json(capsys, "eval", "--checkpoint", str(checkpoint), *flags)
    hf_rows = run_json(capsys, "eval", "--model", f"hf:{hf_reference}", *flags)
    assert len(hf_rows) == 3
    for timm_row, hf_row in zip(timm_rows, hf_rows):
        for key in ("config", "gflops", "top1", "tokens_per_block", "kept_tokens_min", "kept_tokens_max"):
            assert hf_row[key] == timm_row[key], key
    assert hf_rows[1]["gflops"] < hf_rows[0]["gflops"]


def test_preprocessing_comes_from_the_image_processor_config(hf_reference, tmp_path, capsys):
    from ats.commands.options import load_hf_model

    model = load_hf_model(str(hf_reference))
    config = HF.data_config(model)
    assert config["input_size"] == (1, 28, 28) and config["crop_mode"] == "squash"
    assert config["mean"] == pytest.approx((0.286,)) and config["interpolation"] == "bilinear"
    assert config["class_names"][0] == "T-shirt/top"
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=(40, 30))
    rows = run_json(capsys, "eval", "--model", f"hf:{hf_reference}", "--data", str(data), "--repeats", "1", "--json")
    assert len(rows) == 9 and rows[0]["tokens_per_block"][0] == 197  # the paper's six, recommended, merging


@pytest.mark.slow
def test_visualize_bench_and_train_take_a_transformers_model(hf_reference, fashion_train, tmp_path, capsys):
    entries = run_json(capsys, "visualize", "--model", f"hf:{hf_reference}", "--num-images", "2",
                       "--out", str(tmp_path / "pngs"), "--json")
    assert len(entries) == 2 and all(Path(entry["path"]).is_file() for entry in entries)
    rows = run_json(capsys, "bench", "--model", f"hf:{hf_reference}", "--multi-stage", "0.7", "--batch-size", "2",
                    "--repeats", "1", "--warmup", "0", "--json")
    assert [row["config"] for row in rows] == ["unpatched", "rho=0.7 @ blocks 3..11"]
    assert main(["train", "--model", f"hf:{hf_reference}", "--data", str(fashion_train), "--limit", "16",
                 "--batch-size", "8", "--val-limit", "8", "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda tmp_path: tmp_path / "missing", "no such directory"),
    (lambda tmp_path: tmp_path, "holds no config.json"),
])
def test_bad_hf_paths_get_a_clear_error(make, message, tmp_path, capsys):
    assert main(["eval", "--model", f"hf:{make(tmp_path)}", "--limit", "2"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config_class, model_class", [("CLIPVisionConfig", "CLIPVisionModel"),
                                                       ("SiglipVisionConfig", "SiglipVisionModel"),
                                                       ("VideoMAEConfig", "VideoMAEForVideoClassification")])
def test_hf_dir_loads_the_class_it_was_saved_as_when_ats_supports_it(config_class, model_class, tmp_path):
    import transformers

    from ats.commands.options import load_hf_model

    config = getattr(transformers, config_class)(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path / "model")
    assert type(load_hf_model(str(tmp_path / "model"))).__name__ == model_class
