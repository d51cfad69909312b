"""Benchmark: training throughput (images per second) of the original write-up's CNN, settings side by side.

    python bench/train.py                   # the default comparison, 3-4 minutes on 2 CPU cores
    python bench/train.py --steps 10        # quicker, noisier

(a) is the baseline: plain model.fit on in-memory float32 arrays at batch 250.
(b) is train.py's pipeline as `--recipe fast` runs it: fresh flips and erasing
every epoch (a keras.utils.PyDataset), batch 250, mixed precision where the
hardware has it (bfloat16 on CPUs with AVX512_BF16 or AMX, float16 on GPUs).
(c)-(e) vary one thing at a time. Every setting runs in this one process on
this one machine; compare them only with each other.
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import backend  # noqa: E402
import data  # noqa: E402
import machine  # noqa: E402
import models  # noqa: E402
import feed  # noqa: E402
import train  # noqa: E402

import keras  # noqa: E402

SETTINGS = {  # name: (pipeline, batch size, mixed precision: True, False or "auto")
    "a: fit on arrays, float32, batch 250": ("arrays", 250, False),
    "b: train.py --recipe fast: online, auto, batch 250": ("online", 250, "auto"),
    "c: train.py online, float32, batch 250": ("online", 250, False),
    "d: train.py online, float32, batch 128": ("online", 128, False),
    "e: train.py online, mixed, batch 128": ("online", 128, True),
}


def measure(pipeline, batch_size, mixed, x, y, steps):
    """Images per second over `steps` steps, after one untimed epoch of warm-up."""
    keras.backend.clear_session()
    policy = backend.set_precision(mixed)
    model = models.build_cnn()
    n = steps * batch_size
    if pipeline == "arrays":
        images = models.prepare(x[:n])
        fit = lambda epochs: model.fit(images, y[:n], batch_size=batch_size, epochs=epochs, verbose=0)  # noqa: E731
    else:
        settings = dict(train.RECIPES["fast"], batch_size=batch_size)
        stream = feed.batches(x[:n], y[:n], settings, seed=0, first_epoch=0)
        fit = lambda epochs: model.fit(stream, steps_per_epoch=math.ceil(n / batch_size), epochs=epochs, shuffle=False,  # noqa: E731
                                       verbose=0)
    fit(1)  # compile the step function, fill caches
    start = time.perf_counter()
    fit(2)
    return 2 * n / (time.perf_counter() - start), policy


def main():
    parser = argparse.ArgumentParser(description="Training throughput of the original write-up's CNN.")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per epoch, 2 epochs (default: 60)")
    parser.add_argument("--only", nargs="*", help="run only these settings (letters; a, the baseline, always runs)")
    args = parser.parse_args()
    x, y = data.load_data("train")
    print(f"Machine: {machine.device_name()}; Keras {keras.__version__}, backend {keras.backend.backend()}")
    results = {}
    for name, (pipeline, batch_size, mixed) in SETTINGS.items():
        if args.only and name[0] not in args.only + ["a"]:
            continue
        results[name], policy = measure(pipeline, batch_size, mixed, x, y, args.steps)
        print(f"{name:52s} {results[name]:7.0f} images/s  ({policy})", flush=True)
    baseline = next(iter(results.values()))
    for name, speed in results.items():
        print(f"{name:52s} {speed / baseline:5.2f}x (a)")


if __name__ == "__main__":
    main()
