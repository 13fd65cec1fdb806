import pytest
import torch

from ats.commands.plots import (
    eval_method,
    frontier_figure,
    kept_tokens_histograms,
    plot_frontier,
    slug,
    write_eval_plots,
)

DEPTH, IMAGES = 12, 20


def result(config, gflops, top1, ats_blocks):
    generator = torch.Generator().manual_seed(len(config))
    tokens_in = torch.full((IMAGES, DEPTH), 197)
    tokens_out = tokens_in.clone()
    for block in ats_blocks:
        tokens_out[:, block] = torch.randint(60, 197, (IMAGES,), generator=generator)
    return dict(config=config, gflops=gflops, top1=top1, tokens_in=tokens_in, tokens_out=tokens_out,
                ats_blocks=list(ats_blocks))


RESULTS = [
    result("unpatched", 4.6, 79.8, []),
    result("rho=1 @ blocks 3..11", 3.0, 79.2, range(3, 12)),
    result("rho=0.72 @ blocks 3..11", 2.0, 76.0, range(3, 12)),
    result("K=108 @ block 3", 3.0, 78.5, [3]),
]


def test_write_eval_plots_writes_a_histogram_per_ats_config_and_the_frontier(tmp_path):
    paths = write_eval_plots(RESULTS, tmp_path / "plots")
    names = [path.name for path in paths]
    assert names == ["kept-tokens-rho1-blocks-3..11.png", "kept-tokens-rho0.72-blocks-3..11.png",
                     "kept-tokens-K108-block-3.png", "top1-gflops.png"]
    assert sorted(paths) == sorted((tmp_path / "plots").iterdir())
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_write_eval_plots_names_a_missing_key(tmp_path):
    broken = {key: value for key, value in RESULTS[1].items() if key != "tokens_out"}
    with pytest.raises(ValueError, match="tokens_out"):
        write_eval_plots([RESULTS[0], broken], tmp_path)


def test_histograms_have_one_panel_per_ats_block_with_its_mean():
    figure = kept_tokens_histograms(RESULTS[1]["tokens_out"], RESULTS[1]["ats_blocks"], "multi")
    assert len(figure.axes) == 9
    for ax, block in zip(figure.axes, range(3, 12)):
        mean = RESULTS[1]["tokens_out"][:, block].double().mean()
        assert ax.get_title() == f"block {block}: mean {mean:.1f}"
        assert sum(patch.get_height() for patch in ax.patches) == IMAGES
    with pytest.raises(ValueError, match="ATS block"):
        kept_tokens_histograms(RESULTS[0]["tokens_out"], [], "unpatched")


def test_frontier_draws_a_line_per_method_and_highlights_the_baseline():
    rows = [dict(method="ATS", gflops=3.0, top1=79.0, label="rho=1"), dict(method="ATS", gflops=2.0, top1=76.0),
            dict(method="ToMe", gflops=2.5, top1=77.0), dict(method="ToMe", gflops=3.2, top1=79.1),
            dict(method="unpatched", gflops=4.6, top1=79.8)]
    ax = frontier_figure(rows, baseline="unpatched").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == ["ATS", "ToMe"]
    assert list(lines["ATS"].get_xdata()) == [2.0, 3.0], "points join in ascending GFLOPs"
    assert [text.get_text() for text in ax.texts] == ["rho=1"]
    assert [collection.get_label() for collection in ax.collections] == ["unpatched"]
    with pytest.raises(ValueError, match="baseline"):
        frontier_figure(rows, baseline="DynamicViT")
    with pytest.raises(ValueError, match="top1"):
        frontier_figure([dict(method="ATS", gflops=1.0)])


def test_frontier_gives_every_method_its_own_colour():
    """ats compare draws eleven methods: no two lines may look alike (matplotlib's default cycle has ten)."""
    rows = [dict(method=f"method {index}", gflops=1.0 + index, top1=50.0 + index) for index in range(25)]
    lines = frontier_figure(rows).axes[0].get_lines()
    assert len(lines) == 25
    assert len({line.get_color() for line in lines[:20]}) == 20
    assert len({(line.get_color(), line.get_marker()) for line in lines}) == 25


def test_plot_frontier_writes_the_png(tmp_path):
    path = plot_frontier([dict(method="ATS", gflops=1.0, top1=50.0)], tmp_path / "sub" / "f.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_eval_method_groups_configs_by_their_blocks():
    assert eval_method([]) == "unpatched"
    assert eval_method(range(3, 12)) == "ATS, blocks 3..11"
    assert eval_method([3]) == "ATS, block 3"
    assert eval_method([3, 6]) == "ATS, blocks 3,6"


def test_slug_is_file_name_safe():
    assert slug("rho=0.87 @ blocks 3..11 (topk)") == "rho0.87-blocks-3..11-topk"
    assert slug("/") == "config"
