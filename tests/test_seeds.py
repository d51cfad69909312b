"""bench/seeds.py, the seeds benchmark: one train.py command per seed in a copy of the scripts, the
table of figures with its mean ± std, the shipped copy of the best seed on validation, and a rerun
that reads finished seeds back instead of training them again."""

import json
import subprocess
import sys

import numpy as np
import pytest

import machine
import sandbox

BENCH = ("bench/seeds.py",)
# Every process in the copy (the benchmark and its train.py runs) sees the first 200 test images only.
CUT_TEST_SET = """
import data
_load_data = data.load_data
data.load_data = lambda kind: tuple(a[:200] if kind == "t10k" else a for a in _load_data(kind))
"""
TINY_RUN = ["--", "--arch", "small", "--epochs", "1", "--limit", "300", "--batch-size", "51"]  # 5 steps of 51


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    folder = sandbox.make(tmp_path_factory.mktemp("seeds"), extra=BENCH)
    (folder / "sitecustomize.py").write_text(CUT_TEST_SET)
    return folder


def bench(folder, *argv):
    return subprocess.run([sys.executable, "bench/seeds.py", *argv], cwd=folder, capture_output=True, text=True,
                          env=sandbox.environment(PYTHONPATH=str(folder)), stdin=subprocess.DEVNULL, timeout=600)


def table(stdout):
    """{first cell: the other cells} of the benchmark's table."""
    lines = stdout[stdout.index("validation"):].splitlines()[1:]
    return {line[:10].strip(): [cell.strip() for cell in line[11:].split("  ") if cell.strip()]
            for line in lines if line[:10].strip() in ("1", "2", "mean ± std")}


def test_one_run_per_seed_then_mean_and_std_and_the_best_on_validation_shipped(copy):
    result = bench(copy, "--recipe", "quick", "--seeds", "1", "2", "--ship", "mine", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("$ python train.py --recipe quick --seed") == 2
    infos = [json.loads((copy / "models" / f"quick_{seed}.json").read_text()) for seed in (1, 2)]
    assert [info["seed"] for info in infos] == [1, 2] and all(info["arch"] == "small" for info in infos)
    rows = table(result.stdout)
    validation = [info["val_accuracy"] for info in infos]
    minutes = [info["command_seconds"] / 60 for info in infos]
    for seed, info in zip(("1", "2"), infos):
        assert rows[seed][0] == f"{info['val_accuracy']:.2%}" and rows[seed][1] == f"{info['test_accuracy']:.2%}"
        assert rows[seed][3] == f"{info['command_seconds'] / 60:.1f}"
    assert rows["mean ± std"][0] == f"{np.mean(validation):.2%} ± {np.std(validation, ddof=1):.2%}"
    assert rows["mean ± std"][3] == f"{np.mean(minutes):.1f} ± {np.std(minutes, ddof=1):.1f}"
    assert machine.cpu_name() in result.stdout  # the processor
    # the shipped copy: the best seed on validation (the first of equals), its files the same bytes
    best = f"quick_{int(np.argmax(validation)) + 1}"
    shipped = json.loads((copy / "models" / "mine.json").read_text())
    assert shipped["copied_from"] == best and shipped["chosen_from"] == ["quick_1", "quick_2"]
    assert shipped["model"] == "mine" and shipped["chosen_on"] == "val_accuracy"
    for suffix in (".h5", ".csv"):
        assert (copy / "models" / f"mine{suffix}").read_bytes() == (copy / "models" / f"{best}{suffix}").read_bytes()

    # The same command again trains nothing: both seeds are read back, to the same table.
    again = bench(copy, "--recipe", "quick", "--seeds", "1", "2", *TINY_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ python train.py" not in again.stdout and again.stdout.count("finished earlier") == 2
    assert table(again.stdout) == rows

    # The same command under a recipe since changed is another run: seed 1 recorded other settings
    # (as the quick recipe's 16 epochs before it became 28), so it trains again; seed 2 is read back.
    path = copy / "models" / "quick_1.json"
    path.write_text(json.dumps({**infos[0], "settings": {**infos[0]["settings"], "epochs": 16}}))
    changed = bench(copy, "--recipe", "quick", "--seeds", "1", "2", *TINY_RUN)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stdout.count("$ python train.py --recipe quick --seed 1 ") == 1
    assert "$ python train.py --recipe quick --seed 2 " not in changed.stdout
    assert changed.stdout.count("finished earlier") == 1
    assert json.loads(path.read_text())["settings"] == infos[0]["settings"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "--ship", "refused_1", *TINY_RUN], "--ship needs a name other than the runs' own"),
    (["--seeds", "1", "1", *TINY_RUN], "each seed once"),
    (["--seeds", "1", *TINY_RUN, "--epochs", "0"], "--epochs"),  # train.py's own check, before any run
])
def test_nonsense_is_refused_before_any_run(copy, argv, message):
    # (the tiny run's flags in each: a check that failed to refuse would cost seconds, not a real run)
    result = bench(copy, "--recipe", "quick", "--prefix", "refused", *argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list((copy / "models").glob("refused*")) if (copy / "models").exists() else True


def test_time_to_accuracy_reads_the_runs_records_and_refuses_runs_without_them(tmp_path):
    folder = sandbox.make(tmp_path / "copy", extra=BENCH + ("bench/time_to_accuracy.py",))
    (folder / "models").mkdir()
    # a run of 4 epochs of 4 minutes each, and one trained on all the data (no validation)
    for name, accuracy in (("mine", ["0.90", "0.93", "0.95", "0.94"]), ("everything", ["NA"] * 4)):
        (folder / "models" / f"{name}.h5").write_bytes(b"")
        (folder / "models" / f"{name}.csv").write_text(
            "epoch,accuracy,loss,val_accuracy,val_loss\n" + "".join(f"{i},0.9,0.3,{a},0.3\n" for i, a in enumerate(accuracy)))
        (folder / "models" / f"{name}.json").write_text(json.dumps(
            {"train_seconds": 960.0, "epochs_done": 4, "device": "CPU: Test, 2 cores", "dtype_policy": "float32",
             "settings": {"arch": "small"}}))

    def plot(*names):
        return subprocess.run([sys.executable, "bench/time_to_accuracy.py", *names], cwd=folder, capture_output=True,
                              text=True, env=sandbox.environment(), timeout=120)

    result = plot("mine")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("mine"))
    # after 5 minutes one epoch (90 %), after 10 two (93 %), after 15 and 20 the best of three (95 %)
    assert row.split()[1:5] == ["90.00%", "93.00%", "95.00%", "95.00%"] and "12.0 min" in row
    assert (folder / "screenshots" / "Time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    for names, message in ((["everything"], "everything has no validation split"),
                           (["nothing"], "nothing has no training record")):
        refused = plot(*names)
        assert refused.returncode == 1 and refused.stderr.startswith(f"error: {message}")
        assert "Traceback" not in refused.stderr
