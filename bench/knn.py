"""Benchmark: knn.py against scikit-learn's brute-force k-NN, on the same test images, in one run.

    python bench/knn.py                 # first 2,000 test images (scikit-learn takes ~50 s on them)
    python bench/knn.py --limit 10000   # the whole test set (scikit-learn: several minutes)

knn.py runs as its own process (the way a user runs it), so its wall time and
peak memory are its own; the wall time includes loading its compiled kernel from
numba's cache, or compiling it (seconds) where there is none yet, as its Kernel:
line says. scikit-learn's KNeighborsClassifier(n_neighbors=5, p=1,
algorithm="brute", n_jobs=-1) runs here on float32 pixels in [0, 1].
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import machine  # noqa: E402


def run_knn(limit, backend):
    """Wall seconds, predicting seconds, peak RSS in GB, accuracy and Kernel: line of `python knn.py`."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "knn.py", "--limit", str(limit), "--backend", backend],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # kB -> GB, the largest child
    accuracy = float(re.search(r"Test accuracy: ([0-9.]+)", out).group(1))
    inner = float(re.search(r"Time: ([0-9.]+) s", out).group(1))
    kernel = re.search(r"^Kernel: .*$", out, re.MULTILINE)
    return wall, inner, peak_gb, accuracy, kernel.group(0) if kernel else "Kernel: none (NumPy back-end)"


def run_sklearn(limit):
    from sklearn.neighbors import KNeighborsClassifier

    x_train, y_train = data.load_data("train")
    x_test, y_test = data.load_data("t10k")
    x_train = data.normalize(x_train.reshape(len(x_train), -1))
    x_test = data.normalize(x_test[:limit].reshape(limit, -1))
    start = time.perf_counter()
    model = KNeighborsClassifier(n_neighbors=5, p=1, algorithm="brute", n_jobs=-1).fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test[:limit]).mean())
    return time.perf_counter() - start, accuracy


def main():
    parser = argparse.ArgumentParser(description="Time knn.py against scikit-learn on the same test images.")
    parser.add_argument("--limit", type=int, default=2000, help="first N test images (default: 2000)")
    parser.add_argument("--backend", default="auto", choices=("auto", "numba", "numpy"),
                        help="knn.py back-end (default: auto)")
    args = parser.parse_args()
    print(f"Machine: {machine.cpu_name()}, {os.cpu_count()} cores; test images: {args.limit}")
    wall, inner, peak_gb, accuracy, kernel = run_knn(args.limit, args.backend)
    print(kernel)
    print(f"knn.py:       {wall:7.1f} s wall ({inner:.1f} s predicting), peak {peak_gb:.2f} GB, "
          f"Test accuracy: {accuracy:.4f}")
    sk_seconds, sk_accuracy = run_sklearn(args.limit)
    print(f"scikit-learn: {sk_seconds:7.1f} s predicting, Test accuracy: {sk_accuracy:.4f}")
    print(f"Speed-up: {sk_seconds / wall:.1f}x (wall) / {sk_seconds / inner:.1f}x (predicting)")


if __name__ == "__main__":
    main()
