import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import ats
from ats.adapters.timm import TIMM
from ats.commands.cli import main
from ats.commands.options import add_config_arguments
from ats.commands.visualize import (
    ATTENTION_LABEL,
    ImageTokens,
    attention_maps,
    display_images,
    kept_masks,
    tint_dropped,
    token_figure,
    visualize_configs,
)

ROWS, COLS = 4, 6


def tiny_vit(**kwargs) -> VisionTransformer:
    """A random-init ViT on 1x16x24 images: a 4x6 patch grid, 4 blocks."""
    torch.manual_seed(0)
    options = dict(img_size=(16, 24), patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    return VisionTransformer(**{**options, **kwargs}).eval()


def forward(model, config, batch=3):
    ats.patch(model, config)
    with torch.no_grad():
        model(torch.randn(batch, 1, 16, 24, generator=torch.Generator().manual_seed(1)))
    return ats.last_stats(model)


def test_kept_masks_match_the_sampled_indices():
    stats = forward(tiny_vit(), ats.ATSConfig.multi_stage(0.6, first=1, depth=4))
    masks = kept_masks(stats)
    assert sorted(masks) == [1, 2, 3]
    previous = torch.ones(3, ROWS, COLS, dtype=torch.bool)
    for block, mask in masks.items():
        assert mask.shape == (3, ROWS, COLS) and mask.dtype == torch.bool
        for image in range(3):
            indices = [int(i) for i in stats.kept[block][image] if i >= 0]
            cells = {(i // COLS, i % COLS) for i in indices}
            assert {tuple(cell) for cell in mask[image].nonzero().tolist()} == cells
        assert torch.equal(mask.sum(dim=(1, 2)), stats.tokens_out[:, block] - 1)
        assert not (mask & ~previous).any(), f"block {block} keeps a patch an earlier block dropped"
        previous = mask
    assert (previous.sum(dim=(1, 2)) < ROWS * COLS).all(), "rho 0.6 over three blocks must drop tokens"


def test_topk_kept_masks_are_the_highest_recorded_scores():
    stats = forward(tiny_vit(), ats.ATSConfig(blocks={1: 10, 2: 5}, sampler="topk"))
    masks = kept_masks(stats)
    for block, k in ((1, 10), (2, 5)):
        scores = stats.scores[block].reshape(-1, ROWS, COLS)
        for image in range(3):
            top = scores[image].flatten().topk(k).indices
            expected = torch.zeros(ROWS * COLS, dtype=torch.bool)
            expected[top] = True
            assert torch.equal(masks[block][image].flatten(), expected)
    assert torch.equal(stats.scores[2] > 0, masks[1].flatten(1)), "block 2 scores exactly what block 1 kept"


def test_attention_maps_cover_exactly_the_patches_entering_each_block():
    stats = forward(tiny_vit(), ats.ATSConfig.multi_stage(0.6, first=1, depth=4))
    masks, maps = kept_masks(stats), attention_maps(stats)
    entering = torch.ones(3, ROWS, COLS, dtype=torch.bool)
    for block in (1, 2, 3):
        assert maps[block].shape == (3, ROWS, COLS)
        assert torch.equal(maps[block] > 0, entering)
        total = maps[block].sum(dim=(1, 2))
        assert ((total > 0) & (total < 1)).all(), "patch attention excludes the class token's own share"
        entering = masks[block]


def test_token_figure_has_a_panel_per_block_titled_with_its_count():
    model = tiny_vit()
    stats = forward(model, ats.ATSConfig.multi_stage(0.6, first=1, depth=4), batch=1)
    masks, maps = kept_masks(stats), attention_maps(stats)
    present = {1: torch.ones(ROWS, COLS, dtype=torch.bool), 2: masks[1][0], 3: masks[2][0]}
    pixels = display_images(torch.zeros(1, 1, 16, 24), TIMM.data_config(model))[0]
    assert pixels.shape == (16, 24, 3)
    tokens = ImageTokens("x", "cfg", pixels, {b: m[0] for b, m in masks.items()}, {b: a[0] for b, a in maps.items()},
                         present, gflops=0.5, label="shirt", prediction="bag")
    figure = token_figure(tokens)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 1 + 2 * 3 + 1  # the input, two rows of three blocks, the colour bar
    for block, mask in masks.items():
        assert f"block {block}: {int(mask[0].sum())} kept" in titles
    assert "label: shirt" in figure.get_suptitle() and "0.5 GFLOPs" in figure.get_suptitle()


def test_the_heat_maps_share_one_scale_shown_by_a_colour_bar():
    masks = {1: torch.ones(ROWS, COLS, dtype=torch.bool), 2: torch.ones(ROWS, COLS, dtype=torch.bool)}
    attention = {1: torch.full((ROWS, COLS), 0.01), 2: torch.full((ROWS, COLS), 0.04)}
    attention[2][0, 0] = 0.08
    tokens = ImageTokens("x", "cfg", torch.zeros(16, 24, 3), masks, attention, masks, gflops=0.1)
    figure = token_figure(tokens)
    (bar,) = [ax for ax in figure.axes if ax.get_ylabel() == ATTENTION_LABEL]
    heat = {ax.get_title(): ax.get_images()[-1].get_array() for ax in figure.axes if "class attn." in ax.get_title()}
    assert float(heat["block 2: class attn."].max()) == pytest.approx(1.0)
    assert float(heat["block 1: class attn."].max()) == pytest.approx(0.125)  # 0.01 / 0.08, not scaled to its own
    assert ATTENTION_LABEL in figure.get_suptitle()


@pytest.mark.parametrize("colour", [(0.35, 0.55, 0.95), (0.2, 0.35, 0.75), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
def test_dropped_patches_stand_out_on_any_colour(colour):
    """On a plain image of any colour (a blue sky, black, white), every dropped patch differs from a kept one."""
    image = torch.tensor(colour).expand(16, 24, 3).clone()
    kept = torch.zeros(ROWS, COLS, dtype=torch.bool)
    kept[:, :3] = True
    shown = torch.from_numpy(tint_dropped(image, kept))
    assert torch.equal(shown[:, :12], image[:, :12])
    for row in range(ROWS):
        for col in range(3, COLS):
            patch = shown[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4]
            assert (patch - image[0, 0]).abs().sum(dim=-1).max() > 0.5
            assert patch.reshape(-1, 3).unique(dim=0).shape[0] == 2  # stripes: hatch and grey


def test_token_figure_without_class_token_has_only_the_kept_row():
    model = tiny_vit(class_token=False, global_pool="avg")
    stats = forward(model, ats.ATSConfig(blocks={1: 8, 2: 4}, score="self_attention"), batch=1)
    masks = kept_masks(stats)
    assert attention_maps(stats) == {}
    pixels = torch.zeros(16, 24, 3)
    tokens = ImageTokens("x", "cfg", pixels, {b: m[0] for b, m in masks.items()}, {}, {}, gflops=0.1)
    assert len(token_figure(tokens).axes) == 1 + 2
    assert torch.equal(masks[2].sum(dim=(1, 2)), stats.tokens_out[:, 2])


def config_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_config_is_multi_stage_rho_one_and_given_ones_are_kept():
    assert visualize_configs(config_args(), 12) == [ats.ATSConfig.multi_stage(1.0, depth=12)]
    configs = visualize_configs(config_args("--single-stage", "50", "--multi-stage", "0.8"), 12)
    assert [config.describe() for config in configs] == ["rho=0.8 @ blocks 3..11", "K=50 @ block 3"]
    assert visualize_configs(config_args("--evit", "0.7"), 12) == [ats.EViTConfig(0.7)]


def test_data_config_fits_a_one_channel_model():
    config = TIMM.data_config(tiny_vit())
    assert config["input_size"] == (1, 16, 24)
    assert len(config["mean"]) == len(config["std"]) == 1


@pytest.mark.parametrize("flag", ["--data", "--images"])
def test_cli_writes_one_png_per_image_and_config(tmp_path, capsys, flag):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "out"
    code = main(["visualize", "--model", "vit_tiny_patch16_224", flag, str(folder), "--out", str(out),
                 "--multi-stage", "1.0", "--single-stage", "60", "--json"])
    assert code == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 4
    assert {entry["image"] for entry in entries} == {"a", "b"}
    assert sorted(out.iterdir()) == sorted(Path(entry["path"]) for entry in entries)
    for entry in entries:
        data = Path(entry["path"]).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
        blocks = list(range(3, 12)) if entry["config"].startswith("rho") else [3]
        assert sorted(map(int, entry["kept_per_block"])) == blocks
        assert entry["gflops"] > 0 and entry["label"] is None


def test_cli_rejects_a_missing_image_path(tmp_path, capsys):
    code = main(["visualize", "--model", "vit_tiny_patch16_224", "--images", str(tmp_path / "nope.png"),
                 "--out", str(tmp_path)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-images", "--batch-size"])
def test_cli_rejects_counts_below_one(tmp_path, capsys, flag):
    code = main(["visualize", "--model", "vit_tiny_patch16_224", flag, "0", "--out", str(tmp_path)])
    assert code == 2
    assert flag in capsys.readouterr().err


def test_cli_shows_bundled_test_images_through_the_reference_model(tmp_path, capsys, checkpoint):
    from ats.data.fashion_mnist import FASHION_MNIST_CLASSES

    out = tmp_path / "out"
    code = main(["visualize", "--checkpoint", str(checkpoint), "--num-images", "2", "--out", str(out),
                 "--json"])
    assert code == 0
    entries = json.loads(capsys.readouterr().out)
    assert [entry["image"] for entry in entries] == ["test-00000", "test-00001"]
    assert [entry["config"] for entry in entries] == ["rho=1 @ blocks 3..11"] * 2
    assert len(list(out.glob("*.png"))) == 2
    for entry in entries:
        assert entry["label"] in FASHION_MNIST_CLASSES and entry["prediction"] in FASHION_MNIST_CLASSES
        counts = [entry["kept_per_block"][str(block)] for block in range(3, 12)]
        assert counts == sorted(counts, reverse=True) and counts[0] <= 196


def test_cli_draws_evit_blocks_without_the_fused_token(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["visualize", "--num-images", "2", "--evit", "0.5", "--out", str(out), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    for entry in entries:  # fused tokens are no patch: 98 of 196; 50 of 99, up to one fused; 26 of 51, up to two
        kept = entry["kept_per_block"]
        assert kept["3"] == 98 and 49 <= kept["6"] <= 50 and 24 <= kept["9"] <= 26
    assert all(Path(entry["path"]).read_bytes().startswith(b"\x89PNG") for entry in entries)
