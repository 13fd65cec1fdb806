import json

import pytest
import torch
from test_datasets import write_image_folder

import ats
from ats.adapters import family_of
from ats.commands.bench import bench_images
from ats.commands.cli import main
from ats.reference import create_reference_model


def test_bench_rows_are_consistent(checkpoint, capsys):
    assert main(["bench", "--checkpoint", str(checkpoint), "--multi-stage", "0.7", "--batch-size", "1",
                 "--batch-size", "3", "--repeats", "1", "--warmup", "0", "--compare-padded", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["config"], row["batch_size"]) for row in rows] == [
        ("unpatched", 1), ("rho=0.7 @ blocks 3..11", 1), ("rho=0.7 @ blocks 3..11 (padded packing)", 1),
        ("unpatched", 3), ("rho=0.7 @ blocks 3..11", 3), ("rho=0.7 @ blocks 3..11 (padded packing)", 3)]
    base = {row["batch_size"]: row for row in rows if row["config"] == "unpatched"}
    for row in rows:
        reference = base[row["batch_size"]]
        assert row["flop_ratio"] == pytest.approx(reference["gflops"] / row["gflops"])
        assert row["speedup"] == pytest.approx(row["throughput"] / reference["throughput"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flop_ratio"])
        assert row["threads"] >= 1 and len(row["tokens_per_block"]) == 12
    patched = [row for row in rows if row["config"] != "unpatched"]
    assert all(row["flop_ratio"] > 1 for row in patched)
    assert patched[0]["gflops"] == pytest.approx(patched[1]["gflops"])  # packing changes time, not FLOPs


@pytest.mark.parametrize("argv, message", [(["--batch-size", "0"], "--batch-size"), (["--threads", "0"], "--threads"),
                                           (["--compile-mode", "reduce-overhead"], "need --compile")])
def test_bench_refuses_bad_sizes(argv, message, checkpoint, capsys):
    assert main(["bench", "--checkpoint", str(checkpoint), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_compile_times_compiled_models_with_the_same_flops(checkpoint, capsys):
    argv = ["bench", "--checkpoint", str(checkpoint), "--multi-stage", "0.7", "--batch-size", "2", "--repeats", "1",
            "--warmup", "1", "--json"]
    assert main(argv) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main([*argv, "--compile", "--compile-backend", "eager"]) == 0  # traced by dynamo, no kernels built
    compiled = json.loads(capsys.readouterr().out)
    assert [row["config"] for row in compiled] == ["unpatched", "rho=0.7 @ blocks 3..11"]
    assert compiled[1]["gflops"] == pytest.approx(eager[1]["gflops"])
    assert compiled[1]["tokens_per_block"] == pytest.approx(eager[1]["tokens_per_block"])


def test_bench_times_forwards_under_autocast(checkpoint, capsys):
    """bf16 autocast on CPU: every row says so, the patched model still samples (fewer tokens, the same
    analytic FLOP count per kept token) and the forwards run in bfloat16."""
    import torch

    from ats.commands.bench import autocast_context

    argv = ["bench", "--checkpoint", str(checkpoint), "--multi-stage", "0.7", "--batch-size", "2", "--repeats", "1",
            "--warmup", "0", "--json"]
    assert main([*argv, "--autocast", "bf16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["autocast"] for row in rows] == ["bf16", "bf16"]
    assert rows[1]["flop_ratio"] > 1 and rows[1]["tokens_per_block"][-1] < 197
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown autocast"):
        autocast_context(torch.device("cpu"), "int8")


@pytest.mark.slow
def test_bench_static_rows_cost_the_capacity_and_compile_whole(checkpoint, capsys):
    argv = ["bench", "--checkpoint", str(checkpoint), "--multi-stage", "0.7", "--batch-size", "2", "--repeats", "1",
            "--warmup", "1", "--json"]
    assert main(argv) == 0
    adaptive = json.loads(capsys.readouterr().out)[1]
    compiled = ["--static", "--compile", "--compile-backend", "eager", "--compile-mode", "reduce-overhead"]
    assert main([*argv, *compiled]) == 0
    static = json.loads(capsys.readouterr().out)[1]
    assert static["config"] == "rho=0.7 @ blocks 3..11 [static]" and static["throughput"] > 0
    assert static["gflops"] >= adaptive["gflops"]  # the capacity, at least what each image kept


def test_bench_times_the_images_of_data(tmp_path, checkpoint, capsys):
    """--data: the folder's first images (taken again from the first when it has fewer), and the patched row's
    tokens are those its config keeps on them."""
    root = write_image_folder(tmp_path / "data", per_class=2)
    model = create_reference_model()
    model.load_state_dict(torch.load(checkpoint))
    images = bench_images(model, 6, reference=False, data=str(root))
    assert images.shape == (6, *family_of(model).input_size(model))
    assert torch.equal(images[4:], images[:2]) and not torch.equal(images[0], images[1])
    assert main(["bench", "--checkpoint", str(checkpoint), "--data", str(root), "--multi-stage", "0.7",
                 "--batch-size", "6", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    patched = json.loads(capsys.readouterr().out)[1]
    with torch.inference_mode():
        ats.patch(model.eval(), ats.ATSConfig.multi_stage(0.7))(images)
    assert patched["tokens_per_block"] == ats.last_stats(model).tokens.float().mean(0).tolist()
    bundled = bench_images(model, 6, reference=True)
    assert not torch.equal(images, bundled)
