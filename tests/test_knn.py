"""knn.py: exact neighbours, the same from every back-end and as scikit-learn's, and the seed's 86.23 %;
its compiled kernel cached on disk, per instruction set and CPU."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

import data
import knn

ROOT = Path(knn.__file__).parent

# In a fresh process: for each instruction set in argv[1:], whether numba's disk cache holds the
# kernel for 28x28 images, as numba itself looks it up before compiling (True: it would be loaded,
# False: compiled). Nothing is compiled, so the probe is cheap.
PROBE = """
import sys
import numba
import numpy as np
import knn
out = np.empty((2, 1), np.int32)
for isa in sys.argv[1:]:
    rows = knn.row_records(np.zeros((2, 28, 28), np.uint8), isa)
    signature = tuple(numba.typeof(a) for a in (rows, rows, 1, out))  # as knn.nearest_rows calls it
    print(knn.top_k_l1._cache.load_overload(signature, knn.top_k_l1.targetctx) is not None)
"""


def run_knn(*args, **env):
    """`python knn.py *args` in a child process, with env added to the environment."""
    return subprocess.run([sys.executable, "knn.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})


def probes(cache_dir, *cases):
    """[[found, ...], ...]: for each case ((isa, ...), {env}), whether numba's cache in cache_dir holds
    the kernel for each isa, looked up in a fresh process with env added; the processes run at once."""
    started = [subprocess.Popen([sys.executable, "-c", PROBE, *isas], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), **env}) for isas, env in cases]
    found = []
    for process in started:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0
        found.append([line == "True" for line in out.split()])
    return found


@pytest.fixture(scope="module")
def fashion():
    x_train, y_train = data.load_data("train")
    x_test, y_test = data.load_data("t10k")
    return x_train, y_train, x_test, y_test


def available_isas():
    return {"avx512": ["avx512", "avx2", "portable"], "avx2": ["avx2", "portable"],
            "portable": ["portable"]}[knn.best_isa()]


def test_neighbours_match_scikit_learn_brute_force(fashion):
    x_train, _, x_test, _ = fashion
    x_query = x_test[:12].reshape(12, -1)
    train = x_train.reshape(60000, -1)
    expected_dist, _ = NearestNeighbors(n_neighbors=5, p=1, algorithm="brute").fit(train).kneighbors(x_query)
    index = knn.neighbours_numpy(x_query, train, 5, "l1")
    dist = np.abs(x_query[:, None, :].astype(np.int32) - train[index].astype(np.int32)).sum(axis=2)
    # The same distances; which of several equidistant images is returned may differ ("ties aside").
    assert np.array_equal(dist, expected_dist.astype(np.int64))
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_l2_neighbours_match_scikit_learn(fashion):
    x_train, _, x_test, _ = fashion
    x_query = x_test[:30].reshape(30, -1)
    train = x_train.reshape(60000, -1)
    expected_dist, _ = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(train).kneighbors(x_query)
    index = knn.neighbours_numpy(x_query, train, 5, "l2")
    dist = np.sqrt(((x_query[:, None, :].astype(np.int64) - train[index]) ** 2).sum(axis=2))
    assert np.allclose(dist, expected_dist)


@pytest.fixture(scope="module")
def reference_8(fashion):
    """The NumPy reference's 8 nearest of 64 test images, nearest first, ties in training order (so
    its first k columns are the k nearest)."""
    x_train, _, x_test, _ = fashion
    return knn.neighbours_numpy(x_test[100:164], x_train, 8, "l1")


def test_the_k_nearest_are_the_first_k_of_the_8_nearest(fashion, reference_8):
    x_train, _, x_test, _ = fashion
    assert np.array_equal(knn.neighbours_numpy(x_test[100:116], x_train, 3, "l1"), reference_8[:16, :3])


@pytest.mark.xdist_group("numba")  # under pytest-xdist: each kernel compiled by one process
@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("k", [1, 5, 8])
def test_numba_kernel_gives_the_numpy_neighbours_bit_for_bit(fashion, reference_8, isa, k):
    x_train, _, x_test, _ = fashion
    assert np.array_equal(knn.neighbours_numba(x_test[100:164], x_train, k, isa), reference_8[:, :k])


@pytest.mark.xdist_group("numba")
def test_equal_distances_are_taken_in_training_order():
    # 28x28 images (the kernel the other tests compile) that differ in one pixel.
    x_train, x_query = np.zeros((6, 28, 28), np.uint8), np.zeros((2, 28, 28), np.uint8)
    x_train[:, 5, 5] = [5, 3, 7, 3, 3, 9]  # distances 0,2,2,2,... from 5
    x_query[:, 5, 5] = [5, 3]
    expected = [[0, 1, 2, 3], [1, 3, 4, 0]]
    assert knn.neighbours_numpy(x_query, x_train, 4, "l1").tolist() == expected
    assert knn.neighbours_numba(x_query, x_train, 4).tolist() == expected


def test_a_tied_vote_goes_to_the_smallest_label():
    labels = np.array([[7, 2, 7, 2, 9], [4, 4, 4, 1, 1], [3, 8, 6, 0, 5]])
    assert knn.vote(labels).tolist() == [2, 4, 0]


@pytest.mark.xdist_group("numba")
def test_exact_figure_on_a_fixed_subset_with_the_numpy_reference(fashion):
    x_train, y_train, x_test, y_test = fashion
    predictions = knn.predict(x_test[:50], x_train, y_train, backend="numpy")
    # The first 50 test images: 41 right, measured once with this reference (the first 100: 85).
    assert int((predictions == y_test[:50]).sum()) == 41
    assert np.array_equal(predictions, knn.predict(x_test[:50], x_train, y_train, backend="numba"))




@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be between 1 and 60000 (the training images)"),
    (["--k", "60001"], "--k must be between 1 and 60000 (the training images)"),
    (["--k", "60001", "--backend", "numpy"], "--k must be between 1 and 60000 (the training images)"),
    (["--k", "nan"], "argument --k: invalid int value: 'nan'"),
    (["--limit", "0"], "--limit must be between 1 and 10000 (the test images)"),
    (["--limit", "10001"], "--limit must be between 1 and 10000 (the test images)"),
])
def test_bad_options_are_refused_with_one_line_before_any_work(args, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["knn.py", *args])
    with pytest.raises(SystemExit) as exit_:
        knn.main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and message in err.splitlines()[-1]
    assert out == ""  # nothing loaded, nothing compiled


@pytest.mark.xdist_group("numba")
def test_no_test_images_give_no_neighbours(fashion):
    x_train = fashion[0][:100]
    assert knn.neighbours_numba(x_train[:0], x_train, 3).shape == (0, 3)
    for metric in ("l1", "l2"):
        assert knn.neighbours_numpy(x_train[:0], x_train, 3, metric).shape == (0, 3)


@pytest.mark.xdist_group("numba")
def test_predict_refuses_more_neighbours_than_training_images(fashion):
    x_train, y_train, x_test, _ = fashion
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match="k must be between 1 and 10"):
            knn.predict(x_test[:3], x_train[:10], y_train[:10], k=11, backend=backend)


def test_an_instruction_set_the_cpu_lacks_is_refused_not_compiled():
    missing = [isa for isa in knn.ISAS if isa not in available_isas()]
    for isa in missing:  # LLVM would abort the whole process on it
        with pytest.raises(ValueError, match=f"has no {isa}"):
            knn.neighbours_numba(np.zeros((1, 8), np.uint8), np.zeros((1, 8), np.uint8), 1, isa)


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A new numba cache folder after `knn.py` (the whole test set) and `knn.py --limit 20`:
    (folder, first stdout, second stdout)."""
    folder = tmp_path_factory.mktemp("numba-cache")
    first, second = (run_knn(*args, NUMBA_CACHE_DIR=str(folder)) for args in ([], ["--limit", "20"]))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    return folder, first.stdout, second.stdout


@pytest.mark.xdist_group("kernel_cache")
def test_full_test_set_gives_the_seeds_accuracy(kernel_cache):
    first = kernel_cache[1].splitlines()
    assert "Test accuracy: 0.8623" in first
    assert any(line.startswith("Settings: ") and " backend=numba " in line for line in first)


@pytest.mark.xdist_group("kernel_cache")  # under pytest-xdist: one process makes the cache once
def test_the_kernel_is_compiled_once_then_loaded_from_the_disk_cache(kernel_cache):
    folder, first, second = kernel_cache
    assert f", compiled and cached in {folder}" in first
    assert list(folder.rglob("knn.top_k_l1-*.nbi")) and list(folder.rglob("knn.top_k_l1-*.nbc"))
    # From numba's dispatcher stats in the second process: cache hits and no miss, so nothing compiled.
    assert f", loaded from the cache in {folder}" in second


@pytest.mark.xdist_group("kernel_cache")
def test_a_cached_kernel_serves_only_its_own_instruction_set_and_cpu(kernel_cache):
    folder = kernel_cache[0]  # holds the best instruction set's kernel for this CPU
    best = knn.best_isa()
    others = ["portable"] if best != "portable" else []
    # This CPU: its own instruction set is found, another is not; numba's generic target (another CPU)
    # finds none: both would be compiled, not loaded.
    assert probes(folder, ([best, *others], {}), ([best], {"NUMBA_CPU_NAME": "generic"})) == [
        [True, *[False] * len(others)], [False]]


def test_without_a_writable_cache_folder_knn_imports_and_keeps_no_cache(tmp_path):
    shutil.copy(ROOT / "knn.py", tmp_path)
    blocker = tmp_path / "__pycache__"  # a file where numba would make the folders
    blocker.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(blocker / "numba"), "XDG_CACHE_HOME": str(blocker / "user")}
    out = subprocess.run([sys.executable, "-c", "import knn; print(knn.top_k_l1.stats.cache_path)"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"  # numba's NullCache: importing works, nothing is kept


@pytest.mark.xdist_group("kernel_cache")
@pytest.mark.parametrize("damage", ["random .nbc", "empty .nbi"])
def test_a_damaged_kernel_cache_is_said_and_replaced_and_the_answer_stays(kernel_cache, tmp_path, damage):
    """A cache file cut short or garbled (a full disk, a kill during the first run's save) must not fail
    knn.py, then or ever after: one line, a new compile that replaces it, the same figures."""
    folder = tmp_path / "cache"
    shutil.copytree(kernel_cache[0], folder)
    suffix = damage.split()[1]
    files = list(folder.rglob(f"knn.top_k_l1-*{suffix}"))
    assert files
    for path in files:
        path.write_bytes(os.urandom(2000) if damage.startswith("random") else b"")
    broken, again = (run_knn("--limit", "20", NUMBA_CACHE_DIR=str(folder)) for _ in range(2))
    assert broken.returncode == 0 and "Traceback" not in broken.stderr, broken.stderr
    warnings = [line for line in broken.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "could not be used" in warnings[0] and "compiling it again" in warnings[0]
    assert ", compiled and cached in " in broken.stdout
    expected = [line for line in kernel_cache[2].splitlines() if "accuracy" in line]
    assert [line for line in broken.stdout.splitlines() if "accuracy" in line] == expected
    assert ", loaded from the cache in " in again.stdout and "warning" not in again.stderr  # replaced for good


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_knn_run_says_so_in_one_line_with_the_signals_status(stop):
    """SIGTERM (a scheduler, `timeout`) or Ctrl-C during a long command: one line, status 143 or 130."""
    process = subprocess.Popen([sys.executable, "knn.py", "--backend", "numpy", "--limit", "4000"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline().startswith("  ")  # the first progress line: it is computing
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop and "Traceback" not in stderr, stderr
    how = "SIGTERM" if stop == signal.SIGTERM else "Ctrl-C"
    assert stderr.strip().splitlines()[-1] == f"Stopped ({how}) before the end; no file is left half-written"
