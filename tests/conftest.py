"""Small random-init ViTs that make ATS keep different numbers of tokens per image, and small data."""
import gzip
import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ats.data.fashion_mnist import bundled_test_set
from ats.reference import create_reference_model


def tiny_vit(peaked: bool = True, **overrides) -> VisionTransformer:
    """A 6-block ViT on 32x32 images with 4x4 patches (64 patches + prefix). ``peaked`` scales the qkv
    weights so the class token's attention is peaked and kept-token counts differ between images."""
    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = VisionTransformer(**kwargs).eval()
    if peaked:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(4)
    return model


def contrasted_images(count: int = 8, size: int = 32) -> torch.Tensor:
    """[count, 3, size, size] random images whose contrast grows with the index."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 3.0, count)[:, None, None, None]
    return torch.randn(count, 3, size, size, generator=generator) * scale


def contrasted_clips(count: int, frames: int, size: int) -> torch.Tensor:
    """[count, frames, 1, size, size] random clips whose contrast grows with the index."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 3.0, count)[:, None, None, None, None]
    return torch.randn(count, frames, 1, size, size, generator=generator) * scale


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package), to call its functions."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def random_checkpoint(create, path):
    """Save the state dict of ``create()``, randomly initialised with seed 0, to ``path`` (for --checkpoint)."""
    torch.manual_seed(0)
    torch.save(create().state_dict(), path)
    return path


@pytest.fixture
def checkpoint(tmp_path):
    """A random-init reference model's state dict, saved for --checkpoint."""
    return random_checkpoint(create_reference_model, tmp_path / "reference.pt")


@pytest.fixture
def model() -> VisionTransformer:
    return tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    return contrasted_images()


def write_idx(path, tensor: torch.Tensor) -> None:
    """Write uint8 ``tensor`` as a gzipped IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, tensor.ndim]) + struct.pack(">" + "I" * tensor.ndim, *tensor.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + tensor.contiguous().numpy().tobytes())


@pytest.fixture
def fashion_train(tmp_path):
    """A folder laid out like Fashion-MNIST's training files, holding 64 of the bundled test images."""
    folder = tmp_path / "fashion-train"
    folder.mkdir()
    test_set = bundled_test_set()
    write_idx(folder / "train-images-idx3-ubyte.gz", test_set.images[:64])
    write_idx(folder / "train-labels-idx1-ubyte.gz", test_set.labels[:64].to(torch.uint8))
    return folder


def worker_pid(rank: int, launcher_pid: int) -> int:
    """The pid of the torchrun worker of ``rank`` (Linux: read from /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().split(") ")[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if f"RANK={rank}".encode() in environ and b"ATS_TEST_RUN=1" in environ and parent == launcher_pid:
                return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} found")


def assert_gradients_reach_every_parameter(model, images: torch.Tensor) -> None:
    """A backward through ``model`` (patched, in train mode) gives every parameter a finite, non-zero gradient."""
    model(images).logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def assert_pickles_patched(model, config, inputs: torch.Tensor, output=lambda result: result):
    """``torch.save`` / ``torch.load`` of ``model`` patched with ``config``: same class, config and ``output`` of
    the forward (the tensor to compare, e.g. a transformers output's logits). Returns the loaded model."""
    import io

    import ats

    ats.patch(model, config)
    with torch.no_grad():
        before = output(model(inputs))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model) and loaded._ats.config == model._ats.config
    with torch.no_grad():
        assert torch.equal(output(loaded(inputs)), before)
    return loaded


def assert_exact_kept_all_and_alone_in_a_batch(model, config, images: torch.Tensor) -> None:
    """Keep-all gives the unpatched output (< 1e-5); under ``config`` the output changes, images keep different
    token counts, and each image's output is the one it gets alone (< 1e-5)."""
    import ats

    with torch.no_grad():
        before = model(images)
        ats.patch(model, ats.KeepAllConfig())
        assert (model(images) - before).abs().max() < 1e-5
        ats.patch(model, config)
        together = model(images)
        kept = ats.last_stats(model).tokens_out[:, -1]
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    assert (together - alone).abs().max() < 1e-5 and kept.unique().numel() > 1
    assert not torch.allclose(together, before)


def assert_unpatch_restores(model, config, images: torch.Tensor) -> None:
    """Patching with ``config`` changes the output and ``ats.unpatch`` restores the original class and output."""
    import ats

    original = type(model)
    with torch.no_grad():
        before = model(images)
        ats.patch(model, config)
        patched = model(images)
        ats.unpatch(model)
        after = model(images)
    assert type(model) is original and not hasattr(model, "_ats")
    assert torch.equal(before, after) and not torch.allclose(before, patched)


def assert_logits_from_a_shared_prefix(model, config, images: torch.Tensor) -> None:
    """Patched with ``config``, ``ats.adapters.logits_from`` on ``tokens_before`` equals the whole forward, from
    block 0, 1 and the config's first block."""
    import ats
    from ats.adapters import logits_from, tokens_before

    ats.patch(model, config)
    with torch.no_grad():
        whole = model(images)
        for start in sorted({0, 1, config.first_block}):
            assert torch.equal(logits_from(model, tokens_before(model, images, start), start), whole), start


def assert_gflops_match_the_counter(model, expected: float, one: torch.Tensor, many: torch.Tensor, config) -> None:
    """``ats.gflops`` of the unpatched ``model`` equals ``expected`` (FlopCounterMode's count of one input, one
    multiply-add = one FLOP), and so does keep-all's per-input count on ``one``; under ``config`` every input of
    ``many`` costs less, within the patched upper bound."""
    import ats

    assert ats.gflops(model) * 1e9 == pytest.approx(expected, rel=1e-12)
    ats.patch(model, ats.KeepAllConfig())
    with torch.no_grad():
        model(one)
    assert torch.allclose(ats.last_stats(model).gflops.double() * 1e9, torch.tensor(expected, dtype=torch.float64))
    ats.patch(model, config)
    with torch.no_grad():
        model(many)
    gflops = ats.last_stats(model).gflops.double() * 1e9
    assert (gflops < expected).all() and (gflops <= ats.gflops(model) * 1e9 * (1 + 1e-6)).all()


def assert_bad_input_is_refused(model, depth: int, config, inputs: torch.Tensor, bad_shapes, tokens: int) -> None:
    """A transformers model of ``depth`` blocks: an ATS block past them is refused at ``ats.patch``; patched with
    ``config``, pixel_values of each of ``bad_shapes``, hidden states, attention maps and a mask over its
    ``tokens`` patch tokens are refused with errors that name them (``inputs``: a batch it takes)."""
    import ats

    with pytest.raises(ValueError, match=f"outside this model's {depth} blocks"):
        ats.patch(model, ats.ATSConfig.single_stage(k=10, block=depth))
    ats.patch(model, config)
    for shape in bad_shapes:
        with pytest.raises(ValueError, match="expected pixel_values of shape"):
            model(torch.zeros(shape))
    with pytest.raises(ValueError, match="output_hidden_states: a patched model cannot return hidden states"):
        model(inputs, output_hidden_states=True)
    with pytest.raises(ValueError, match="output_attentions: a patched model cannot return attention maps"):
        model(inputs, output_attentions=True)
    with pytest.raises(ValueError, match="no attention_mask or bool_masked_pos"):
        model(inputs, bool_masked_pos=torch.zeros(len(inputs), tokens, dtype=torch.bool))
