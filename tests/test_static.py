"""Static mode: every block at a width fixed in advance, no host read, one graph under torch.compile."""
import copy
import json

import pytest
import torch
from conftest import contrasted_images, tiny_vit

import ats
from ats.packing import TokenBatch

DEPTH = 6
#: The depth of the models the compile tests trace (tracing time grows with the blocks).
COMPILE_DEPTH = 3


def configs(depth: int = DEPTH):
    """Every config static mode runs, by name, for a model of ``depth`` >= 3 blocks."""
    return {
        "inverse_transform": ats.ATSConfig.multi_stage(0.7, first=1, depth=depth),
        "rho1": ats.ATSConfig.multi_stage(1.0, first=1, depth=depth),
        "topk": ats.ATSConfig.multi_stage(0.7, first=1, depth=depth, sampler="topk"),
        "released": ats.ATSConfig.multi_stage(0.5, first=1, depth=depth, sampler="released"),
        "fuse_distinct": ats.ATSConfig.multi_stage(1.0, first=1, depth=depth, fuse=True, distinct=0.6),
        "min_kept": ats.ATSConfig.multi_stage(0.5, first=1, depth=depth, min_kept=0.5, fuse=True),
        "self_attention": ats.ATSConfig.multi_stage(1.0, first=1, depth=depth, score="self_attention"),
        "evit": ats.EViTConfig(0.5, blocks=(1, depth - 1)),
        "evit_ats": ats.StackedConfig(ats.EViTConfig(0.5, blocks=(1,)), ats.ATSConfig({2: 0.7, depth - 1: 0.7})),
        "merge": ats.MergeConfig(6),
        "saint": ats.SAINTConfig(0.3, blocks=(1, 2)),
    }


CONFIGS = configs()


def forward(model, config, images, static):
    ats.patch(model, config, static=static)
    with torch.no_grad():
        logits = model(images)
    return logits, ats.last_stats(model)


def kept_sets(stats):
    """Block -> per image the sorted patch indices it kept."""
    return {block: [row[row >= 0].sort().values.tolist() for row in kept] for block, kept in stats.kept.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_keeps_what_the_adaptive_mode_keeps(name):
    model, images = tiny_vit(), contrasted_images()
    adaptive_logits, adaptive = forward(model, CONFIGS[name], images, static=False)
    static_logits, static = forward(model, CONFIGS[name], images, static=True)
    assert kept_sets(static) == kept_sets(adaptive)
    assert torch.equal(static.tokens, adaptive.tokens)
    assert (static_logits - adaptive_logits).abs().max() < 1e-4
    if name not in ("topk", "merge", "evit"):  # these keep the same count in every image
        assert len(set(adaptive.tokens[:, -1].tolist())) > 1, "the test needs images that keep different counts"


@pytest.mark.parametrize("name", ["inverse_transform", "fuse_distinct", "evit", "merge"])
def test_static_gflops_are_the_capacity(name):
    """Static mode reports what it computes: every image the upper bound, at least the adaptive count."""
    model, images = tiny_vit(), contrasted_images()
    _, adaptive = forward(model, CONFIGS[name], images, static=False)
    _, static = forward(model, CONFIGS[name], images, static=True)
    assert torch.allclose(static.gflops, torch.full_like(static.gflops, ats.gflops(model)))
    assert (static.gflops >= adaptive.gflops - 1e-6).all()
    assert ats.gflops(model) < ats.gflops(ats.unpatch(model)) or name == "fuse_distinct"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_reads_nothing_from_the_device(name):
    """On the meta device no tensor holds data, so any host read (item, tolist, nonzero, ...) raises."""
    model = tiny_vit()
    ats.patch(model, CONFIGS[name], static=True)
    model.to("meta")
    with torch.no_grad():
        assert model(contrasted_images().to("meta")).shape == (8, 10)


def test_the_adaptive_mode_does_read_from_the_device():
    """The check above can fail: the adaptive mode sizes each packed batch on the host."""
    model = tiny_vit()
    ats.patch(model, CONFIGS["inverse_transform"]).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        with torch.no_grad():
            model(contrasted_images().to("meta"))


class GraphCounter:
    """A torch.compile backend that runs each graph as traced and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def assert_one_graph_over_ten_batches(model, run, inputs):
    counter = GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for batch in inputs:
            assert (run(compiled, batch) - run(model, batch)).abs().max() < 1e-5
    assert counter.graphs == 1


def ten_batches():
    """Ten batches of 4 images whose contrast differs, so each batch keeps other tokens."""
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 32, 32, generator=generator) * (1 + index) for index in range(10)]


@pytest.mark.parametrize("name", ["inverse_transform", "topk", "released", "fuse_distinct", "evit", "merge",
                                  "saint"])
@pytest.mark.slow
def test_a_static_timm_vit_compiles_whole_once(name):
    model = ats.patch(tiny_vit(depth=COMPILE_DEPTH), configs(COMPILE_DEPTH)[name], static=True)
    assert_one_graph_over_ten_batches(model, lambda m, x: m(x), ten_batches())


@pytest.mark.parametrize("name", ["inverse_transform", "topk", "released", "fuse_distinct", "evit", "merge"])
@pytest.mark.slow
def test_a_static_hugging_face_vit_compiles_whole_once(name):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=COMPILE_DEPTH,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    model = ats.patch(transformers.ViTForImageClassification(config).eval(), configs(COMPILE_DEPTH)[name],
                      static=True)
    assert_one_graph_over_ten_batches(model, lambda m, x: m(pixel_values=x).logits, ten_batches())


@pytest.mark.slow
def test_a_static_model_compiles_with_inductor_and_reduce_overhead():
    """The default backend, in the CUDA-graph mode (on the CPU it runs without CUDA graphs)."""
    model = ats.patch(tiny_vit(depth=COMPILE_DEPTH, embed_dim=32, num_heads=2),
                      configs(COMPILE_DEPTH)["inverse_transform"], static=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    images = contrasted_images()
    with torch.no_grad():
        assert (compiled(images) - model(images)).abs().max() < 1e-4


@pytest.mark.slow
def test_static_mode_trains():
    model = tiny_vit(drop_path_rate=0.1).train()
    ats.patch(model, ats.ATSConfig.multi_stage(0.7, first=1, depth=DEPTH, fuse=True, stochastic=True), static=True)
    model(contrasted_images()).logsumexp(dim=-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_static_mode_survives_pickling_and_repatching():
    model = ats.patch(tiny_vit(), CONFIGS["inverse_transform"], static=True)
    copied = copy.deepcopy(model)
    assert copied._ats.static
    assert not ats.patch(copied, CONFIGS["topk"])._ats.static  # re-patching replaces the mode too


def test_bad_static_requests_are_refused():
    with pytest.raises(TypeError, match="static must be True or False"):
        ats.patch(tiny_vit(), CONFIGS["topk"], static="yes")
    from ats.models.xvit import XViT

    xvit = XViT(num_frames=3, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="static mode is not available under space-time mixing attention"):
        ats.patch(xvit, ats.ATSConfig({1: 0.7}), static=True)
    batch = TokenBatch.from_dense(torch.randn(2, 5, 3), static=True)
    with pytest.raises(ValueError, match="capacity"):
        batch.select(torch.ones(2, 5, dtype=torch.bool))


def test_a_static_selection_is_as_wide_as_its_capacity():
    batch = TokenBatch.from_dense(torch.arange(2 * 5 * 1.0).view(2, 5, 1), static=True)
    keep = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    kept, rows_from = batch.select(keep, capacity=4)
    assert kept.width == 4 and kept.lengths.tolist() == [2, 4] and not kept.full
    assert kept.source.tolist() == [[0, 2, -1, -1], [0, 1, 2, 3]]
    assert kept.rows[:, 0].tolist()[:2] == [0.0, 2.0] and rows_from.shape == (8,)


def test_calibrate_finds_a_budget_for_static_mode():
    """In static mode a config costs its capacity, the same for every image: the search counts that."""
    model, images = tiny_vit(), contrasted_images()
    loader = [(images, torch.zeros(len(images), dtype=torch.long))]
    found = ats.calibrate(model, loader, fraction=0.6, method="ats", first=1, static=True, progress=False)
    assert found.gflops == pytest.approx(ats.gflops(ats.patch(model, found.config, static=True)), rel=1e-5)
    assert abs(found.gflops - 0.6 * found.unpatched_gflops) <= 0.02 * 0.6 * found.unpatched_gflops


def test_eval_static_labels_its_rows_and_reports_the_capacity(capsys):
    """``--static`` reaches the evaluation: the same top-1 and kept tokens as the adaptive rows, the capacity's
    GFLOPs, and a label that says so."""
    from ats.commands.cli import main

    argv = ["eval", "--limit", "40", "--batch-size", "20", "--repeats", "1", "--multi-stage", "0.72", "--json"]
    assert main(argv) == 0
    adaptive = json.loads(capsys.readouterr().out)
    assert main([*argv, "--static"]) == 0
    static = json.loads(capsys.readouterr().out)
    assert [row["config"] for row in static] == ["unpatched", "rho=0.72 @ blocks 3..11 [static]"]
    assert static[1]["top1"] == adaptive[1]["top1"] and static[1]["kept_tokens_mean"] == adaptive[1]["kept_tokens_mean"]
    bound = ats.gflops(ats.patch(ats.reference.load_reference_model(), ats.ATSConfig.multi_stage(0.72)))
    assert static[1]["gflops"] == pytest.approx(bound, rel=1e-4) and static[1]["gflops"] > adaptive[1]["gflops"]
