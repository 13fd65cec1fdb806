"""Deploying a patched model: ONNX export and runs in ONNX Runtime (the CLI is ``ats export``).

``torch.onnx.export(dynamo=True)`` carries both modes with a dynamic batch dimension. Static mode
(``ats.patch(model, config, static=True)``) fixes every block's width before the forward, so its graph has the same
shapes for every image; in the adaptive mode each block's width is the largest count an image kept, which the graph
computes (a data-dependent size, ``ats.packing``; docs/performance.md, "Deploy").
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .adapters import as_logits, is_patched, last_stats

#: The ONNX opset of every export: 18, the oldest the dynamo exporter writes natively (it converts older ones after the
#: export, which may fail; its default is newer), so the graph runs on the most runtimes (tested: ONNX Runtime 1.32).
OPSET = 18
#: The name of the graph's input and outputs.
INPUT, LOGITS = "images", "logits"


def kept_output(block: int) -> str:
    """The name of the output that holds ATS (or merging) block ``block``'s kept patch-grid indices."""
    return f"kept_{block}"


class WithKeptTokens(nn.Module):
    """A patched model whose forward also returns what each of its sampling blocks kept: (logits [B, classes],
    then for each such block, in order, ``ATSStats.kept``'s [B, capacity] long patch-grid indices, -1 on padding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        logits = as_logits(self.model(images))
        kept = last_stats(self.model).kept
        return (logits, *(kept[block] for block in sorted(kept)))


def sampling_blocks(model: nn.Module, images: torch.Tensor) -> List[int]:
    """The blocks of a patched ``model`` whose kept tokens ``WithKeptTokens`` returns, in its order."""
    with torch.no_grad():
        model(images)
    return sorted(last_stats(model).kept)


def export_onnx(model: nn.Module, images: torch.Tensor, path: Union[str, Path], dynamic_batch: bool = True,
                kept_tokens: bool = False) -> List[str]:
    """Write ``model`` (unpatched or patched, in either mode) to ``path`` as an ONNX graph (opset OPSET).

    images: [B, C, H, W] example input; dynamic_batch: the batch dimension is a graph input's dimension (else
    fixed at B); kept_tokens: a patched model's graph also outputs each sampling block's kept tokens
    (``WithKeptTokens``). Returns the graph's output names. In static mode every block has its capacity's width; in
    the adaptive mode each block's width is a data-dependent size in the graph, the largest count an image kept.
    """
    model = model.eval()
    module: nn.Module = LogitsOnly(model)
    outputs = [LOGITS]
    if kept_tokens and is_patched(model):
        module = WithKeptTokens(model)
        outputs += [kept_output(block) for block in sampling_blocks(model, images)]
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, (images,), str(path), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                          output_names=outputs, dynamic_shapes=dynamic_shapes, external_data=False)
    return outputs


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Hide the exporter's progress lines (stdout), its warnings and onnx_ir's notes on empty attribute lists."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class LogitsOnly(nn.Module):
    """A model whose output holds its logits (a transformers output), as a module returning the logits alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return as_logits(self.model(images))


def onnx_session(path: Union[str, Path], threads: int = 0):
    """An ONNX Runtime CPU session of the graph at ``path``; threads: intra-op threads (0: its default)."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("ONNX Runtime is not installed: pip install 'ats-vit[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor) -> Dict[str, np.ndarray]:
    """Every output of an ONNX Runtime session on images [B, C, H, W], by name."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: images.numpy()})))


@dataclasses.dataclass
class ExportCheck:
    """How the ONNX Runtime graph agrees with the PyTorch model on some images.

    max_abs_diff: the largest absolute difference of the logits; same_class: the share of images whose top class
    agrees; same_kept: whether every sampling block kept the same tokens in both (None: not checked)."""

    images: int
    max_abs_diff: float
    same_class: float
    same_kept: Optional[bool] = None


def check_export(model: nn.Module, session, images: torch.Tensor) -> ExportCheck:
    """Compare ``model`` (as it was exported) with its ONNX Runtime ``session`` on images [B, C, H, W]: the
    logits, and where the graph outputs them (``export_onnx(kept_tokens=True)``) the kept tokens as sets."""
    with torch.no_grad():
        logits = as_logits(model(images))
    outputs = run_session(session, images)
    onnx_logits = torch.from_numpy(outputs[LOGITS])
    same_kept = None
    if is_patched(model) and any(name.startswith("kept_") for name in outputs):
        kept = last_stats(model).kept
        same_kept = all(kept_sets(kept[block]) == kept_sets(torch.from_numpy(outputs[kept_output(block)]))
                        for block in kept)
    return ExportCheck(images.shape[0], float((onnx_logits - logits).abs().max()),
                       float((onnx_logits.argmax(1) == logits.argmax(1)).float().mean()), same_kept)


def kept_sets(kept: torch.Tensor) -> List[List[int]]:
    """Kept patch-grid indices [B, m] (-1 on padding) -> per image, the sorted indices."""
    return [sorted(index for index in row.tolist() if index >= 0) for row in kept]


def time_sessions(sessions: Sequence, images: torch.Tensor, repeats: int = 5, warmup: int = 2) -> List[float]:
    """Median seconds of one run of each ONNX Runtime session on images [B, C, H, W]; the sessions alternate in
    every repeat, so drift in the machine's speed hits them all."""
    feeds = [{session.get_inputs()[0].name: images.numpy()} for session in sessions]
    seconds: List[List[float]] = [[] for _ in sessions]
    for repeat in range(warmup + repeats):
        for index, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            if repeat >= warmup:
                seconds[index].append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]

