"""A Kinetics-style folder of video files, ``root/<class>/<clip>.mp4``, as clips for a video model.

Each file is decoded with PyAV (``pip install 'ats-vit[video]'``); the model's number of frames is
sampled uniformly over the video (the middle frame of T equal segments) and each frame is resized,
cropped and normalised by timm's transform for the model's per-frame data config, giving clips
[T, C, H, W]. A file that cannot be decoded, or holds no frames, comes back as a ``SkippedImage``
naming it, as an unreadable image does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils.data import Dataset

from .skipped import SkippedImage
from .transforms import timm_transform

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def frame_indices(num_frames: int, frames: int) -> List[int]:
    """The middle frame of each of ``frames`` equal segments of a video of ``num_frames`` frames."""
    return [min(num_frames - 1, int((segment + 0.5) * num_frames / frames)) for segment in range(frames)]


def read_frames(path: Path, frames: int, mode: str) -> list:
    """``frames`` PIL images (``mode`` "RGB" or "L") sampled uniformly from the video at ``path``."""
    import av

    with av.open(str(path)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    if not decoded:
        raise ValueError("the file holds no video frames")
    return [decoded[index].convert(mode) for index in frame_indices(len(decoded), frames)]


class VideoFolder(Dataset):
    """(clip [T, C, H, W], label) pairs from ``root/<class>/<clip>.<ext>``; classes in sorted order, as
    torchvision's ImageFolder numbers them. frame_transform: a PIL frame -> [C, H, W]."""

    def __init__(self, root: Path, frames: int, channels: int, frame_transform: Callable) -> None:
        try:
            import av  # noqa: F401
        except ImportError:
            raise ImportError("reading video files needs PyAV: pip install 'ats-vit[video]'") from None
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"video directory {root} does not exist; pass a folder laid out as "
                                    "root/<class>/<clip>.mp4 (the Kinetics layout)")
        self.classes = sorted(child.name for child in root.iterdir() if child.is_dir())
        self.samples: List[Tuple[Path, int]] = [
            (path, label) for label, name in enumerate(self.classes) for path in sorted((root / name).iterdir())
            if path.suffix.lower() in VIDEO_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"{root} holds no video files ({', '.join(VIDEO_EXTENSIONS)}) in class sub-folders; lay "
                             "it out as root/<class>/<clip>.mp4")
        self.frames, self.mode, self.frame_transform = frames, "L" if channels == 1 else "RGB", frame_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            frames = read_frames(path, self.frames, self.mode)
        except Exception as error:  # PyAV raises its own error types for broken or foreign files
            return SkippedImage(str(path), f"unreadable video ({type(error).__name__}: {error})")
        clip = torch.stack([self.frame_transform(frame) for frame in frames])
        if not torch.isfinite(clip).all():
            return SkippedImage(str(path), "non-finite pixel values after preprocessing")
        return clip, label


def video_folder(root: Path, config: Dict[str, Any]) -> VideoFolder:
    """A folder of video files for the video model of data config ``config``: its frames, and timm's evaluation
    transform for its per-frame data config (also in training: random crops and flips drawn per frame would tear a
    clip apart)."""
    frames = config["num_frames"]
    transform = timm_transform(config)
    return VideoFolder(root, frames, config["input_size"][0], transform)
