"""Deploying: both modes export to ONNX (dynamic batch) and ONNX Runtime gives PyTorch's logits and kept tokens;
the tracers that cannot carry a patched forward are refused with the fix."""
import json
import math

import pytest
import torch
from conftest import contrasted_images, tiny_vit

import ats
from ats.commands.bench import bench_onnxruntime
from ats.commands.cli import main
from ats.commands.evaluate import config_label
from ats.export import OPSET, check_export, export_onnx, kept_output, onnx_session, run_session
from ats.sampling import times_fraction

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

#: The depth of the exported models (export time grows with the blocks).
DEPTH = 3


def static_configs(depth: int = DEPTH) -> dict:
    """Every method static mode runs, by name, for a model of ``depth`` >= 3 blocks, from block 1."""
    return {
        "inverse_transform": ats.ATSConfig.multi_stage(0.7, first=1, depth=depth),
        "topk": ats.ATSConfig.multi_stage(0.7, first=1, depth=depth, sampler="topk"),
        "released": ats.ATSConfig.multi_stage(0.5, first=1, depth=depth, sampler="released"),
        "fuse_distinct": ats.ATSConfig.multi_stage(1.0, first=1, depth=depth, fuse=True, distinct=0.6),
        "evit": ats.EViTConfig(0.5, blocks=(1, depth - 1)),
        "merge": ats.MergeConfig(6),
        "saint": ats.SAINTConfig(0.3, blocks=(1, 2)),
    }


def assert_exports_faithfully(model, images, path):
    """Export ``model`` at batch 2 with its kept tokens, run the graph on all ``images`` (another batch size: the
    batch is dynamic) and compare with PyTorch."""
    outputs = export_onnx(model, images[:2], path, kept_tokens=True)
    check = check_export(model, onnx_session(path), images)
    assert check.max_abs_diff <= 1e-4
    assert check.same_kept is True and check.same_class == 1.0
    assert outputs[1:] == [kept_output(block) for block in sorted(ats.last_stats(model).kept)]


@pytest.mark.parametrize("name", list(static_configs()))
def test_every_static_method_runs_in_onnx_runtime_as_in_pytorch_timm(name, tmp_path):
    model = ats.patch(tiny_vit(depth=DEPTH), static_configs()[name], static=True)
    assert_exports_faithfully(model, contrasted_images(), tmp_path / "model.onnx")


def hugging_face_configs() -> dict:
    """Every static method on a 6-block transformers ViT in three exports: the ATS samplers, fuse + distinct and
    EViT stacked in their own blocks, then merging and SAINT (which run alone)."""
    stacked = ats.StackedConfig(ats.ATSConfig({1: 0.7}), ats.ATSConfig({2: 0.7}, sampler="topk"),
                                ats.ATSConfig({3: 0.5}, sampler="released"),
                                ats.ATSConfig({4: 1.0}, fuse=True, distinct=0.6), ats.EViTConfig(0.5, blocks=(5,)))
    return {"ats_samplers_fuse_distinct_evit": stacked, "merge": ats.MergeConfig(6),
            "saint": ats.SAINTConfig(0.3, blocks=(1, 2))}


@pytest.mark.parametrize("name", list(hugging_face_configs()))
def test_every_static_method_runs_in_onnx_runtime_as_in_pytorch_hugging_face(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    depth = 6 if isinstance(hugging_face_configs()[name], ats.StackedConfig) else DEPTH
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=depth,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    model = ats.patch(transformers.ViTForImageClassification(config).eval(), hugging_face_configs()[name],
                      static=True)
    assert_exports_faithfully(model, contrasted_images(), tmp_path / "model.onnx")


@pytest.mark.slow
def test_ats_export_writes_the_reference_model_and_checks_it_on_bundled_images(tmp_path, capsys):
    path = tmp_path / "reference.onnx"
    assert main(["export", "--onnx", str(path), "--multi-stage", "0.7", "--static", "--kept-tokens", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] <= 1e-4 and report["same_kept"] is True and report["images"] == 8
    assert report["config"] == "rho=0.7 @ blocks 3..11 [static]" and report["batch"] == "dynamic"
    graph = onnx.load(path)
    assert {entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")} == {OPSET}
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch dimension
    from ats.commands.bench import bench_images
    from ats.reference import load_reference_model

    kept = run_session(onnx_session(path), bench_images(load_reference_model(), 8, reference=True))["kept_11"]
    assert len({int((row >= 0).sum()) for row in kept}) > 1  # a fixed width, each image its own count


def test_ats_export_refuses_several_configs(tmp_path, capsys):
    path = str(tmp_path / "model.onnx")
    assert main(["export", "--onnx", path, "--multi-stage", "0.7", "--multi-stage", "0.5", "--static"]) == 2
    assert "writes one model" in capsys.readouterr().err


def test_bench_times_unpatched_and_static_graphs_in_onnx_runtime(capsys):
    config = ats.ATSConfig.multi_stage(0.5, first=1, depth=2)
    rows = bench_onnxruntime(tiny_vit(depth=2), [config], [1, 3], repeats=1, warmup=0, threads=1, static=True)
    assert [(row.config, row.batch_size, row.runtime) for row in rows] == [
        ("unpatched", 1, "onnxruntime"), (config_label(config, True), 1, "onnxruntime"),
        ("unpatched", 3, "onnxruntime"), (config_label(config, True), 3, "onnxruntime")]
    for base, patched in (rows[:2], rows[2:]):
        assert patched.speedup == pytest.approx(patched.throughput / base.throughput)
        assert patched.flop_ratio == pytest.approx(base.gflops / patched.gflops) and patched.flop_ratio > 1
        assert patched.efficiency == pytest.approx(patched.speedup / patched.flop_ratio)
    assert main(["bench", "--runtime", "onnxruntime", "--multi-stage", "0.7", "--compile"]) == 2
    assert "drop --compile" in capsys.readouterr().err


def test_an_unpatched_model_exports_too(tmp_path):
    model = tiny_vit(depth=2)
    export_onnx(model, contrasted_images(2), tmp_path / "plain.onnx")
    outputs = run_session(onnx_session(tmp_path / "plain.onnx"), contrasted_images(3))
    with torch.no_grad():
        assert (torch.from_numpy(outputs["logits"]) - model(contrasted_images(3))).abs().max() <= 1e-4


def test_a_fraction_of_a_count_is_exact_in_the_graph(tmp_path):
    class Seventy(torch.nn.Module):
        def forward(self, counts):
            return times_fraction(counts, 0.7)

    counts = torch.arange(1, 200)
    torch.onnx.export(Seventy(), (counts,), tmp_path / "seventy.onnx", dynamo=True, opset_version=OPSET)
    session = onnx_session(tmp_path / "seventy.onnx")
    (floors,) = session.run(None, {session.get_inputs()[0].name: counts.numpy()})
    assert floors.tolist() == [math.floor(count * 0.7) for count in counts.tolist()]  # 60 -> 42, not 41


def assert_adaptive_export_is_faithful(model, images, path, dynamic_batch):
    """Export the adaptive ``model`` (at batch 2 with a dynamic batch, else at batch 1), run the graph on ``images``
    (all at once, else one at a time) and compare logits and kept tokens with PyTorch -> the last block's counts."""
    export_onnx(model, images[:2] if dynamic_batch else images[:1], path, dynamic_batch, kept_tokens=True)
    session = onnx_session(path)
    counts = []
    for batch in [images] if dynamic_batch else images.split(1):
        check = check_export(model, session, batch)
        assert check.max_abs_diff <= 1e-4 and check.same_kept is True
        kept = ats.last_stats(model).kept
        counts += (kept[max(kept)] >= 0).sum(dim=1).tolist()
    return counts


def test_the_adaptive_mode_exports_with_data_dependent_widths(tmp_path):
    config = ats.StackedConfig(ats.ATSConfig({1: 0.7, 2: 0.7}), ats.ATSConfig({3: 1.0}, fuse=True, distinct=0.6),
                               ats.EViTConfig(0.5, blocks=(4,)))
    model = ats.patch(tiny_vit(depth=5), config)
    counts = assert_adaptive_export_is_faithful(model, contrasted_images(), tmp_path / "adaptive.onnx", True)
    assert len(set(counts)) > 1  # no capacity: each batch as wide as the most an image kept


@pytest.mark.parametrize("name", ["inverse_transform", "saint"])
def test_the_adaptive_mode_exports_at_batch_1(name, tmp_path):
    model = ats.patch(tiny_vit(depth=4), static_configs(4)[name])
    counts = assert_adaptive_export_is_faithful(model, contrasted_images(), tmp_path / "adaptive.onnx", False)
    if name == "inverse_transform":
        assert len(set(counts)) > 1  # one graph, each image its own width


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_the_adaptive_mode_exports_a_model_without_a_class_token(pool, tmp_path):
    """Tokens scored by self-attention, pooled by the mean or an attention pool over each image's kept tokens."""
    model = ats.patch(tiny_vit(depth=4, class_token=False, global_pool=pool),
                      ats.ATSConfig.multi_stage(0.7, first=1, depth=4))
    assert_adaptive_export_is_faithful(model, contrasted_images(), tmp_path / "adaptive.onnx", True)


def test_exporting_a_tube_model_is_refused_with_the_reason():
    from ats.patch import family_of

    from ats.reference import create_reference_xvit

    model = ats.patch(create_reference_xvit().eval(), ats.ATSConfig.multi_stage(0.7, first=1, depth=2))
    clips = torch.randn(1, *family_of(model).input_size(model))
    with pytest.raises(RuntimeError, match="does not export: its blocks run on tubes"):
        torch.export.export(model, (clips,))


@pytest.mark.parametrize("static", [False, True])
def test_torchscript_is_refused_with_the_reason(static):
    model = ats.patch(tiny_vit(depth=2), ats.ATSConfig.multi_stage(0.7, first=1, depth=2), static=static)
    images = contrasted_images(1)
    with pytest.raises(RuntimeError, match="TorchScript .* cannot record a patched model.*dynamo=True"):
        torch.jit.trace(model, (images,))
    with pytest.raises(RuntimeError, match="TorchScript .* cannot record a patched model"):
        torch.jit.script(model)
    model(images)  # the model still runs after the refusals
