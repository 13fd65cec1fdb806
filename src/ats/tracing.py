"""What a patched forward says when a tracer records it: the exporters that cannot carry it are refused at once,
with what to do instead, rather than failing deep inside the algorithm."""
from __future__ import annotations

import torch

#: What to do instead of exporting the adaptive mode.
EXPORT_HINT = "export with ats.patch(model, config, static=True)"
#: Why TorchScript is refused, and what to use.
TORCHSCRIPT_REFUSAL = ("TorchScript (torch.jit.trace, torch.jit.script, and torch.onnx.export with dynamo=False, which "
                       "traces with it) cannot record a patched model: its forward "
                       "sizes every block from the config and the input in Python, which TorchScript freezes or "
                       "cannot compile. Patch with ats.patch(model, config, static=True) and use "
                       "torch.onnx.export(model, (images,), dynamo=True) or torch.export.export; ats export "
                       "--onnx FILE does it")


def exporting() -> bool:
    """Whether torch.export (also under torch.onnx.export(dynamo=True)) or the TorchScript-based ONNX exporter is
    recording the forward now."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def refuse_tracing(static: bool) -> None:
    """Raise RuntimeError naming the fix when a tracer records a patched forward that it cannot carry: TorchScript
    in either mode, and in the adaptive mode (``static`` False) every exporter, since each block's width is the
    most tokens an image kept, read on the host (docs/performance.md, "Deploy")."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(TORCHSCRIPT_REFUSAL)
    if not static and exporting():
        raise RuntimeError("the adaptive mode of ATS does not export: each block's output is as wide as the most "
                           "tokens an image kept there, a count read on the host while the forward runs, so no "
                           f"graph of fixed ops holds it; {EXPORT_HINT} (every block at a width fixed in advance, "
                           "the same tokens kept)")
