import pytest
import torch

from ats.data.cluttered import (
    TEST_SEED,
    CanvasSpec,
    ClutteredFashionMNIST,
    cluttered_test,
    cluttered_train,
    render_canvas,
    target_box,
)
from ats.data.fashion_mnist import FASHION_MNIST_CLASSES, bundled_test_set, normalise

CLEAN = CanvasSpec(clutter=0)
SCALED = CanvasSpec(min_scale=0.5, max_scale=1.5)


@pytest.fixture(scope="module")
def source():
    """The bundled Fashion-MNIST test images uint8 [10000, 28, 28] and labels [10000]."""
    test_set = bundled_test_set()
    return test_set.images, test_set.labels


def crop(canvas, box):
    top, left, height, width = box
    return canvas[top:top + height, left:left + width]


def outside(canvas, box):
    """The canvas with the box blacked out."""
    canvas = canvas.clone()
    crop(canvas, box).zero_()
    return canvas


def clutter_only(images, labels, index, spec, seed=0):
    """Canvas ``index`` with its garment blacked out (the random draws do not depend on pixels): the clutter."""
    blank = images.clone()
    blank[index] = 0
    return render_canvas(blank, labels, index, spec, seed)[0]


def test_same_index_and_seed_give_the_same_canvas_in_any_order(source):
    forward = [render_canvas(*source, index, seed=3) for index in (5, 17, 40)]
    backward = [render_canvas(*source, index, seed=3) for index in (40, 17, 5)][::-1]
    for (canvas, label), (again, label_again) in zip(forward, backward):
        assert torch.equal(canvas, again) and label == label_again
    assert target_box(5, 3) == target_box(5, 3)


def test_different_seed_gives_a_different_canvas(source):
    assert not torch.equal(render_canvas(*source, 5, seed=3)[0], render_canvas(*source, 5, seed=4)[0])
    assert [target_box(5, seed) for seed in range(5)] != [target_box(5, 0)] * 5


def test_shapes_and_dtypes(source):
    canvas, label = render_canvas(*source, 0)
    assert canvas.shape == (56, 56) and canvas.dtype == torch.uint8 and type(label) is int
    spec = CanvasSpec(size=40, clutter=3, clutter_size=5)
    assert render_canvas(*source, 0, spec)[0].shape == (40, 40)
    item, label = ClutteredFashionMNIST(*source, spec)[1]
    assert item.shape == (1, 40, 40) and item.dtype == torch.float32 and type(label) is int
    assert ClutteredFashionMNIST.classes == FASHION_MNIST_CLASSES


def test_labels_are_the_target_class(source):
    images, labels = source
    for index in range(0, 10000, 97):
        assert render_canvas(images, labels, index, seed=1)[1] == int(labels[index])


def test_without_clutter_the_garment_sits_in_its_box(source):
    images, labels = source
    for index in range(100):
        canvas = render_canvas(images, labels, index, CLEAN, seed=2)[0]
        box = target_box(index, 2, CLEAN)
        assert box.height == box.width == 28
        assert torch.equal(crop(canvas, box), images[index]) and not outside(canvas, box).any()
        assert canvas.long().sum() == images[index].long().sum()
    corners = torch.tensor([target_box(index, 2, CLEAN)[:2] for index in range(400)])
    assert corners.min() == 0 and corners.max() == 56 - 28  # uniform over every position inside the canvas


def test_scaled_garment_changes_size_and_stays_inside(source):
    images, labels = source
    spec, sides = CanvasSpec(clutter=0, min_scale=0.5, max_scale=1.5), set()
    for index in range(100):
        canvas = render_canvas(images, labels, index, spec, seed=6)[0]
        box = target_box(index, 6, spec)
        assert box.height == box.width and 14 <= box.height <= 42
        assert box.top >= 0 and box.left >= 0 and box.top + box.height <= 56 and box.left + box.width <= 56
        assert not outside(canvas, box).any()
        expected = images[index].double().sum() * (box.height / 28) ** 2
        assert abs(canvas.double().sum() - expected) <= 0.03 * expected, index  # area-preserving resize
        sides.add(box.height)
    assert len(sides) > 10 and min(sides) < 20 and max(sides) > 36
    assert target_box(0, 6, SCALED) == target_box(0, 6, spec)  # clutter is drawn after the box


def test_clutter_comes_from_other_images():
    """A target of 200s with clutter from an image of 100s: 200 only in the box, 100s outside it; and the
    other way round, clutter of 200s over a target of 100s."""
    images = torch.stack([torch.full((28, 28), 200, dtype=torch.uint8), torch.full((28, 28), 100, dtype=torch.uint8)])
    labels = torch.tensor([3, 7])
    for seed in range(10):
        canvas, label = render_canvas(images, labels, 0, seed=seed)
        box = target_box(0, seed)
        assert label == 3 and (crop(canvas, box) == 200).all()
        assert ((canvas == 0) | (canvas == 100) | (canvas == 200)).all() and (canvas == 100).any()
        assert not (outside(canvas, box) == 200).any()
        canvas = render_canvas(images, labels, 1, seed=seed)[0]
        assert ((canvas == 0) | (canvas == 100) | (canvas == 200)).all() and (canvas == 200).any()
        assert not (outside(canvas, target_box(1, seed)) == 100).any()


def test_clutter_combines_by_maximum(source):
    images, labels = source
    overlaps = 0
    for index in range(20):
        clutter = clutter_only(images, labels, index, CanvasSpec())
        garment = render_canvas(images, labels, index, CLEAN)[0]
        assert clutter.any()
        assert torch.equal(render_canvas(images, labels, index)[0], torch.maximum(garment, clutter))
        overlaps += bool(((garment > 0) & (clutter > 0)).any())
    assert overlaps >= 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_scale=0.0), "0 < min_scale <= max_scale"),
    (dict(min_scale=1.5, max_scale=1.2), "0 < min_scale <= max_scale"),
    (dict(size=27), "size 27 is too small.*28x28 pixels, so size must be >= 28"),
    (dict(max_scale=2.5), "size 56 is too small.*up to 2.5 is 70x70 pixels, so size must be >= 70"),
    (dict(clutter=-1), "clutter .* must be >= 0"),
    (dict(clutter_size=0), r"clutter_size must be in \[1, 28\]"),
    (dict(clutter_size=29), r"clutter_size must be in \[1, 28\]"),
])
def test_canvas_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CanvasSpec(**kwargs)


def test_canvas_spec_accepts_the_edges():
    assert CanvasSpec(size=28, clutter=0, clutter_size=1).size == 28
    assert CanvasSpec(size=42, min_scale=0.1, max_scale=1.5, clutter_size=28).max_scale == 1.5


def test_bad_sources(source):
    images, labels = source
    with pytest.raises(ValueError, match=r"uint8 \[N, 28, 28\]"):
        ClutteredFashionMNIST(images.float(), labels)
    with pytest.raises(ValueError, match="at least 2 images"):
        render_canvas(images[:1], labels[:1], 0)
    with pytest.raises(IndexError, match="out of range"):
        render_canvas(images, labels, len(images))


def test_dataset_returns_normalised_rendered_canvases(source):
    dataset = ClutteredFashionMNIST(*source, SCALED, seed=9, transform=lambda image: image * 2)
    assert len(dataset) == 10000
    for index in (0, 123, 9999):
        canvas, label = render_canvas(*source, index, SCALED, seed=9)
        item, item_label = dataset[index]
        assert torch.equal(item, normalise(canvas[None]) * 2) and item_label == label


def test_test_split_is_deterministic(source):
    first, second = cluttered_test(), cluttered_test()
    assert len(first) == len(second) == 10000 and first.seed == TEST_SEED
    for index in (7, 5000):
        assert torch.equal(first[index][0], second[index][0]) and first[index][1] == second[index][1]
        assert torch.equal(first[index][0], normalise(render_canvas(*source, index, seed=TEST_SEED)[0][None]))


def test_train_split_from_a_folder(fashion_train, source):
    dataset = cluttered_train(fashion_train, seed=11)
    assert len(dataset) == 64 and dataset.seed == 11
    canvas, label = render_canvas(source[0][:64], source[1][:64], 3, seed=11)
    assert torch.equal(dataset[3][0], normalise(canvas[None])) and dataset[3][1] == label
