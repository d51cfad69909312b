"""Feeding the model: a run's training images and labels, augmented and shuffled, batch by batch.

    x_images, y_images = feed.training_images(x, y, settings, seed)   # with their fixed copies, or not
    stream = feed.batches(x_images, y_images, settings, seed, first_epoch)
    images, labels = next(stream)                                     # float32 (n, 28, 28, 1), labels

Augmentation follows the run's settings: "copies" makes flipped-and-erased copies of every image
once (the original write-up's way); "online" flips, erases and (with translate) shifts the images
anew every epoch. The flips and the boxes are erasing.py's. Every epoch is drawn from its own generator, seeded by
(seed, epoch), so a resumed run sees the batches the unbroken run would have seen.
"""

import itertools

import numpy as np

import erasing
import models


def labels(y, settings):
    """The labels as the loss takes them: one-hot with label smoothing, else class numbers."""
    return np.eye(models.NUM_CLASSES, dtype=np.float32)[y] if settings["label_smoothing"] > 0 else y


def erasing_of(settings):
    """Random Erasing's options in a run's settings (complete ones: a recorded run's pass through
    runs.as_run first)."""
    return dict(erase_p=settings["erase_p"], fill=settings["erase_fill"], placement=settings["erase_placement"])


def training_images(x, y, settings, seed):
    """The images an epoch goes through: with "copies", the originals and `augment_copies`
    flipped-and-erased copies of each, made once (51,000 images give 153,000); with "online",
    the originals, flipped and erased anew by batches() every epoch."""
    if settings["augment"] == "copies":
        return erasing.augment(x, y, settings["augment_copies"], rng=seed, **erasing_of(settings))
    return x, y


def translate(x, rng, pixels):
    """Each image of x (n, h, w) shifted by its own random offset of up to `pixels` each way, the edge
    filled with 0 (the data's black background); pixels 0: x itself."""
    if not pixels:
        return x
    n, height, width = x.shape[:3]
    padded = np.pad(x, ((0, 0), (pixels, pixels), (pixels, pixels)) + ((0, 0),) * (x.ndim - 3))
    down, right = rng.integers(0, 2 * pixels + 1, size=(2, n))
    rows = (down[:, None] + np.arange(height))[:, :, None]
    cols = (right[:, None] + np.arange(width))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def feed_plan(n_images, batch_size, replicas=1, process=0, processes=1):
    """(positions, sizes): the places in each shuffled epoch that this process feeds to the model, and
    the sizes of its batches. The global batches are of batch_size; the last one is cut to a multiple
    of the replica count (every device takes as many images; at most replicas - 1 are left out), and
    each of the processes feeds its own slice of every global batch."""
    positions, sizes = [], []
    for start in range(0, n_images, batch_size):
        share = min(batch_size, n_images - start) // replicas * replicas // processes
        if share:
            positions.append(np.arange(start + process * share, start + (process + 1) * share))
            sizes.append(share)
    return (np.concatenate(positions) if positions else np.zeros(0, int)), sizes


def batches(x, y, settings, seed, first_epoch, replicas=1, process=0, processes=1):
    """(images, labels) batches for the model, epoch after epoch without end, from first_epoch on.

    Each epoch is shuffled (and, online, augmented) by its own generator, seeded by (seed, epoch),
    so a resumed run sees exactly the batches the unbroken run would have seen. One stream for
    the whole run (fit's steps_per_epoch marks the epochs), so no batch is drawn for the wrong
    epoch however far ahead the backend reads.

    With --distribute the batches follow feed_plan. One process, on any number of devices, feeds
    every global batch and augments as above: the same images as on one device. Of several
    processes, each shuffles alike and feeds its own slice of every batch, flipped and erased
    (online) from its own stream, seeded by (seed, epoch, process), so no two slices are
    augmented alike.
    """
    positions, sizes = feed_plan(len(x), settings["batch_size"], replicas, process, processes)
    online, erase = settings["augment"] == "online", erasing_of(settings)
    shift = settings["translate"]
    for epoch in itertools.count(first_epoch):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(x))
        if online and processes == 1:
            x_epoch = translate(erasing.flip_and_erase(x[order], rng, **erase), rng, shift)
            x_epoch = x_epoch[positions] if len(positions) < len(x) else x_epoch
        else:
            x_epoch = x[order[positions]]
            if online:
                own = np.random.default_rng([seed, epoch, process])
                x_epoch = translate(erasing.flip_and_erase(x_epoch, own, **erase), own, shift)
        y_epoch = y[order[positions]]
        for start, stop in itertools.pairwise(np.cumsum([0, *sizes])):
            yield models.prepare(x_epoch[start:stop]), y_epoch[start:stop]


