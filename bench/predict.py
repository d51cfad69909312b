"""Benchmark: predict.py on catalogue-style photos made from test images, against the originals.

    python bench/predict.py                         # 2,000 test images, model best (about 2 minutes)
    python bench/predict.py --limit 10000           # all of them
    python bench/predict.py --split val --model fast --limit 1000 --grid
                                                    # how predict.py's resize filter and sharpening were chosen

Each Fashion-MNIST image (a light garment on black) is turned into what a shop
photo looks like: negated (a dark garment on white), upscaled 4-8x, placed off
centre on a larger white canvas, saved as an RGB JPEG. predict.py must undo
all of that (trim, resize, sharpen, centre, negate); the accuracy on the photos
is compared with the same model's accuracy on the original images.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import io

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import models  # noqa: E402
import predict  # noqa: E402

SEED = 0  # the scales and positions of the garments on their canvases
JPEG_QUALITY = 90
GRID_FILTERS = {"box": Image.BOX, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
GRID_SHARPEN = (0, 100, 150)  # unsharp-mask percent; 0: no sharpening


def cpu_name():
    """The processor's model name, as lscpu shows it."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown processor"


def images_of(split, limit):
    """(images, labels): the first `limit` of the test set, or of the validation split (last 15 %)."""
    if split == "test":
        x, y = data.load_data("t10k")
    else:
        _, (x, y) = data.split_data(*data.load_data("train"))
    return x[:limit], y[:limit]


def grid(model, x, y, original, rng):
    """Accuracy on the photos for each resize filter and sharpening strength, predict.prepare in process."""
    photos = []
    for image in x:
        buffer = io.BytesIO()
        predict.catalogue_photo(image, rng).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        photos.append(buffer.getvalue())
    for filter_name, resize_filter in GRID_FILTERS.items():
        for percent in GRID_SHARPEN:
            predict.RESIZE_FILTER, predict.SHARPEN_PERCENT = resize_filter, percent
            prepared = np.array([predict.prepare(Image.open(io.BytesIO(photo)))[0] for photo in photos])
            predicted = models.predict(model, prepared).argmax(axis=1)
            print(f"resize {filter_name:8} sharpen {percent:3d} %: accuracy {(predicted == y).mean():.4f}, "
                  f"same class as on the originals {(predicted == original).mean():.4f}")


def main():
    parser = argparse.ArgumentParser(description="predict.py on catalogue-style photos vs the original images.")
    parser.add_argument("--model", default="best", help="model in models/ (default: best)")
    parser.add_argument("--limit", type=int, default=2000, help="first N images (default: 2000)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="test set, or the validation split of the training file (default: test)")
    parser.add_argument("--grid", action="store_true",
                        help="compare resize filters and sharpening strengths instead (default: off)")
    args = parser.parse_args()

    x, y = images_of(args.split, args.limit)
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores; model {args.model}; "
          f"{len(x)} {args.split} images")
    model = models.load_model(args.model)
    original = models.predict(model, x).argmax(axis=1)
    print(f"Accuracy on the original images: {(original == y).mean():.4f}")

    rng = np.random.default_rng(SEED)
    if args.grid:
        return grid(model, x, y, original, rng)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        for i, image in enumerate(x):
            predict.catalogue_photo(image, rng).save(Path(folder) / f"{i:05d}.jpg", quality=JPEG_QUALITY)
        print(f"Photos: {len(x)} JPEGs written in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "predict.py", "--model", args.model, "--json", folder],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    results = json.loads(out.stdout)
    class_names = data.get_labels()
    predicted = np.array([class_names.index(r["class"]) for r in results])
    agreement = (predicted == original).mean()
    print(f"Accuracy on the catalogue photos (predict.py): {(predicted == y).mean():.4f}; "
          f"same class as on the originals: {agreement:.4f}")
    print(f"Time: predict.py took {seconds:.1f} s for {len(x)} photos (model loading included)")


if __name__ == "__main__":
    main()
