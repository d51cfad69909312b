"""Time to accuracy: validation accuracy against minutes of training, from the runs' own records.

    python bench/time_to_accuracy.py                        # quick_1..3 against fast
    python bench/time_to_accuracy.py quick_1 fast long      # any runs with a validation split

Each run's CSV (models/NAME.csv) gives its validation accuracy after every epoch, and its JSON the
training time (train_seconds over epochs_done: every epoch is taken as equally long), the
processor and the precision. Writes screenshots/Time_to_accuracy.png, with the write-up's 94.74 %
as a line, and prints each run's validation accuracy after 5, 10, 15 and 20 minutes (the last
epoch finished by then) and the minutes it took to reach 94.74 % on validation, if it did.

Runs trained on different machines are not a race: the legend names each one's processor and
precision, and only runs on one machine compare.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402

import numpy as np  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402

WRITEUP = 0.9474  # the write-up's test accuracy
MARKS = (5, 10, 15, 20)  # minutes
OUTPUT = ROOT / "screenshots" / "Time_to_accuracy.png"


def curve(name):
    """(minutes after each epoch, validation accuracy after it, the run's JSON)."""
    info = models.read_info(name)
    csv = models.model_path(name).with_suffix(".csv")
    if not csv.exists() or not info.get("train_seconds") or not info.get("epochs_done"):
        sys.exit(f"error: {name} has no training record (models/{name}.csv and a JSON with train_seconds); "
                 f"pick runs that train.py trained")
    history = np.genfromtxt(csv, delimiter=",", names=True)
    accuracy = np.atleast_1d(history["val_accuracy"])
    if np.isnan(accuracy).all():
        sys.exit(f"error: {name} has no validation split (trained with --all-data); pick runs with one")
    minutes = (np.arange(len(accuracy)) + 1) * info["train_seconds"] / info["epochs_done"] / 60
    return minutes, accuracy, info


def label(name, info):
    settings = runs.as_run(info.get("settings", {}))
    precision = "bfloat16" if "bfloat16" in str(info.get("dtype_policy")) else "float32"
    return (f"{name}: {settings['arch']}, {info.get('epochs_done')} epochs; "
            f"{info.get('device', '?').removeprefix('CPU: ')}, {precision}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Validation accuracy against minutes of training.")
    parser.add_argument("names", nargs="*", default=["quick_1", "quick_2", "quick_3", "fast"],
                        help="runs in models/ (default: quick_1 quick_2 quick_3 fast)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    curves = {name: curve(name) for name in args.names}

    print(f"{'run':>10s} " + " ".join(f"{m:>6d} min" for m in MARKS) + "   to 94.74 %   processor")
    for name, (minutes, accuracy, info) in curves.items():
        cells = []
        for mark in MARKS:
            done = minutes <= mark
            cells.append(f"{accuracy[done].max() if done.any() else float('nan'):10.2%}")
        reached = np.flatnonzero(accuracy >= WRITEUP)
        to = f"{minutes[reached[0]]:8.1f} min" if len(reached) else "   not yet  "
        print(f"{name:>10s} " + " ".join(cells) + f"   {to}   {label(name, info).split('; ', 1)[1]}")

    import matplotlib
    matplotlib.use("Agg")  # a file only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, (minutes, accuracy, info) in curves.items():
        ax.plot(minutes, accuracy, marker=".", label=label(name, info))
    ax.axhline(WRITEUP, color="black", linestyle="--", linewidth=1, label="the write-up: 94.74 % (test)")
    ax.set_xscale("log")
    ax.set_ylim(0.85, 0.96)
    ax.set_xlabel("minutes of training (2 CPU cores; log scale)")
    ax.set_ylabel("validation accuracy (9,000 images)")
    ax.set_title("Time to accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    data.atomic_write(args.output, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    print(f"Plot: {args.output}")


if __name__ == "__main__":
    machine.run(main)
