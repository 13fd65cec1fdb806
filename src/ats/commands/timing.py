"""Wall-clock throughput, measured the same way by every tool."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: nn.Module, images: torch.Tensor) -> float:
    """Seconds one ``model(images)`` takes, from an idle device until it has finished (CUDA runs
    asynchronously, so both ends wait for it)."""
    _synchronize(images.device)
    start = time.perf_counter()
    model(images)
    _synchronize(images.device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_throughput(model: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 2,
                       on_forward: Optional[Callable[[], object]] = None) -> float:
    """Images per second of ``model(images)``: the median over ``repeats`` timed forwards after ``warmup``;
    ``on_forward`` is called after each forward (a progress bar's ``update``).

    images: [B, C, H, W] on the model's device. Compare models only within one run: this machine's
    speed drifts between runs.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    seconds = []
    for index in range(warmup + repeats):
        elapsed = time_forward(model, images)
        if index >= warmup:
            seconds.append(elapsed)
        if on_forward is not None:
            on_forward()
    return images.shape[0] / statistics.median(seconds)
