import pytest
import torch

from ats.data.fashion_mnist import FASHION_MNIST_CLASSES, bundled_test_set, normalise
from ats.data.moving_garments import (
    MOVING_GARMENT_CLASSES,
    TEST_SEED,
    ClipSpec,
    MovingGarments,
    clip_label,
    clip_motion,
    garment_frames,
    moving_garments_test,
    moving_garments_train,
    render_clip,
    split_labels,
)

STILL = ClipSpec(clutter=0)


@pytest.fixture(scope="module")
def source():
    """The bundled Fashion-MNIST test images uint8 [10000, 28, 28] and labels [10000]."""
    test_set = bundled_test_set()
    return test_set.images, test_set.labels


def clutter_only(images, labels, index, spec, seed=0):
    """Clip ``index`` with its garment blacked out (the random draws do not depend on pixels): the clutter."""
    blank = images.clone()
    blank[index] = 0
    return render_clip(blank, labels, index, spec, seed)[0]


def test_classes():
    assert len(MOVING_GARMENT_CLASSES) == 20 and MovingGarments.classes == MOVING_GARMENT_CLASSES
    assert MOVING_GARMENT_CLASSES[:2] == ("T-shirt/top, moving left", "T-shirt/top, moving right")
    assert MOVING_GARMENT_CLASSES[19] == f"{FASHION_MNIST_CLASSES[9]}, moving right"


def test_same_index_and_seed_give_the_same_clip_in_any_order(source):
    forward = [render_clip(*source, index, seed=3) for index in (5, 17, 40)]
    backward = [render_clip(*source, index, seed=3) for index in (40, 17, 5)][::-1]
    for (clip, label), (again, label_again) in zip(forward, backward):
        assert torch.equal(clip, again) and label == label_again
    assert not torch.equal(forward[0][0], render_clip(*source, 5, seed=4)[0])
    assert clip_motion(5, seed=3) != clip_motion(6, seed=3)


def test_shapes_and_dtypes(source):
    clip, label = render_clip(*source, 0)
    assert clip.shape == (8, 64, 64) and clip.dtype == torch.uint8 and type(label) is int
    spec = ClipSpec(num_frames=4, size=48, clutter=2, clutter_size=6)
    clip, label = render_clip(*source, 0, spec)
    assert clip.shape == (4, 48, 48) and clip.dtype == torch.uint8
    item, label = MovingGarments(*source, spec)[1]
    assert item.shape == (4, 1, 48, 48) and item.dtype == torch.float32 and type(label) is int


def test_labels_are_class_and_direction(source):
    images, labels = source
    directions = []
    for index in range(200):
        motion = clip_motion(index, seed=1)
        label = render_clip(images, labels, index, seed=1)[1]
        assert label == int(labels[index]) * 2 + motion.direction == clip_label(int(labels[index]), motion)
        assert label in range(20) and 2 <= abs(motion.dx) <= 4 and abs(motion.dy) <= 2
        directions.append(motion.direction)
    assert 80 <= sum(directions) <= 120
    rendered = torch.tensor([render_clip(images, labels, index, seed=1)[1] for index in range(200)])
    garments, split_directions = split_labels(rendered)
    assert torch.equal(garments, labels[:200].long()) and split_directions.tolist() == directions


def test_garment_centre_of_mass_moves_with_the_direction(source):
    images, labels = source
    columns = torch.arange(64, dtype=torch.float64)
    for index in range(50):
        clip, label = render_clip(images, labels, index, STILL, seed=2)
        mass = clip.double().sum(1)  # [T, W]
        centre = (mass * columns).sum(1) / mass.sum(1)
        steps = centre.diff()
        assert (steps > 0).all() if label % 2 else (steps < 0).all(), (index, centre)


def test_reversed_clip_flips_the_direction(source):
    images, labels = source
    for index in range(20):
        clip, label = render_clip(images, labels, index, STILL)
        backwards = clip_motion(index, spec=STILL).reversed(STILL.num_frames)
        assert torch.equal(clip.flip(0), garment_frames(images[index], backwards, STILL))
        assert clip_label(int(labels[index]), backwards) == label ^ 1


@pytest.mark.parametrize("spec", [STILL, ClipSpec(size=56, clutter=0, min_speed=4.0, max_vertical_speed=4.0)],
                         ids=["default", "tightest"])
def test_garment_stays_inside_the_canvas(source, spec):
    images, labels = source
    for index in range(100):
        clip = render_clip(images, labels, index, spec, seed=5)[0]
        assert (clip.long().sum((1, 2)) == images[index].long().sum()).all(), index


def test_clutter_is_static_and_combines_by_maximum(source):
    images, labels = source
    visible = 0
    for index in range(20):
        clutter = clutter_only(images, labels, index, ClipSpec())
        assert (clutter == clutter[0]).all()
        visible += bool(clutter.any())
        garment = render_clip(images, labels, index, STILL)[0]
        assert torch.equal(render_clip(images, labels, index)[0], torch.maximum(garment, clutter))
    assert visible >= 18


def test_clutter_comes_from_other_images():
    """A target of 200s over clutter from an image of 100s: 200 only where the garment is, 100s outside it."""
    images = torch.stack([torch.full((28, 28), 200, dtype=torch.uint8), torch.full((28, 28), 100, dtype=torch.uint8)])
    labels = torch.tensor([3, 7])
    for seed in range(10):
        clip, label = render_clip(images, labels, 0, seed=seed)
        garment = render_clip(images, labels, 0, STILL, seed)[0]
        assert torch.equal(clip == 200, garment == 200) and label // 2 == 3
        assert ((clip == 100) | (clip == 200) | (clip == 0)).all() and (clip == 100).any()
        assert (clutter_only(images, labels, 0, ClipSpec(), seed) == 100).sum() >= 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=1), "num_frames must be >= 2"),
    (dict(min_speed=0.0), "0 < min_speed <= max_speed"),
    (dict(min_speed=5.0, max_speed=4.0), "0 < min_speed <= max_speed"),
    (dict(max_vertical_speed=-1.0), "max_vertical_speed must be >= 0"),
    (dict(size=55), "size 55 is too small.*needs size >= 56"),
    (dict(num_frames=16), "size 64 is too small.*16 frames needs size >= 88"),
    (dict(max_vertical_speed=6.0), "up to 6 pixels per frame.*needs size >= 70"),
    (dict(clutter=-1), "clutter .* must be >= 0"),
    (dict(clutter_size=0), r"clutter_size must be in \[1, 28\]"),
    (dict(clutter_size=29), r"clutter_size must be in \[1, 28\]"),
])
def test_clip_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipSpec(**kwargs)


def test_bad_sources(source):
    images, labels = source
    with pytest.raises(ValueError, match=r"uint8 \[N, 28, 28\]"):
        MovingGarments(images.float(), labels)
    with pytest.raises(ValueError, match="labels must be"):
        render_clip(images, labels[:5], 0)
    with pytest.raises(ValueError, match="at least 2 images"):
        render_clip(images[:1], labels[:1], 0)
    assert render_clip(images[:1], labels[:1], 0, STILL)[0].any()
    with pytest.raises(IndexError, match="out of range"):
        render_clip(images, labels, len(images))


def test_dataset_returns_normalised_rendered_clips(source):
    dataset = MovingGarments(*source, seed=9, transform=lambda clip: clip * 2)
    assert len(dataset) == 10000
    for index in (0, 123, 9999):
        clip, label = render_clip(*source, index, seed=9)
        item, item_label = dataset[index]
        assert torch.equal(item, normalise(clip[:, None]) * 2) and item_label == label


def test_test_split_is_deterministic(source):
    first, second = moving_garments_test(), moving_garments_test(ClipSpec(clutter=0))
    assert len(first) == 10000 and first.seed == second.seed == TEST_SEED
    assert torch.equal(first[7][0], normalise(render_clip(*source, 7, seed=TEST_SEED)[0][:, None]))
    assert torch.equal(first[7][0], moving_garments_test()[7][0])


def test_train_split_from_a_folder(fashion_train, source):
    dataset = moving_garments_train(fashion_train, seed=11)
    assert len(dataset) == 64 and dataset.seed == 11
    clip, label = render_clip(source[0][:64], source[1][:64], 3, seed=11)
    assert torch.equal(dataset[3][0], normalise(clip[:, None])) and dataset[3][1] == label
