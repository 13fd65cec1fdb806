"""The reference video model in the commands: `--model reference-video` on moving-garment clips."""
import json

import pytest
import torch
from conftest import random_checkpoint

import ats
from ats.adapters import data_config
from ats.commands.cli import main
from ats.commands.compare import comparison_configs, runnable
from ats.data.build import build_dataset, training_set
from ats.data.moving_garments import MOVING_GARMENT_CLASSES, MovingGarments
from ats.data.skipped import SkippedImage
from ats.data.video_files import frame_indices
from ats.reference import create_reference_video


@pytest.fixture
def video_checkpoint(tmp_path):
    """A random-init reference video model's state dict, saved for --checkpoint."""
    return random_checkpoint(create_reference_video, tmp_path / "video.pt")


def test_the_bundled_video_model_classifies_the_test_clips(capsys):
    """Chance is 5% (20 classes); the bundled checkpoint is a trained model (62.5% on these 64 clips)."""
    assert main(["eval", "--model", "reference-video", "--limit", "64", "--batch-size", "32", "--blocks", "3-5:1.0",
                 "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["top1"] > 40.0 and sampled["top1"] > 40.0
    assert sampled["gflops"] < unpatched["gflops"] and sampled["kept_tokens_max"] < 65


def test_eval_runs_the_video_model_on_test_clips(video_checkpoint, capsys):
    assert main(["eval", "--model", "reference-video", "--checkpoint", str(video_checkpoint), "--limit", "6",
                 "--batch-size", "3", "--multi-stage", "0.5", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    model = create_reference_video()
    assert unpatched["gflops"] == pytest.approx(ats.gflops(model), rel=1e-4)
    assert unpatched["kept_tokens_min"] == 65 and unpatched["images"] == 6  # 64 positions and the class token
    assert sampled["gflops"] < 0.8 * unpatched["gflops"] and sampled["kept_tokens_max"] < 65
    assert sampled["tokens_per_block"][:3] == [65.0] * 3  # ATS from block 3 on


@pytest.mark.slow
def test_train_fine_tunes_the_video_model_with_ats(video_checkpoint, fashion_train, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "reference-video", "--checkpoint", str(video_checkpoint), "--data",
                 str(fashion_train), "--limit", "8", "--batch-size", "4", "--val-limit", "4", "--epochs", "1",
                 "--multi-stage", "0.7", "--out", str(out)]) == 0
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["gflops"] < ats.gflops(create_reference_video())
    trained = torch.load(out / "model.pt", weights_only=False)
    before = torch.load(video_checkpoint, weights_only=False)
    assert not torch.equal(trained["classifier.weight"].float(), before["classifier.weight"].float())


def test_a_video_model_gets_clips_of_its_own_geometry(fashion_train):
    model = create_reference_video(num_frames=6, image_size=56)
    test_clips = build_dataset(None, data_config(model), limit=3)
    clip, label = test_clips[0]
    assert clip.shape == (6, 1, 56, 56) and 0 <= label < len(MOVING_GARMENT_CLASSES)
    train_clips = training_set(fashion_train, data_config(model))
    assert isinstance(train_clips, MovingGarments) and len(train_clips) == 64
    with pytest.raises(ValueError, match="holds no video files"):
        build_dataset(str(fashion_train), data_config(model))


def write_clip(path, frames: int, size: int, shift: int = 0) -> None:
    """A small grayscale mp4: a bright square moving right by 2 pixels a frame."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = np.zeros((size, size, 3), dtype=np.uint8)
            left = shift + 2 * index
            pixels[size // 4:size // 2, left:left + size // 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frames_are_sampled_uniformly():
    assert frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert frame_indices(5, 8) == [0, 0, 1, 2, 2, 3, 4, 4]  # a short video repeats frames


def test_a_folder_of_video_files_gives_clips_and_skips_broken_files(tmp_path):
    for name, shift in (("left", 0), ("right", 8)):
        (tmp_path / name).mkdir()
        write_clip(tmp_path / name / "a.mp4", frames=12, size=64, shift=shift)
    (tmp_path / "right" / "broken.mp4").write_bytes(b"not a video")
    model = create_reference_video()
    dataset = build_dataset(str(tmp_path), data_config(model))
    assert dataset.classes == ["left", "right"] and len(dataset) == 3
    clip, label = dataset[0]
    assert clip.shape == (8, 1, 64, 64) and label == 0
    rows = clip[:, 0, 16:32].mean(dim=1)  # the square's rows, per frame and column
    bright = (rows > rows.mean(dim=1, keepdim=True)).float()
    centres = (bright * torch.arange(64)).sum(dim=1) / bright.sum(dim=1)
    assert (centres.diff() > 0).all(), "the frames must come in order, the square moving right"
    skipped = dataset[1] if "broken" in str(dataset.samples[1][0]) else dataset[2]
    assert isinstance(skipped, SkippedImage) and "unreadable video" in skipped.reason
    with pytest.raises(ValueError, match="holds no video files"):
        build_dataset(str(tmp_path / "left"), data_config(model))


def test_eval_reads_a_folder_of_video_files(video_checkpoint, tmp_path, capsys):
    (tmp_path / "clips" / "a").mkdir(parents=True)
    write_clip(tmp_path / "clips" / "a" / "one.mp4", frames=10, size=64)
    assert main(["eval", "--model", "reference-video", "--checkpoint", str(video_checkpoint), "--data",
                 str(tmp_path / "clips"), "--multi-stage", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["images"] for row in rows] == [1, 1]


def test_visualize_draws_the_kept_tubes_on_every_frame(video_checkpoint, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["visualize", "--model", "reference-video", "--checkpoint", str(video_checkpoint), "--num-images",
                 "1", "--multi-stage", "0.8", "--out", str(out), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    kept = [entry["kept_per_block"][str(block)] for block in range(3, 8)]
    assert kept == sorted(kept, reverse=True) and kept[-1] < 64
    assert entry["label"] in MOVING_GARMENT_CLASSES and entry["prediction"] in MOVING_GARMENT_CLASSES
    assert (out / entry["path"].split("/")[-1]).stat().st_size > 10_000
    assert main(["visualize", "--model", "reference-video", "--checkpoint", str(video_checkpoint), "--images",
                 str(tmp_path), "--out", str(out)]) == 2
    assert "this is a video model" in capsys.readouterr().err


def test_bench_times_clips(video_checkpoint, capsys):
    assert main(["bench", "--model", "reference-video", "--checkpoint", str(video_checkpoint), "--batch-size", "2",
                 "--repeats", "1", "--warmup", "0", "--multi-stage", "0.5", "--json"]) == 0
    unpatched, sampled = json.loads(capsys.readouterr().out)
    assert unpatched["gflops"] == pytest.approx(ats.gflops(create_reference_video()), rel=1e-4)
    assert sampled["gflops"] < 0.8 * unpatched["gflops"] and sampled["throughput"] > 0


def test_compare_leaves_out_what_divided_attention_cannot_run(capsys):
    model = create_reference_video()
    pairs = comparison_configs(8, rhos=[0.7], min_kept=[0.5], distinct=[0.95], merge_r=[4], evit_keep_rates=[0.7])
    kept = runnable(model, pairs)
    assert [variant for variant, _ in kept] == ["unpatched", "ATS", "ATS + fuse", "ATS + fuse + min_kept",
                                                "ATS + fuse + distinct", "top-K"]
    notes = capsys.readouterr().err
    assert "left out merge (ToMe)" in notes and "left out EViT" in notes
    assert "left out ATS + self-attention + fuse:" in notes
