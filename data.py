"""Fashion-MNIST data layer: obtain, verify, load, split, augment, normalise.

Every script gets its data from here. `python data.py` fetches both splits.

The four official files are looked for, in this order, in
  1. this project's data/ folder (a previous run),
  2. the directory named by the FASHION_MNIST_DIR environment variable,
  3. /usr/share/datasets/fashion-mnist/ (Debian/Ubuntu: apt install dataset-fashion-mnist),
  4. the official URL (FASHION_MNIST_URL overrides it).
A file is used only if its IDX header is right and the SHA-256 of its
decompressed content matches the published one; a copy that fails is never
used and never kept in data/ under its real name.
"""

import argparse
import gzip
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from erasing import random_erasing

DATA_DIR = Path(__file__).resolve().parent / "data"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CONNECT_TIMEOUT = 5  # seconds to open a connection
READ_TIMEOUT = 30  # seconds of silence before a download is abandoned
RETRIES = 2  # extra attempts after a failed connection, with back-off
REMEDY = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, put the four "
    ".gz files in data/, or set FASHION_MNIST_DIR to a folder that has them"
)

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# name -> (IDX magic number, item count, SHA-256 of the decompressed file)
FILES = {
    "train-images-idx3-ubyte": (2051, 60000, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": (2049, 60000, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": (2051, 10000, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": (2049, 10000, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
KINDS = ("train", "t10k")


class DataError(Exception):
    """The data cannot be obtained or is wrong; the message says why and what to do."""


def file_names(kind):
    """The (images, labels) base names of a split: "train" or "t10k"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return f"{kind}-images-idx3-ubyte", f"{kind}-labels-idx1-ubyte"


def check_content(name, content):
    """Raise DataError unless `content` (decompressed bytes) is the official file `name`."""
    magic, count, sha256 = FILES[name]
    header_size = 16 if magic == 2051 else 8
    expected_size = header_size + count * (784 if magic == 2051 else 1)
    if len(content) < header_size:
        raise DataError(f"{len(content)} bytes is too short for an IDX header")
    header = np.frombuffer(content[:header_size], dtype=">u4")
    if header[0] != magic or header[1] != count or (magic == 2051 and tuple(header[2:]) != (28, 28)):
        raise DataError(f"bad IDX header {header.tolist()}, expected magic {magic}, count {count}"
                        + (", 28x28" if magic == 2051 else ""))
    if len(content) != expected_size:
        raise DataError(f"{len(content)} bytes decompressed, expected {expected_size}")
    if hashlib.sha256(content).hexdigest() != sha256:
        raise DataError("SHA-256 of the content differs from the official file")


def read_verified(name, path):
    """Decompress `path` (.gz, or a plain IDX file) and verify it; returns the content."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read or decompress: {e}") from None
    check_content(name, content)
    return content


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the final file is an ordinary one
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def download(url, dest):
    """Stream `url` into the file `dest` (created atomically), with a progress line on a terminal."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=RETRIES, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))

    def write(f):
        with session.get(url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0))
            done = 0
            for chunk in response.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                done += len(chunk)
                if sys.stderr.isatty() and total:
                    print(f"\r  {dest.name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", file=sys.stderr)
            if sys.stderr.isatty() and total:
                print(file=sys.stderr)
            if total and done != total:
                raise DataError(f"download truncated at {done} of {total} bytes")

    try:
        atomic_write(dest, write)
    except requests.RequestException as e:
        raise DataError(f"download failed: {type(e).__name__}") from None


def obtain(name, data_dir=None):
    """Make sure data_dir/name.gz is a verified copy of the official file; returns its content.

    Prints one line saying where the file came from.
    """
    data_dir = Path(data_dir or DATA_DIR)
    target = data_dir / f"{name}.gz"
    tried = []
    if target.exists():
        try:
            content = read_verified(name, target)
            print(f"{target.name}: verified in {data_dir}")
            return content
        except DataError as e:
            corrupt = target.with_name(target.name + ".corrupt")
            os.replace(target, corrupt)
            print(f"warning: {target} is corrupt ({e}); moved it to {corrupt.name}, "
                  "fetching a fresh copy", file=sys.stderr)
            tried.append(f"data/: corrupt ({e})")
    else:
        tried.append("data/: missing")

    dirs = []
    if os.environ.get("FASHION_MNIST_DIR"):
        dirs.append(("$FASHION_MNIST_DIR", Path(os.environ["FASHION_MNIST_DIR"])))
    else:
        tried.append("$FASHION_MNIST_DIR: not set")
    dirs.append((str(SYSTEM_DIR), SYSTEM_DIR))
    for label, folder in dirs:
        candidates = [p for p in (folder / f"{name}.gz", folder / name) if p.is_file()]
        if not candidates:
            tried.append(f"{label}: missing")
        for source in candidates:
            try:
                content = read_verified(name, source)
            except DataError as e:
                tried.append(f"{source}: {e}")
                continue
            if source.suffix == ".gz":
                atomic_write(target, lambda f: shutil.copyfileobj(open(source, "rb"), f))
            else:
                atomic_write(target, lambda f: f.write(gzip.compress(content, compresslevel=6)))
            print(f"{target.name}: copied from {source} (verified)")
            return content

    url = os.environ.get("FASHION_MNIST_URL", URL).rstrip("/") + f"/{name}.gz"
    partial = data_dir / f".{name}.gz.download"
    try:
        download(url, partial)
        content = read_verified(name, partial)
    except DataError as e:
        tried.append(f"{url}: {e}")
        partial.unlink(missing_ok=True)
        raise DataError(f"{name}.gz: no good copy found ({'; '.join(tried)}). To fix: {REMEDY}") from None
    os.replace(partial, target)
    print(f"{target.name}: downloaded from {url} (verified)")
    return content


def _cache_paths(data_dir, name):
    return data_dir / f"{name}.npy", data_dir / f"{name}.npy.stamp"


def _stamp(path):
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}"


def load_file(name, data_dir=None):
    """The array in one official file, decoded once and then cached as .npy beside it.

    The cache is used only while the .gz it came from is unchanged (size and mtime).
    """
    data_dir = Path(data_dir or DATA_DIR)
    gz = data_dir / f"{name}.gz"
    cache, stamp = _cache_paths(data_dir, name)
    magic, count, _ = FILES[name]
    shape = (count, 28, 28) if magic == 2051 else (count,)
    if gz.exists() and cache.exists() and stamp.exists() and stamp.read_text() == _stamp(gz):
        try:
            array = np.load(cache)
            if array.shape == shape and array.dtype == np.uint8:
                print(f"{gz.name}: cached in {data_dir} (verified when it arrived)")
                return array
        except (OSError, ValueError):
            pass  # an unreadable cache is rebuilt below
    content = obtain(name, data_dir)
    array = np.frombuffer(content, dtype=np.uint8, offset=16 if magic == 2051 else 8).reshape(shape)
    atomic_write(cache, lambda f: np.save(f, array))
    atomic_write(stamp, lambda f: f.write(_stamp(gz).encode()))
    return array


def get_data(kind, data_dir=None):
    """Make sure both files of a split are in data/ and verified; returns their paths."""
    data_dir = Path(data_dir or DATA_DIR)
    paths = []
    for name in file_names(kind):
        load_file(name, data_dir)
        paths.append(data_dir / f"{name}.gz")
    return tuple(paths)


def load_data(kind, data_dir=None):
    """(images uint8 (n, 28, 28), labels uint8 (n,)) of "train" (60,000) or "t10k" (10,000)."""
    images, labels = (load_file(name, data_dir) for name in file_names(kind))
    return images, labels


def get_labels():
    """The class names, in label order."""
    return list(CLASS_NAMES)


def per_class_accuracy(predictions, labels):
    """One line: the accuracy on the images of each class, in label order."""
    parts = [f"{name} {(predictions[labels == c] == c).mean():.3f}" for c, name in enumerate(CLASS_NAMES)
             if (labels == c).any()]
    return "Per-class accuracy: " + ", ".join(parts)


def split_data(x, y, val_fraction=0.15):
    """((x_train, y_train), (x_val, y_val)): the first part trains, the last `val_fraction` validates.

    Not shuffled, as in the seed: on the training file this is 51,000 / 9,000.
    """
    n_val = int(round(len(x) * val_fraction))
    if not 0 < n_val < len(x):
        raise ValueError(f"val_fraction={val_fraction} leaves no training or no validation images")
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def flip_and_erase(x, rng, flip_p=0.5, erase_p=0.5):
    """A new batch: each image mirrored left-right with probability flip_p, then Random Erasing.

    x: uint8 or float images (n, 28, 28) or (n, 28, 28, 1); the result has the same shape and dtype.
    """
    flip = (rng.random(len(x)) < flip_p).reshape((-1,) + (1,) * (x.ndim - 1))
    return random_erasing(np.where(flip, x[:, :, ::-1], x), p=erase_p, rng=rng)


def augment(x, y, copies=2, rng=None):
    """The seed's fixed augmentation: the originals, then `copies` flipped-and-erased copies of each.

    51,000 images and copies=2 give 153,000. rng: a NumPy Generator or a seed.
    """
    rng = np.random.default_rng(rng)
    x_all = [x] + [flip_and_erase(x, rng) for _ in range(copies)]
    return np.concatenate(x_all), np.tile(y, copies + 1)


def normalize(x):
    """uint8 pixels (any shape) -> float32 in [0, 1], as the seed: divided by 255."""
    return np.asarray(x, dtype=np.float32) / np.float32(255)


def cpu_name():
    """The processor's model name (e.g. "AMD EPYC"), to state beside every timing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description="Fetch, verify and summarise the Fashion-MNIST files.")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help=f"where the files are kept (default: {DATA_DIR})")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        for kind in KINDS:
            x, y = load_data(kind, args.data_dir)
            counts = np.bincount(y, minlength=len(CLASS_NAMES))
            print(f"{kind}: images {x.shape} {x.dtype}, labels {y.shape} {y.dtype}, "
                  f"per class {counts.tolist()}")
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"Time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
