"""Checkpoint files: written atomically, read with errors that name the file and what was expected."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

PathLike = Union[str, Path]
EXPECTED = "a file written by torch.save(model.state_dict()) or a training checkpoint of `ats train`"


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder, renamed over ``path`` once
    complete: a process killed while saving leaves the previous file whole. The file gets the permissions
    a plain ``open`` would give it (the umask's), not the temporary file's owner-only ones."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The model weights in ``path``: a state dict, or the ``model`` (or ``state_dict``) entry of a
    training checkpoint. Raises FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist; pass {EXPECTED}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file that is not a checkpoint fails anywhere in unpickling
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({reason}); pass {EXPECTED}") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors; pass {EXPECTED}")
    return state


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (cast to its dtype); a file for another architecture
    gets a ValueError naming the file and the first mismatches."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    mismatched = [f"{name} {list(state[name].shape)} vs {list(tensor.shape)}" for name, tensor in own.items()
                  if name in state and state[name].shape != tensor.shape]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("other shapes (file vs model)", mismatched)) if items]
        raise ValueError(f"{path} holds weights for another architecture than this {type(model).__name__} "
                         f"({'; '.join(problems)}); pass the checkpoint of the model you named with --model (for "
                         "a classifier of another size, --num-classes N)")
    model.load_state_dict({name: tensor.to(own[name].dtype) for name, tensor in state.items()})
    return model
