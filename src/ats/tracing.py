"""What a patched forward says when a tracer records it: the tracers that cannot carry it are refused at once, with
what to do instead, rather than failing deep inside the algorithm.

torch.export (and torch.onnx.export(dynamo=True), which runs it) carries both modes: static mode at fixed widths,
the adaptive mode with each block's width a data-dependent size (the largest kept count, computed in the graph;
``exporting`` switches the host reads that size it off). TorchScript carries neither.
"""
from __future__ import annotations

import torch

#: Why TorchScript is refused, and what to use.
TORCHSCRIPT_REFUSAL = ("TorchScript (torch.jit.trace, torch.jit.script, and torch.onnx.export with dynamo=False, which "
                       "traces with it) cannot record a patched model: its forward sizes every block from the config "
                       "and the tokens kept in Python, which TorchScript freezes or cannot compile. Use "
                       "torch.onnx.export(model, (images,), dynamo=True) or torch.export.export (ats export --onnx "
                       "FILE does it); ats.patch(model, config, static=True) gives a graph of fixed shapes")


def exporting() -> bool:
    """Whether torch.export (also under torch.onnx.export(dynamo=True)) or the TorchScript-based ONNX exporter is
    recording the forward now."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def refuse_tracing(unexportable: str = "") -> None:
    """Raise RuntimeError naming the fix when TorchScript records a patched forward, and when an exporter records
    one that ``unexportable`` says (why) it cannot carry."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(TORCHSCRIPT_REFUSAL)
    if unexportable and exporting():
        raise RuntimeError(f"this patched model does not export: {unexportable}")
