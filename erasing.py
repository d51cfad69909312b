"""Data augmentation, vectorised over a whole batch: Random Erasing, and the flips and copies of
the training recipes.

Random Erasing (Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data
Augmentation", arXiv:1708.04896) picks, with probability ``p``, one rectangle
in an image and overwrites its pixels with random noise, so that a classifier
learns not to rely on any single part of an object.

For each image the rectangle is drawn as in the paper:

* target area ``S_e`` uniform in ``[sl, sh]`` times the image area ``h * w``;
* aspect ratio ``r`` uniform (not log-uniform) in ``[r1, 1 / r1]``;
* height ``round(sqrt(S_e * r))``, width ``round(sqrt(S_e / r))``;
* the draw is repeated (up to ``max_attempts`` times) until the rectangle
  fits, which, as in the authors' code, means height < h and width < w
  (strictly) and, in addition here, both at least 1; an image for which no
  attempt fits is left unchanged;
* its top-left corner is uniform over all positions that keep it inside.

The erased box is filled with uniform random values over the dtype's range
(integers 0..255 for uint8 images, [0, 1) for floating point images):

* ``fill="pixel"``: every erased pixel, in every channel, gets its own value
  (the paper's "random values");
* ``fill="box"``: one value for the whole box, as the eraser the original
  write-up ran (yu4u's, with its defaults) did.

Where the box goes (``placement``):

* ``"paper"``: as above, the size is redrawn (at most ``max_attempts`` times)
  until it fits, then the position is uniform over the places that fit;
* ``"original"``: as the original write-up's eraser (yu4u's) did: height and
  width truncated (not rounded) from ``sqrt(S_e * r)`` and ``sqrt(S_e / r)``,
  the top-left corner uniform over the *whole* image, and size and position
  redrawn together until the box lies inside. Large boxes fit in fewer
  places, so they are kept less often: with the defaults on 28x28 images a
  box covers 13.5 % of the image on average, against 20.1 % with
  ``"paper"``, and 7 % of the boxes cover more than 30 % of the image,
  against 22 %. The original eraser had no limit on its redraws; here an
  image whose box has not fitted after ``REDRAW_LIMIT`` rounds is left
  unchanged (with the defaults a round fits about a third of the boxes).

Defaults are the paper's: p=0.5, sl=0.02, sh=0.4, r1=0.3.

All draws are made as arrays for the whole batch (``max_attempts`` tries per
image at once, or one round of redraws for every image still waiting), so
there is no Python loop over images, and a seed fixes the result.
"""

import numpy as np

FILLS = ("pixel", "box")
PLACEMENTS = ("paper", "original")
REDRAW_LIMIT = 1000  # "original" placement: rounds of redraws before an image is left unerased


def erase_boxes(n, h, w, p=0.5, sl=0.02, sh=0.4, r1=0.3, rng=None,
                max_attempts=10, placement="paper"):
    """Draw one erasing rectangle per image for n images of size h x w.

    Returns ``(top, left, height, width, erased)``, each of shape (n,);
    the first four are int64, ``erased`` is bool. Images that are not erased
    (the coin said no, or no attempt fitted) have a 0 x 0 box at (0, 0).
    placement: "paper" or "original" (the module's docstring says how they differ).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    rng = np.random.default_rng(rng)
    if placement == "original":
        return original_boxes(n, h, w, p, sl, sh, r1, rng)
    shape = (n, max_attempts)

    area = rng.uniform(sl, sh, shape) * (h * w)
    ratio = rng.uniform(r1, 1.0 / r1, shape)
    heights = np.rint(np.sqrt(area * ratio)).astype(np.int64)
    widths = np.rint(np.sqrt(area / ratio)).astype(np.int64)

    fits = (heights >= 1) & (heights < h) & (widths >= 1) & (widths < w)
    # argmax gives the first True per row (or 0 when the row has none,
    # which the `any` below then rules out).
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    erased = (rng.random(n) < p) & fits.any(axis=1)

    height = np.where(erased, heights[rows, first], 0)
    width = np.where(erased, widths[rows, first], 0)
    # The upper bounds are exclusive, so top lies in 0..h - height.
    top = np.where(erased, rng.integers(0, h - height + 1), 0)
    left = np.where(erased, rng.integers(0, w - width + 1), 0)
    return top, left, height, width, erased


def original_boxes(n, h, w, p, sl, sh, r1, rng):
    """erase_boxes with placement="original": the coin first, then size and position drawn together,
    round after round, for the images whose box does not lie inside yet."""
    erased = rng.random(n) < p
    top, left, height, width = (np.zeros(n, np.int64) for _ in range(4))
    waiting = np.flatnonzero(erased)
    for _ in range(REDRAW_LIMIT):
        if not len(waiting):
            break
        area = rng.uniform(sl, sh, len(waiting)) * (h * w)
        ratio = rng.uniform(r1, 1.0 / r1, len(waiting))
        box_h = np.sqrt(area * ratio).astype(np.int64)  # truncated, as int() did
        box_w = np.sqrt(area / ratio).astype(np.int64)
        box_top, box_left = rng.integers(0, h, len(waiting)), rng.integers(0, w, len(waiting))
        inside = (box_top + box_h <= h) & (box_left + box_w <= w)
        placed = waiting[inside]
        top[placed], left[placed] = box_top[inside], box_left[inside]
        height[placed], width[placed] = box_h[inside], box_w[inside]
        waiting = waiting[~inside]
    erased[waiting] = False
    erased &= (height > 0) & (width > 0)  # an empty box erases nothing
    return tuple(np.where(erased, v, 0) for v in (top, left, height, width)) + (erased,)


def _uniform_fill(rng, size, dtype):
    """Uniform random values over the value range of dtype."""
    if dtype == np.uint8:
        return rng.integers(0, 256, size, dtype=np.uint8)
    if np.issubdtype(dtype, np.floating):
        draw_dtype = np.float64 if dtype == np.float64 else np.float32
        values = rng.random(size, dtype=draw_dtype).astype(dtype)
        # Casting down (e.g. to float16) may round values up to 1.0.
        below_one = np.nextafter(dtype.type(1), dtype.type(0))
        return np.minimum(values, below_one)
    raise TypeError(f"random_erasing supports uint8 or float images, "
                    f"not {dtype}")


def random_erasing(images, p=0.5, sl=0.02, sh=0.4, r1=0.3, rng=None,
                   max_attempts=10, fill="pixel", placement="paper"):
    """Return a copy of images with Random Erasing applied to each image.

    images: array of shape (n, h, w) or (n, h, w, c), uint8 or float.
    rng: a numpy Generator, an int seed, or None for fresh entropy.
    fill: "pixel" (a value per erased pixel) or "box" (one value per box).
    placement: "paper" or "original", where the box goes (module docstring).
    The result has the same shape and dtype; the input is not modified.
    """
    images = np.asarray(images)
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, not {fill!r}")
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (n, h, w) or (n, h, w, c), "
                         f"got shape {images.shape}")
    rng = np.random.default_rng(rng)
    n, h, w = images.shape[:3]
    top, left, height, width, _ = erase_boxes(
        n, h, w, p, sl, sh, r1, rng, max_attempts, placement)

    # (n, h, 1) row test and (n, 1, w) column test broadcast to (n, h, w).
    r = np.arange(h)[None, :, None]
    c = np.arange(w)[None, None, :]
    t, b = top[:, None, None], (top + height)[:, None, None]
    lft, rgt = left[:, None, None], (left + width)[:, None, None]
    mask = (r >= t) & (r < b) & (c >= lft) & (c < rgt)

    out = images.copy()
    if fill == "pixel":
        # Boolean indexing with an (n, h, w) mask selects (k,) or (k, c) values.
        values = _uniform_fill(rng, (int(mask.sum()),) + images.shape[3:],
                               images.dtype)
    else:
        # One grey level per image (drawn for all, used where erased), spread
        # over its box's pixels and channels.
        per_image = _uniform_fill(rng, n, images.dtype)
        values = np.broadcast_to(
            per_image[:, None, None].reshape((n, 1, 1) + (1,) * (images.ndim - 3)),
            images.shape)[mask]
    out[mask] = values
    return out


def flip_and_erase(x, rng, flip_p=0.5, erase_p=0.5, fill="pixel", placement="paper"):
    """A new batch: each image mirrored left-right with probability flip_p, then Random Erasing.

    x: uint8 or float images (n, h, w) or (n, h, w, c); the result has the same shape and dtype.
    The flip comes first, as in the original write-up's pipeline.
    """
    flip = (rng.random(len(x)) < flip_p).reshape((-1,) + (1,) * (x.ndim - 1))
    return random_erasing(np.where(flip, x[:, :, ::-1], x), p=erase_p, rng=rng, fill=fill, placement=placement)


def augment(x, y, copies=2, rng=None, erase_p=0.5, fill="pixel", placement="paper"):
    """The original write-up's fixed augmentation: the originals, then `copies` flipped-and-erased
    copies of each (51,000 images and copies=2 give 153,000). rng: a NumPy Generator or a seed.
    """
    rng = np.random.default_rng(rng)
    x_all = [x] + [flip_and_erase(x, rng, erase_p=erase_p, fill=fill, placement=placement) for _ in range(copies)]
    return np.concatenate(x_all), np.concatenate([y] * (copies + 1))
