"""Benchmark: what TensorFlow's op determinism (which train.py turns on) costs a training step.

    python bench/determinism.py                      # the small network, batch 256, 2 pairs: about 2 minutes
    python bench/determinism.py --arch wide --pairs 3

Each measurement is a process of its own (determinism, once on, stays on in a process), in pairs
that alternate with and without it, so that a machine that speeds up or slows down meanwhile
shows in both. Each process builds the network in the precision train.py picks here ("auto"),
compiles it as the quick recipe does (Nesterov SGD, label smoothing 0.1), fits 20 untimed steps,
then times `model.fit` over 100 steps of real training images at the batch size given.

Run nothing else on the machine meanwhile.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = 100
WARM_UP_STEPS = 20


def one_process(arch, batch_size, deterministic):
    """Time this process's fit; prints ms a step."""
    import machine

    machine.start_backend()
    import keras

    import backend
    import data
    import models

    keras.utils.set_random_seed(1)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    policy = backend.set_precision("auto")
    x, y = data.load_data("train")
    x = models.prepare(x[:STEPS * batch_size])
    y = keras.utils.to_categorical(y[:STEPS * batch_size], models.NUM_CLASSES)
    model = models.ARCHITECTURES[arch]()
    models.compile_model(model, optimizer="sgd", learning_rate=0.05, label_smoothing=0.1)
    warm = WARM_UP_STEPS * batch_size
    model.fit(x[:warm], y[:warm], batch_size=batch_size, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    print(f"{(time.perf_counter() - start) / STEPS * 1000:.1f} {policy}")


def main(argv=None):
    import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small", choices=sorted(models.ARCHITECTURES))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2, help="pairs of processes, with and without (default 2)")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    if args.one:
        return one_process(args.arch, args.batch_size, args.one == "on")

    import machine

    times = {"on": [], "off": []}
    for _ in range(args.pairs):
        for mode in ("on", "off"):
            out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--batch-size",
                                  str(args.batch_size), "--one", mode], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"error: the timing process failed: {out.stderr.strip().splitlines()[-1]}")
            ms, policy = out.stdout.split()[-2:]
            times[mode].append(float(ms))
            print(f"determinism {mode:>3s}: {float(ms):6.1f} ms a step")
    on, off = statistics.mean(times["on"]), statistics.mean(times["off"])
    print(f"{args.arch}, batch {args.batch_size}, {policy}; {machine.device_name()}: "
          f"{on:.1f} ms a step with op determinism, {off:.1f} without ({(on / off - 1) * 100:+.0f} %)")


if __name__ == "__main__":
    main()
