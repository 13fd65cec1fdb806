import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ats.adapters import data_config
from ats.data.build import build_dataset, training_set
from ats.data.fashion_mnist import bundled_test_set, fashion_mnist_train, read_idx
from ats.reference import REFERENCE_KWARGS, create_reference_model, load_reference_model


def write_image_folder(root, classes=("bag", "shoe"), per_class=3, size=(40, 30)):
    generator = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = (generator.random((*size, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def test_bundled_test_set():
    dataset = bundled_test_set()
    assert len(dataset) == 10000
    assert dataset.labels.bincount().tolist() == [1000] * 10
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= label < 10


def test_limit_and_bad_limit():
    model = create_reference_model()
    assert len(build_dataset(None, data_config(model), limit=17)) == 17
    with pytest.raises(ValueError, match="--limit"):
        build_dataset(None, data_config(model), limit=0)


def test_image_folder_uses_the_models_data_config(tmp_path):
    root = write_image_folder(tmp_path / "data")
    reference = build_dataset(str(root), data_config(create_reference_model()))
    assert len(reference) == 6 and reference[0][0].shape == (1, 28, 28)
    deit = build_dataset(str(root), data_config(timm.create_model("deit_tiny_patch16_224")), limit=2)
    assert len(deit) == 2 and deit[0][0].shape == (3, 224, 224) and deit[1][1] == 0


def test_image_folder_errors(tmp_path):
    model = create_reference_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"), data_config(model))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_dataset(str(tmp_path / "flat"), data_config(model))
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        build_dataset(str(tmp_path / "flat"), data_config(model))


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_reference_geometry_and_checkpoint_round_trip(tmp_path):
    model = create_reference_model()
    assert model.patch_embed.num_patches == 196 and model.num_prefix_tokens == 1 and len(model.blocks) == 12
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (1, 28, 28) and len(config["mean"]) == 1
    path = tmp_path / "reference.pt"
    torch.save({name: tensor.half() for name, tensor in model.state_dict().items()}, path)
    loaded = load_reference_model(path)
    assert not loaded.training
    assert torch.allclose(loaded.pos_embed, model.pos_embed.half().float())
    with pytest.raises(FileNotFoundError, match="train_reference"):
        load_reference_model(tmp_path / "missing.pt")
    assert REFERENCE_KWARGS["img_size"] == 28


def test_training_set_reads_a_fashion_mnist_folder_or_names_the_package(fashion_train, tmp_path):
    dataset = training_set(fashion_train, data_config(create_reference_model()))
    assert len(dataset) == 64 and dataset[0][0].shape == (1, 28, 28)
    assert torch.equal(dataset.labels, bundled_test_set().labels[:64])
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_train(tmp_path)
