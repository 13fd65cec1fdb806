"""Checkpoint files: atomic writes, and clear errors for files that are not what --checkpoint expects."""
import os

import pytest
import torch

from ats.commands.cli import main
from ats.reference import create_reference_model
from ats.reference.checkpoints import load_weights, read_state_dict, save_atomic


class FailingToSave:
    """Pickling fails half-way, as a process killed while saving would."""

    def __reduce__(self):
        raise RuntimeError("interrupted while saving")


def test_an_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"weight": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_atomic({"weight": torch.zeros(3), "broken": FailingToSave()}, path)
    assert torch.equal(read_state_dict(path)["weight"], torch.ones(3))
    assert [file.name for file in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_training_checkpoints_and_state_dicts_both_load(tmp_path):
    model = create_reference_model()
    save_atomic(dict(model=model.state_dict(), epoch=3), tmp_path / "training.pt")
    save_atomic({name: tensor.half() for name, tensor in model.state_dict().items()}, tmp_path / "fp16.pt")
    for name in ("training.pt", "fp16.pt"):
        loaded = load_weights(create_reference_model(), tmp_path / name)
        assert torch.allclose(loaded.head.weight, model.head.weight, atol=1e-3)


@pytest.mark.parametrize("content, message", [
    (b"this is not a checkpoint", "is not a readable PyTorch checkpoint"),
    (b"", "is not a readable PyTorch checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(path), "--limit", "8"]) == 2
    error = capsys.readouterr().err
    assert message in error and str(path) in error and "Traceback" not in error


def test_a_checkpoint_of_another_architecture_gets_a_clear_error(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save(create_reference_model(embed_dim=48, num_heads=3).state_dict(), path)
    assert main(["eval", "--checkpoint", str(path), "--limit", "8"]) == 2
    error = capsys.readouterr().err
    assert "another architecture" in error and str(path) in error and "[48, 1, 2, 2] vs [96, 1, 2, 2]" in error


def test_a_list_saved_with_torch_save_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(path)


def test_saved_files_get_the_permissions_of_a_plain_open(tmp_path):
    previous = os.umask(0o022)
    try:
        save_atomic({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "weights.pt").stat().st_mode & 0o777 == 0o644
