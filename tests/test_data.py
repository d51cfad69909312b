"""data.py: the real files verify and load; every kind of bad copy is refused and never kept."""

import gzip
import hashlib
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import data

# Published SHA-256 of the decompressed files (SPEC.md), written out here on purpose:
# the test must not trust the table it is testing.
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
LABELS = "t10k-labels-idx1-ubyte"  # the smallest real file (5 KB), used for the bad-input cases


@pytest.fixture(scope="module")
def real_labels():
    """The decompressed bytes of the real t10k labels file, from the project's data/."""
    data.get_data("t10k")
    return gzip.decompress((data.DATA_DIR / f"{LABELS}.gz").read_bytes())


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there once the socket is closed


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No source but the ones a test adds: empty system dir, no FASHION_MNIST_DIR, a dead URL."""
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("FASHION_MNIST_URL", closed_port_url())
    monkeypatch.setattr(data, "RETRIES", 0)  # a refused connection is not retried (the retries: one test)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return data_dir


def only_good_files(data_dir):
    """Names in data_dir that carry an official name: each must verify."""
    for path in data_dir.glob("*.gz"):
        data.read_verified(path.name[:-3], path)
    return sorted(p.name for p in data_dir.glob("*.gz"))


@pytest.mark.parametrize("name", sorted(OFFICIAL_SHA256))
def test_real_file_has_the_official_hash(name):
    data.get_data(name.split("-")[0])
    content = gzip.decompress((data.DATA_DIR / f"{name}.gz").read_bytes())
    assert hashlib.sha256(content).hexdigest() == OFFICIAL_SHA256[name]


def test_real_data_loads_with_shapes_and_balanced_classes():
    x_train, y_train = data.load_data("train")
    x_test, y_test = data.load_data("t10k")
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert x_train.max() == 255 and x_train.min() == 0


def test_second_load_uses_the_cache_and_a_changed_file_invalidates_it(tmp_path, offline, real_labels, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels))
    os.environ["FASHION_MNIST_DIR"] = str(tmp_path / "src")
    first = data.load_file(LABELS, offline)
    assert "copied from" in capsys.readouterr().out
    second = data.load_file(LABELS, offline)
    assert "cached" in capsys.readouterr().out
    assert np.array_equal(first, second)
    # Replace the .gz with a corrupt one: the cache must not hide it.
    (offline / f"{LABELS}.gz").write_bytes(b"\x1f\x8b garbage")
    third = data.load_file(LABELS, offline)
    captured = capsys.readouterr()
    assert "corrupt" in captured.err and "copied from" in captured.out
    assert np.array_equal(first, third)
    assert only_good_files(offline) == [f"{LABELS}.gz"]


@pytest.mark.parametrize("damage, message", [
    (lambda content: gzip.compress(content)[:-100], "decompress"),  # truncated .gz
    (lambda content: gzip.compress(content[:8] + bytes([(content[8] + 1) % 10]) + content[9:]), "SHA-256"),
    (lambda content: gzip.compress(b"\x00\x00\x08\x03" + content[4:]), "bad IDX header"),
    (lambda content: gzip.compress(content[:-1]), "expected 10008"),
    (lambda content: b"", "too short"),
])
def test_a_bad_copy_in_data_is_refused_and_not_kept(offline, real_labels, damage, message):
    (offline / f"{LABELS}.gz").write_bytes(damage(real_labels))
    with pytest.raises(data.DataError) as error:
        data.obtain(LABELS, offline)
    assert message in str(error.value)
    assert "dataset-fashion-mnist" in str(error.value)  # the remedy is in the one line
    assert "\n" not in str(error.value)
    assert only_good_files(offline) == []
    assert (offline / f"{LABELS}.gz.corrupt").exists()  # kept aside for the user, not under its real name


def test_a_corrupt_copy_in_data_is_replaced_from_the_next_source(tmp_path, offline, real_labels, monkeypatch):
    (offline / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels)[:-50])
    source = tmp_path / "mine"
    source.mkdir()
    (source / LABELS).write_bytes(real_labels)  # an uncompressed copy is accepted too
    monkeypatch.setenv("FASHION_MNIST_DIR", str(source))
    assert data.obtain(LABELS, offline) == real_labels
    assert only_good_files(offline) == [f"{LABELS}.gz"]


def test_a_bad_copy_in_a_source_directory_is_skipped(tmp_path, offline, real_labels, monkeypatch):
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir(), good.mkdir()
    (bad / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels[:-5]))
    (good / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(bad))
    monkeypatch.setattr(data, "SYSTEM_DIR", good)
    assert data.obtain(LABELS, offline) == real_labels
    assert only_good_files(offline) == [f"{LABELS}.gz"]


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_no_copy_anywhere_fails_fast_with_one_line(tmp_path, offline, monkeypatch, folder):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / folder))
    monkeypatch.setattr(data, "RETRIES", 2)
    start = time.perf_counter()
    with pytest.raises(data.DataError) as error:
        data.obtain(LABELS, offline)
    assert 0.5 < time.perf_counter() - start < 15  # connection refused, two retries after a back-off
    message = str(error.value)
    assert message.startswith(f"{LABELS}.gz: no good copy found")
    assert "$FASHION_MNIST_DIR: missing" in message and "127.0.0.1" in message
    assert "\n" not in message
    assert list(offline.iterdir()) == []  # no partial download left behind


def test_command_line_reports_one_line_and_exits_non_zero(offline, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["data.py", "--data-dir", str(offline)])
    with pytest.raises(SystemExit) as exit_:
        data.main()
    assert exit_.value.code != 0
    assert str(exit_.value.code).startswith("error: train-images-idx3-ubyte.gz: no good copy found")
    assert "Traceback" not in capsys.readouterr().err


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def web_server(tmp_path):
    """A local HTTP server over tmp_path/www, standing in for the official URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: QuietHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_from_the_url_is_verified(offline, web_server, real_labels, monkeypatch):
    root, url = web_server
    (root / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels))
    monkeypatch.setenv("FASHION_MNIST_URL", url)
    assert data.obtain(LABELS, offline) == real_labels
    assert only_good_files(offline) == [f"{LABELS}.gz"]
    assert [p.name for p in offline.iterdir()] == [f"{LABELS}.gz"]


def test_a_corrupt_download_is_refused_and_removed(offline, web_server, real_labels, monkeypatch):
    root, url = web_server
    (root / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels)[:-20])
    monkeypatch.setenv("FASHION_MNIST_URL", url)
    with pytest.raises(data.DataError, match="cannot read or decompress"):
        data.obtain(LABELS, offline)
    assert list(offline.iterdir()) == []


def test_split_is_first_85_percent_then_last_15_percent():
    x = np.arange(60000)
    (x_train, y_train), (x_val, y_val) = data.split_data(x, x * 2)
    assert len(x_train) == 51000 and len(x_val) == 9000
    assert x_train[0] == 0 and x_train[-1] == 50999 and x_val[0] == 51000 and x_val[-1] == 59999
    assert np.array_equal(y_val, x_val * 2)
    with pytest.raises(ValueError):
        data.split_data(x, x, val_fraction=0)


def test_normalize_scales_to_unit_range_as_float32():
    x = np.array([[0, 51, 255]], dtype=np.uint8)
    out = data.normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.array_equal(out, np.array([[0.0, 0.2, 1.0]], dtype=np.float32))


def test_class_names_in_label_order():
    names = data.get_labels()
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[6] == "Shirt" and names[9] == "Ankle boot"


def test_importing_does_nothing(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import data"], cwd=Path(data.__file__).parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""


# ---- Caches and resources (issue: nothing silently wrong, no traceback) ----

def fresh_cache(tmp_path, monkeypatch, real_labels):
    """A data/ folder whose labels file came from FASHION_MNIST_DIR and is now cached as .npy."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "src"))
    data_dir = tmp_path / "data"
    expected = data.load_file(LABELS, data_dir)
    return data_dir, expected


@pytest.mark.parametrize("damage", [
    lambda npy, stamp: npy.write_bytes(npy.read_bytes()[:-200] + bytes(b ^ 0x5A for b in npy.read_bytes()[-200:])),
    lambda npy, stamp: npy.write_bytes(b""),
    lambda npy, stamp: npy.write_bytes(b"\x93NUMPY garbage header" + bytes(100)),
    lambda npy, stamp: stamp.write_bytes(b"\xff\xfe not utf-8 \x80"),
    lambda npy, stamp: stamp.unlink(),
], ids=["flipped-bytes-same-size", "empty", "garbage-header", "stamp-not-utf8", "stamp-missing"])
def test_a_damaged_cache_is_rebuilt_not_used(tmp_path, offline, real_labels, monkeypatch, capsys, damage):
    data_dir, expected = fresh_cache(tmp_path, monkeypatch, real_labels)
    npy, stamp = data_dir / f"{LABELS}.npy", data_dir / f"{LABELS}.npy.stamp"
    size = npy.stat().st_size
    damage(npy, stamp)
    capsys.readouterr()
    again = data.load_file(LABELS, data_dir)
    out = capsys.readouterr().out
    assert np.array_equal(again, expected)
    assert "cached" not in out and "verified in" in out  # decoded again from the verified .gz
    assert npy.stat().st_size == size and data.load_file(LABELS, data_dir) is not None
    assert "cached" in capsys.readouterr().out  # the rebuilt cache is used next time


def test_a_gzip_bomb_is_refused_without_unpacking_it(tmp_path, offline, monkeypatch):
    import tracemalloc
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    with gzip.open(bomb / f"{LABELS}.gz", "wb", compresslevel=9) as f:  # 200 MB of zeros in ~200 KB
        for _ in range(200):
            f.write(bytes(1 << 20))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(bomb))
    tracemalloc.start()
    with pytest.raises(data.DataError) as error:
        data.obtain(LABELS, offline)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "decompresses to more than the 10,008 bytes" in str(error.value)
    assert peak < 5 << 20  # bytes held at once: far below what the file unpacks to


class Trickle(http.server.BaseHTTPRequestHandler):
    """Sends a gzip header, then one byte every 0.3 s, for ever."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\x1f")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_trickling_download_meets_its_deadline_and_leaves_nothing(offline, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FASHION_MNIST_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setattr(data, "DOWNLOAD_DEADLINE", 2)
    start = time.perf_counter()
    with pytest.raises(data.DataError, match="timed out: not done after 2 s"):
        data.obtain(LABELS, offline)
    server.shutdown()
    assert time.perf_counter() - start < 10
    assert list(offline.iterdir()) == []  # no .part or .download file left


def test_download_errors_say_what_happened(offline, web_server, monkeypatch):
    root, url = web_server
    monkeypatch.setenv("FASHION_MNIST_URL", url)  # the file is not there: 404
    with pytest.raises(data.DataError, match="download failed: HTTP 404"):
        data.obtain(LABELS, offline)
    monkeypatch.setenv("FASHION_MNIST_URL", closed_port_url())
    with pytest.raises(data.DataError, match="download failed: connection refused"):
        data.obtain(LABELS, offline)


def test_folders_that_are_files_get_one_line(tmp_path, offline, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "a-file"))
    with pytest.raises(data.DataError, match=r"\$FASHION_MNIST_DIR: .*a-file is not a folder"):
        data.obtain(LABELS, offline)
    (tmp_path / "data-file").write_text("where data/ should be")
    with pytest.raises(data.DataError, match="is a file, not a folder"):
        data.load_file(LABELS, tmp_path / "data-file")


def test_a_full_disk_is_one_line(tmp_path, offline, real_labels, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "src"))

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device", str(offline / "x.part"))

    monkeypatch.setattr(data.tempfile, "mkstemp", no_space)
    with pytest.raises(data.DataError, match="No space left on device"):
        data.load_file(LABELS, offline)
    assert list(offline.iterdir()) == []


def test_a_disk_that_fills_during_a_copy_names_the_file_and_what_it_needs(tmp_path, offline, real_labels,
                                                                           monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{LABELS}.gz").write_bytes(gzip.compress(real_labels))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "src"))

    def fills_up(source, target, *args):
        target.write(b"\0" * 3000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.shutil, "copyfileobj", fills_up)
    with pytest.raises(data.DataError) as error:
        data.load_file(LABELS, offline)
    assert str(error.value) == (f"cannot write {offline / (LABELS + '.gz')}: no space left on the disk (it needs at "
                                f"least 3 kB); free some space or make it writable")
    assert list(offline.iterdir()) == []  # the partial copy is gone
