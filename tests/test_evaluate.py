import json

import pytest
import torch
from test_datasets import write_image_folder

import ats
from ats.commands.cli import main
from ats.commands.evaluate import evaluate
from ats.commands.options import REFERENCE_MODELS


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_an_image_folder(tmp_path, checkpoint, capsys):
    data = write_image_folder(tmp_path / "data", classes=tuple("abcdefghij"), per_class=1, size=(28, 28))
    rows = run_json(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(data), "--multi-stage", "0.7",
                    "--blocks", "3:500", "--topk", "--repeats", "1", "--json")
    assert [row["config"] for row in rows] == ["unpatched", "rho=0.7 @ blocks 3..11 (topk)", "K=500 @ block 3 (topk)"]
    for row in rows:
        assert {"config", "params", "gflops", "throughput", "top1", "top1_change", "tokens_per_block"} <= set(row)
        assert 0 <= row["top1"] <= 100 and row["throughput"] > 0 and len(row["tokens_per_block"]) == 12
    unpatched, reduced, everything = rows
    assert reduced["gflops"] < unpatched["gflops"] and reduced["tokens_per_block"][-1] < 197
    assert everything["top1"] == unpatched["top1"]  # top-K keeping every token changes nothing


def test_eval_defaults_to_the_papers_six_the_recommended_and_merging_and_says_which_row(checkpoint, capsys,
                                                                                          tmp_path):
    assert main(["eval", "--checkpoint", str(checkpoint), "--limit", "8", "--repeats", "1",
                 "--plots", str(tmp_path / "plots")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["config", "params", "GFLOPs"]
    assert [line.split()[0] for line in table[1:-1]] == ["unpatched"] + ["rho=1", "rho=0.87", "rho=0.72"] + \
        ["K=108", "K=78", "K=48", "rho=1", "merge"]
    assert "(fuse, distinct=0.95)" in table[-3] and table[-1].startswith("which row: 'rho=1 @ blocks 3..11 (fuse, ")
    assert list((tmp_path / "plots").glob("*.png"))


#: The bundled models whose no-flag eval takes longest (make test-slow runs them).
SLOW_TO_EVALUATE = ("reference-cvt", "reference-psvit", "reference-video")


@pytest.mark.parametrize("model", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_EVALUATE else name
                                   for name in REFERENCE_MODELS])
def test_eval_with_no_config_flags_runs_on_every_bundled_model_with_the_peer_it_can_run(model, capsys):
    rows = run_json(capsys, "eval", "--model", model, "--limit", "2", "--repeats", "1", "--json")
    video = model in ("reference-video", "reference-xvit")
    assert len(rows) == 9 and rows[-2]["config"].endswith("(fuse, distinct=0.95)")
    assert rows[-1]["method"] == ("ats" if video else "merge")
    if video:  # tube fusing: the recommended setting without distinct
        assert rows[-1]["config"] == rows[-2]["config"].replace(", distinct=0.95", "")
    assert all(row["top1"] is not None and row["gflops"] < rows[0]["gflops"] for row in rows[1:])


def test_the_default_merging_row_costs_about_what_the_recommended_one_does(capsys):
    rows = run_json(capsys, "eval", "--limit", "100", "--repeats", "1", "--json")
    recommended, merging = rows[-2:]
    assert recommended["config"] == ats.ATSConfig.recommended(depth=12).describe() and merging["method"] == "merge"
    assert abs(merging["gflops"] / recommended["gflops"] - 1) < 0.05
    assert recommended["top1"] > max(row["top1"] for row in rows[1:7])  # the bundled model: above the paper's six


def test_nearest_merge_is_the_r_whose_analytic_gflops_come_closest(model):
    from ats.calibration import nearest_merge

    costs = {r: ats.gflops(ats.patch(model, ats.MergeConfig(r))) for r in range(1, 33)}
    ats.unpatch(model)
    target = (costs[5] + costs[6]) / 2 + 1e-6
    assert nearest_merge(model, target) == ats.MergeConfig(5) and not ats.is_patched(model)
    assert nearest_merge(model, 0.0) == ats.MergeConfig(32)


def test_eval_passes_fuse_distinct_and_min_kept_to_every_config(checkpoint, capsys):
    rows = run_json(capsys, "eval", "--checkpoint", str(checkpoint), "--limit", "4", "--multi-stage", "1.0",
                    "--stage-every", "2", "--single-stage", "48", "--fuse", "--distinct", "0.9", "--min-kept", "0.5",
                    "--repeats", "1", "--json")
    assert [row["config"] for row in rows[1:]] == ["rho=1 @ blocks 3..11 every 2 (fuse, distinct=0.9, min_kept=0.5)",
                                                   "K=48 @ block 3 (fuse, distinct=0.9, min_kept=0.5)"]
    assert rows[1]["tokens_per_block"][4] >= 1 + 0.5 * 196


def test_eval_stacks_each_evit_config_with_each_ats_config(checkpoint, capsys):
    rows = run_json(capsys, "eval", "--checkpoint", str(checkpoint), "--limit", "4", "--evit", "0.7", "--evit", "0.5",
                    "--blocks", "4-5:0.7,7-8:0.7,10-11:0.7", "--repeats", "1", "--json")
    assert [row["method"] for row in rows] == ["unpatched", "evit+ats", "evit+ats"]
    assert rows[1]["config"] == "EViT keep_rate=0.7 @ blocks 3, 6, 9 + rho=0.7 @ blocks 4, 5, 7, 8, 10, 11"
    assert rows[1]["tokens_per_block"][4] == 1 + 138 + 1 and rows[2]["tokens_per_block"][4] == 1 + 98 + 1
    evit_only = run_json(capsys, "eval", "--checkpoint", str(checkpoint), "--limit", "4", "--evit", "0.7",
                         "--evit-blocks", "2,5", "--repeats", "1", "--json")
    assert [row["config"] for row in evit_only] == ["unpatched", "EViT keep_rate=0.7 @ blocks 2, 5"]
    with pytest.raises(SystemExit):
        main(["eval", "--evit", "0.7", "--evit-blocks", "3,x"])
    assert "'3,x' is not a comma-separated list of block indices" in capsys.readouterr().err


def test_eval_runs_the_merging_baseline_beside_other_configs(checkpoint, capsys):
    rows = run_json(capsys, "eval", "--checkpoint", str(checkpoint), "--limit", "4", "--merge", "16", "--evit", "0.7",
                    "--repeats", "1", "--json")
    assert [(row["method"], row["config"]) for row in rows] == [
        ("unpatched", "unpatched"), ("evit", "EViT keep_rate=0.7 @ blocks 3, 6, 9"), ("merge", "merge r=16")]
    assert rows[2]["tokens_per_block"] == [197 - 16 * block for block in range(12)]
    assert rows[2]["kept_tokens_max"] == 11  # the last block merges 20 // 2 = 10 of its 20 patch tokens


@pytest.mark.parametrize("argv, message", [
    (["--evit", "0.7", "--multi-stage", "0.7"], "both claim block 3"),
    (["--evit", "1.2"], "keep_rate must lie in (0, 1]"),
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--limit", "0"], "--limit"),
    (["--model", "no_such_model"], "unknown timm model"),
    (["--multi-stage", "1.5"], "rho must lie in"),
    (["--checkpoint", "/nonexistent.pt"], "does not exist"),
])
def test_eval_errors_name_the_problem(argv, message, checkpoint, capsys):
    given = ["--checkpoint", str(checkpoint)] if "--checkpoint" not in argv and "--model" not in argv else []
    assert main(["eval", *given, *argv]) == 2
    assert message in capsys.readouterr().err


def test_compare_runs_every_method(checkpoint, capsys, tmp_path):
    plot = tmp_path / "frontier.png"
    rows = run_json(capsys, "compare", "--checkpoint", str(checkpoint), "--limit", "6", "--rho", "0.8",
                    "--min-kept", "0.9", "--distinct", "0.8", "--merge-r", "8", "--evit", "0.6", "--saint", "0.9",
                    "--repeats", "1", "--plot", str(plot), "--json")
    assert [row["method"] for row in rows] == ["unpatched"] + ["ats"] * 7 + ["topk", "evit", "merge", "saint"]
    assert len({row["variant"] for row in rows}) == 12
    assert rows[-3]["config"] == "EViT keep_rate=0.6 @ blocks 3, 6, 9"
    assert rows[-3]["tokens_per_block"][4] == 1 + 118 + 1
    assert rows[-1]["config"] == "SAINT threshold=0.9 (K=5, gamma=10) @ blocks 0..5"
    assert "rho=1 @ blocks 3..11 (fuse, distinct=0.8)" in [row["config"] for row in rows]
    assert all(row["gflops"] < rows[0]["gflops"] for row in rows[1:])
    assert plot.stat().st_size > 0


def test_evaluate_gives_what_whole_forwards_give(model, images):
    configs = [None, ats.ATSConfig.single_stage(k=20, block=2), ats.ATSConfig.multi_stage(0.8, first=3, depth=6),
               ats.MergeConfig(r=4, first=1)]
    with torch.no_grad():
        labels = model(images).argmax(-1).roll(1)
    rows = evaluate(model, [(images, labels)], configs, repeats=1, progress=False)
    for row, config in zip(rows, configs):
        if config is not None:
            ats.patch(model, config)
        with torch.no_grad():
            logits = model(images)
        assert row.top1 == 100.0 * float((logits.argmax(-1) == labels).float().mean())
        if config is not None:
            stats = ats.last_stats(model)
            assert torch.equal(row.tokens_out, stats.tokens_out) and row.gflops == float(stats.gflops.mean())
            ats.unpatch(model)
    assert len({row.top1 for row in rows}) > 1, "the configs should not all agree"


def test_eval_shows_a_progress_bar_while_it_times_throughput(checkpoint, capsys):
    argv = ["eval", "--checkpoint", str(checkpoint), "--limit", "4", "--multi-stage", "0.7", "--repeats", "2",
            "--timing-images", "3"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "throughput (3 images)" in err and "6/6" in err  # two configs, one warm-up and two timed forwards each
    assert main([*argv[:-1], "0"]) == 2 and "--timing-images must be at least 1" in capsys.readouterr().err


def test_top1_is_na_with_the_reason_when_the_folder_has_other_classes(tmp_path, checkpoint, capsys):
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=1, size=(28, 28))
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--multi-stage", "0.7", "--repeats", "1"]
    rows = run_json(capsys, *argv, "--json")
    assert [row["top1"] for row in rows] == [None, None]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "top-1 is n/a: " in captured.err and "has 2 classes and the model 10" in captured.err
    assert captured.out.splitlines()[1].split()[4:6] == ["n/a", "n/a"]


def test_top1_is_na_with_the_reason_for_random_weights(capsys):
    assert main(["eval", "--model", "deit_tiny_patch16_224", "--limit", "1", "--multi-stage", "0.7", "--repeats", "1",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["top1"] is None
    assert "deit_tiny_patch16_224 has random weights (add --pretrained" in captured.err


def test_num_classes_loads_a_checkpoint_with_another_head(tmp_path, capsys):
    import timm

    torch.save(timm.create_model("deit_tiny_patch16_224", num_classes=2).state_dict(), tmp_path / "two.pt")
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=1, size=(32, 32))
    argv = ["eval", "--model", "deit_tiny_patch16_224", "--checkpoint", str(tmp_path / "two.pt"), "--data", str(data),
            "--multi-stage", "0.7", "--repeats", "1", "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "--num-classes N" in err
    rows = run_json(capsys, *argv, "--num-classes", "2")
    assert all(0 <= row["top1"] <= 100 for row in rows)
