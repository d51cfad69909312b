"""Tests for erasing.py, written as examples of how Random Erasing behaves."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import erasing
from erasing import erase_boxes, random_erasing


def box_mask(top, left, height, width, h, w):
    """(n, h, w) bool mask of the boxes, built independently of erasing.py."""
    mask = np.zeros((len(top), h, w), dtype=bool)
    for i, (t, l, bh, bw) in enumerate(zip(top, left, height, width)):
        mask[i, t:t + bh, l:l + bw] = True
    return mask


def test_importing_does_not_pull_in_tensorflow():
    # In a fresh interpreter, since other test files may import TensorFlow.
    code = ("import sys, erasing; "
            "assert 'tensorflow' not in sys.modules; "
            "assert 'keras' not in sys.modules")
    project_root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=project_root)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_fraction_of_erased_images_is_close_to_p(p):
    n = 20_000
    *_, erased = erase_boxes(n, 28, 28, p=p, rng=0)
    standard_error = np.sqrt(p * (1 - p) / n)
    assert abs(erased.mean() - p) < 4 * standard_error


def test_p0_erases_nothing_and_p1_erases_almost_everything():
    images = np.random.default_rng(1).integers(0, 256, (2000, 28, 28),
                                               dtype=np.uint8)
    assert np.array_equal(random_erasing(images, p=0.0, rng=2), images)

    # With 10 attempts a default-sized box practically always fits a 28x28
    # image; the rare image where none fits stays unchanged.
    *_, erased = erase_boxes(20_000, 28, 28, p=1.0, rng=3)
    assert erased.mean() >= 0.999


@pytest.mark.parametrize("h, w", [(28, 28), (64, 48)])
def test_boxes_have_the_requested_area_and_aspect_ratio(h, w):
    sl, sh, r1 = 0.02, 0.4, 0.3
    top, left, height, width, erased = erase_boxes(
        20_000, h, w, p=1.0, sl=sl, sh=sh, r1=r1, rng=4)
    top, left = top[erased], left[erased]
    height, width = height[erased].astype(float), width[erased].astype(float)

    # height and width are rounded from exact values a = sqrt(S*r) and
    # b = sqrt(S/r), so a lies in [height - 0.5, height + 0.5] and b in
    # [width - 0.5, width + 0.5]. Since S = a*b and r = a/b, the exact
    # area and ratio are only known to lie in the intervals below; each
    # must overlap the requested range.
    min_area = (height - 0.5) * (width - 0.5)
    max_area = (height + 0.5) * (width + 0.5)
    assert np.all(max_area >= sl * h * w)
    assert np.all(min_area <= sh * h * w)

    min_ratio = (height - 0.5) / (width + 0.5)
    max_ratio = (height + 0.5) / (width - 0.5)
    assert np.all(max_ratio >= r1)
    assert np.all(min_ratio <= 1 / r1)

    # Inside the image, and strictly smaller than it, as in the paper's code.
    assert np.all((height >= 1) & (height < h) & (width >= 1) & (width < w))
    assert np.all((top >= 0) & (top + height <= h))
    assert np.all((left >= 0) & (left + width <= w))


def test_positions_cover_the_whole_allowed_range():
    top, left, height, width, erased = erase_boxes(20_000, 28, 28, p=1.0,
                                                   rng=5)
    assert top.min() == 0 and (top + height).max() == 28
    assert left.min() == 0 and (left + width).max() == 28


@pytest.mark.parametrize("fill", ["pixel", "box"])
@pytest.mark.parametrize("shape, dtype", [
    ((500, 28, 28), np.uint8),
    ((500, 28, 28), np.float32),
    ((500, 28, 28, 1), np.uint8),
    ((500, 20, 24, 3), np.float32),
])
def test_only_pixels_inside_the_box_change(shape, dtype, fill):
    rng = np.random.default_rng(6)
    if dtype == np.uint8:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        images = rng.random(shape, dtype=np.float32)
    n, h, w = shape[:3]

    out = random_erasing(images, p=0.7, rng=7, fill=fill)

    assert out.shape == images.shape and out.dtype == images.dtype
    # random_erasing draws its boxes first from the same generator, so the
    # same seed reproduces them, whatever the fill: the erased fraction, the
    # areas and the aspect ratios tested above are those of both fills.
    top, left, height, width, erased = erase_boxes(n, h, w, p=0.7, rng=7)
    inside = box_mask(top, left, height, width, h, w)
    assert np.array_equal(out[~inside], images[~inside])
    assert np.array_equal(inside.any(axis=(1, 2)), erased)
    if dtype == np.float32:
        assert np.all((out[inside] >= 0) & (out[inside] < 1))


def test_same_seed_same_output_and_input_untouched():
    images = np.random.default_rng(8).integers(0, 256, (300, 28, 28),
                                               dtype=np.uint8)
    original = images.copy()

    a = random_erasing(images, rng=9)
    b = random_erasing(images, rng=np.random.default_rng(9))
    c = random_erasing(images, rng=10)

    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(images, original)
    assert a is not images


def test_filled_values_look_uniform():
    n, h, w = 1000, 28, 28
    zeros = np.zeros((n, h, w), dtype=np.uint8)
    out = random_erasing(zeros, p=1.0, rng=11)
    top, left, height, width, _ = erase_boxes(n, h, w, p=1.0, rng=11)
    filled = out[box_mask(top, left, height, width, h, w)].astype(float)

    # Uniform on 0..255: mean 127.5, standard deviation about 73.9.
    standard_error = 73.9 / np.sqrt(filled.size)
    assert abs(filled.mean() - 127.5) < 4 * standard_error
    assert filled.min() == 0 and filled.max() == 255

    floats = random_erasing(zeros.astype(np.float32), p=1.0, rng=11)
    filled = floats[box_mask(top, left, height, width, h, w)]
    assert abs(filled.mean() - 0.5) < 0.01
    assert filled.min() >= 0 and filled.max() < 1


@pytest.mark.parametrize("shape, dtype", [((3000, 28, 28), np.uint8), ((3000, 20, 24, 3), np.float32)])
def test_box_fill_gives_each_box_one_value_uniform_over_the_range(shape, dtype):
    n, h, w = shape[:3]
    images = np.zeros(shape, dtype=dtype)
    out = random_erasing(images, p=1.0, rng=12, fill="box")
    top, left, height, width, erased = erase_boxes(n, h, w, p=1.0, rng=12)
    values = []
    for i in np.flatnonzero(erased):
        box = out[i, top[i]:top[i] + height[i], left[i]:left[i] + width[i]]
        assert np.all(box == box.flat[0])  # one grey level over the box and its channels
        values.append(float(box.flat[0]))
    values = np.array(values)
    top_value, spread = (255, 73.9) if dtype == np.uint8 else (1, 0.2887)  # uniform: sd = range / sqrt(12)
    assert abs(values.mean() - top_value / 2) < 4 * spread / np.sqrt(len(values))
    assert values.min() >= 0 and values.max() <= top_value and (dtype == np.uint8 or values.max() < 1)
    assert len(np.unique(values)) > (200 if dtype == np.uint8 else len(values) * 0.99)
    # Pixel fill over the same boxes: many values per box.
    pixel = random_erasing(images, p=1.0, rng=12, fill="pixel")
    i = int(np.argmax(height * width))
    assert len(np.unique(pixel[i, top[i]:top[i] + height[i], left[i]:left[i] + width[i]])) > 10


def test_an_unknown_fill_is_rejected():
    with pytest.raises(ValueError, match="fill must be one of"):
        random_erasing(np.zeros((2, 8, 8), dtype=np.uint8), fill="noise")


def test_unsupported_dtype_is_rejected():
    with pytest.raises(TypeError):
        random_erasing(np.zeros((2, 8, 8), dtype=np.int32), p=1.0, rng=0)


def test_augment_keeps_the_originals_first_then_adds_the_copies():
    x, y = data.load_data("train")
    x, y = x[:1000], y[:1000]
    x_aug, y_aug = erasing.augment(x, y, copies=2, rng=7)
    assert x_aug.shape == (3000, 28, 28) and x_aug.dtype == np.uint8
    assert np.array_equal(x_aug[:1000], x) and np.array_equal(y_aug, np.concatenate([y, y, y]))
    copy = x_aug[1000:2000]
    mirrored = np.array([np.array_equal(c[:, ::-1], o) for c, o in zip(copy, x)])
    unchanged = np.array([np.array_equal(c, o) for c, o in zip(copy, x)])
    # Flip p=0.5 and erasing p=0.5 are independent: about a quarter of the copies are exact mirrors
    # and about a quarter are untouched (a few symmetric images count as both).
    assert 0.2 < mirrored.mean() < 0.32 and 0.2 < unchanged.mean() < 0.32
    again, _ = erasing.augment(x, y, copies=2, rng=7)
    assert np.array_equal(again, x_aug)
    other, _ = erasing.augment(x, y, copies=2, rng=8)
    assert not np.array_equal(other, x_aug)
    assert erasing.augment(x, y, copies=0)[0].shape == (1000, 28, 28)
    boxed, _ = erasing.augment(x, y, copies=1, rng=7, fill="box")
    assert np.array_equal(boxed[:1000], x) and not np.array_equal(boxed, x_aug[:2000])


# ---- placement="original": the original write-up's eraser ----

def original_eraser_box(rng, h, w, sl=0.02, sh=0.4, r1=0.3):
    """One box as the original write-up's eraser (yu4u's, defaults) drew it, one image at a time:
    (top, left, height, width)."""
    while True:
        area = rng.uniform(sl, sh) * h * w
        ratio = rng.uniform(r1, 1 / r1)
        width, height = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        left, top = rng.integers(0, w), rng.integers(0, h)
        if left + width <= w and top + height <= h:
            return top, left, height, width


@pytest.mark.parametrize("h, w", [(28, 28), (20, 36)])
def test_original_placement_draws_boxes_as_the_original_eraser_did(h, w):
    """Same distribution as the one-image-at-a-time oracle above: box sides, areas and corners."""
    rng = np.random.default_rng(20)
    oracle = np.array([original_eraser_box(rng, h, w) for _ in range(20_000)], dtype=float)
    top, left, height, width, erased = erase_boxes(40_000, h, w, p=1.0, rng=21, placement="original")
    assert erased.all()
    boxes = np.stack([top, left, height, width, height * width], axis=1).astype(float)
    oracle = np.column_stack([oracle, oracle[:, 2] * oracle[:, 3]])
    for column in range(5):
        a, b = boxes[:, column], oracle[:, column]
        standard_error = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 5 * standard_error, column
    assert np.all((top + height <= h) & (left + width <= w))
    # Sides truncated: height <= sqrt(S*r) < height + 1, width likewise, so S lies in
    # [height * width, (height + 1) * (width + 1)), which must meet the requested range.
    assert np.all(height * width <= 0.4 * h * w) and np.all((height + 1) * (width + 1) > 0.02 * h * w)


def test_original_placement_keeps_fewer_large_boxes_than_the_paper():
    """Large boxes fit in fewer places, and the original eraser redrew their size with their place."""
    area = {}
    for placement in ("paper", "original"):
        _, _, height, width, erased = erase_boxes(40_000, 28, 28, p=1.0, rng=22, placement=placement)
        area[placement] = (height * width)[erased] / 784
    assert 0.195 < area["paper"].mean() < 0.207 and 0.13 < area["original"].mean() < 0.14
    assert (area["original"] > 0.3).mean() < 0.1 and (area["paper"] > 0.3).mean() > 0.2


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_original_placement_erases_a_fraction_p(p):
    *_, erased = erase_boxes(20_000, 28, 28, p=p, rng=23, placement="original")
    assert abs(erased.mean() - p) < 4 * np.sqrt(p * (1 - p) / 20_000)


def test_a_box_that_can_never_fit_leaves_its_image_unchanged():
    images = np.full((50, 4, 4), 7, dtype=np.uint8)
    out = random_erasing(images, p=1.0, sl=3.0, sh=4.0, rng=24, placement="original")  # 3-4 times the image
    assert np.array_equal(out, images)


def test_augment_passes_the_placement_on():
    x, y = data.load_data("train")
    x, y = x[:500], y[:500]
    placed, _ = erasing.augment(x, y, copies=1, rng=25, fill="box", placement="original")
    expected = erasing.flip_and_erase(x, np.random.default_rng(25), fill="box", placement="original")
    assert np.array_equal(placed[500:], expected)
    assert not np.array_equal(placed, erasing.augment(x, y, copies=1, rng=25, fill="box")[0])
    with pytest.raises(ValueError, match="placement must be one of"):
        erase_boxes(2, 8, 8, placement="centre")
