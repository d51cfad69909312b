"""Fashion-MNIST data layer: obtain, verify, load, split, normalise.

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
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

import machine  # light: Keras starts only where a script asks machine.start_backend

DATA_DIR = Path(__file__).resolve().parent / "data"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CONNECT_TIMEOUT = 5  # seconds to open a connection
READ_TIMEOUT = 30  # seconds of silence before a download is abandoned
DOWNLOAD_DEADLINE = 600  # seconds for one file in all, however slowly it trickles in
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
VAL_FRACTION = 0.15  # the last 15 % of the training file validates


class DataError(Exception):
    """The data cannot be obtained or is wrong; the message says why and what to do."""


def file_names(kind):
    """The (images, labels) base names of a split: "train" or "t10k"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return f"{kind}-images-idx3-ubyte", f"{kind}-labels-idx1-ubyte"


def expected_size(name):
    """Bytes of the decompressed official file `name` (IDX header + items)."""
    magic, count, _ = FILES[name]
    return (16 + count * 784) if magic == 2051 else (8 + count)


def check_content(name, content):
    """Raise DataError unless `content` (decompressed bytes) is the official file `name`."""
    magic, count, sha256 = FILES[name]
    header_size = 16 if magic == 2051 else 8
    if len(content) < header_size:
        raise DataError(f"{len(content)} bytes is too short for an IDX header")
    header = np.frombuffer(content[:header_size], dtype=">u4")
    if header[0] != magic or header[1] != count or (magic == 2051 and tuple(header[2:]) != (28, 28)):
        raise DataError(f"bad IDX header {header.tolist()}, expected magic {magic}, count {count}"
                        + (", 28x28" if magic == 2051 else ""))
    if len(content) != expected_size(name):
        raise DataError(f"{len(content)} bytes decompressed, expected {expected_size(name)}")
    if hashlib.sha256(content).hexdigest() != sha256:
        raise DataError("SHA-256 of the content differs from the official file")


def read_verified(name, path):
    """Decompress `path` (.gz, or a plain IDX file) and verify it; returns the content.

    Reads at most one byte more than the official file's size, so a gzip bomb (a small file that
    unpacks to gigabytes) is refused after a few megabytes, never held in memory.
    """
    limit = expected_size(name)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            content = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read or decompress: {e}") from None
    if len(content) > limit:
        raise DataError(f"decompresses to more than the {limit:,} bytes of the official file")
    check_content(name, content)
    return content


def atomic_write(path, write, mode="wb"):
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    The temporary file starts with "." and ends in ".part" (.gitignore covers both); an
    interrupted write removes it, so `path` is either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the final file is an ordinary one
        os.replace(tmp, path)
    except BaseException as e:
        full = machine.disk_full(e, path, tmp)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise full from None
        raise


def write_text(path, text):
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def download(url, dest, limit):
    """Stream `url` into the file `dest` (atomically), with a progress line on a terminal.

    Gives up after DOWNLOAD_DEADLINE seconds in all (a server that trickles a byte now and then
    never holds a run forever) or past `limit` bytes.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=RETRIES, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    deadline = time.monotonic() + DOWNLOAD_DEADLINE

    def write(f):
        with session.get(url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length") or 0)
            done = 0
            # read1 returns whatever has arrived (up to 64 KB), so the deadline is checked even
            # while a server trickles; iter_content would wait for a whole chunk.
            while chunk := response.raw.read1(1 << 16, decode_content=True):
                f.write(chunk)
                done += len(chunk)
                if done > limit:
                    raise DataError(f"download refused: more than {limit:,} bytes")
                if time.monotonic() > deadline:
                    raise DataError(f"download timed out: not done after {DOWNLOAD_DEADLINE} s")
                if sys.stderr.isatty() and total:
                    print(f"\r  {dest.name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", file=sys.stderr)
            if sys.stderr.isatty() and total:
                print(file=sys.stderr)
            if total and done != total:
                raise DataError(f"download truncated at {done} of {total} bytes")

    try:
        atomic_write(dest, write)
    except requests.HTTPError as e:
        raise DataError(f"download failed: HTTP {e.response.status_code} {e.response.reason}") from None
    except (requests.Timeout, requests.exceptions.ReadTimeout) as e:
        seconds = READ_TIMEOUT if isinstance(e, requests.ReadTimeout) else CONNECT_TIMEOUT
        raise DataError(f"download failed: timed out after {seconds} s without data") from None
    except requests.ConnectionError as e:
        text = str(e)
        reason = ("connection refused" if "refused" in text.lower() else
                  "host not found (no internet access?)" if "resolve" in text.lower() or "name or service" in
                  text.lower() else "connection failed")
        if "Read timed out" in text:
            reason = f"timed out after {READ_TIMEOUT} s without data"
        raise DataError(f"download failed: {reason}") from None
    except requests.RequestException as e:
        raise DataError(f"download failed: {type(e).__name__}") from None


def obtain(name, data_dir=None):
    """Make sure data_dir/name.gz is a verified copy of the official file; returns its content.

    Prints one line saying where the file came from.
    """
    data_dir = Path(data_dir or DATA_DIR)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir} is a file, not a folder: move it away, the data goes there")
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
        if folder.exists() and not folder.is_dir():
            tried.append(f"{label}: {folder} is not a folder")
            continue
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
    for stale in data_dir.glob(f".{name}.gz.download*"):  # left by a download that was killed
        stale.unlink(missing_ok=True)
    try:
        # gzip never makes these files larger: the compressed size is below the decompressed one.
        download(url, partial, limit=expected_size(name))
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


def _stamp(gz, array):
    """What the cache must match: the .gz it came from (size, mtime) and the array's own SHA-256."""
    stat = gz.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {hashlib.sha256(array.tobytes()).hexdigest()}"


def _read_cache(gz, cache, stamp, shape):
    """The cached array if it is intact and still matches its .gz, else None (it is then rebuilt).

    Anything wrong with the cache (missing, empty, a garbage header, flipped bytes, a stamp that
    is not text) only means the array is decoded again from the verified .gz.
    """
    try:
        expected = stamp.read_text(encoding="ascii")
        array = np.load(cache, allow_pickle=False)
        if array.shape != shape or array.dtype != np.uint8:
            return None
        return array if _stamp(gz, array) == expected else None
    except (OSError, ValueError, EOFError, UnicodeDecodeError):
        return None


def load_file(name, data_dir=None):
    """The array in one official file, decoded once and then cached as .npy beside it.

    The cache is used only while the .gz it came from is unchanged (size and mtime) and its own
    content has the SHA-256 recorded when it was written.
    """
    data_dir = Path(data_dir or DATA_DIR)
    gz = data_dir / f"{name}.gz"
    cache, stamp = _cache_paths(data_dir, name)
    magic, count, _ = FILES[name]
    shape = (count, 28, 28) if magic == 2051 else (count,)
    array = _read_cache(gz, cache, stamp, shape) if gz.is_file() else None
    if array is not None:
        print(f"{gz.name}: cached in {data_dir} (verified)")
        return array
    try:
        content = obtain(name, data_dir)
    except OSError as e:  # a full disk, or no permission to write data/
        where = e.filename or data_dir
        raise DataError(f"cannot write {where}: {e.strerror or e}; free some space or make it writable") from None
    array = np.frombuffer(content, dtype=np.uint8, offset=16 if magic == 2051 else 8).reshape(shape)
    try:
        atomic_write(cache, lambda f: np.save(f, array))
        write_text(stamp, _stamp(gz, array))
    except OSError as e:  # the data is good; only the cache could not be kept
        print(f"warning: cannot cache {cache.name} ({e.strerror}); decoding it again next time", file=sys.stderr)
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


def split_data(x, y, val_fraction=VAL_FRACTION):
    """((x_train, y_train), (x_val, y_val)): the first part trains, the last `val_fraction` validates.

    Not shuffled, as the original write-up describes it (on the training file: 51,000 / 9,000);
    its code split at random without a seed, which no one can repeat.
    """
    n_val = int(round(len(x) * val_fraction))
    if not 0 < n_val < len(x):
        raise ValueError(f"val_fraction={val_fraction} leaves no training or no validation images")
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def normalize(x):
    """uint8 pixels (any shape) -> float32 in [0, 1]: divided by 255, as the original write-up did."""
    return np.asarray(x, dtype=np.float32) / np.float32(255)


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
    machine.run(main)
