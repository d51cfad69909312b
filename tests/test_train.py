"""train.py and test.py end to end, unattended, on small subsets, in a copy of the project.

Each run happens in a sandbox (the scripts copied to a temporary folder, data/ linked)
so the tests never touch the project's own models/ and screenshots/.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import data

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["data.py", "erasing.py", "models.py", "train.py", "test.py"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    data.get_data("train"), data.get_data("t10k")
    folder = tmp_path_factory.mktemp("project")
    for script in SCRIPTS:
        shutil.copy(ROOT / script, folder / script)
    (folder / "data").symlink_to(data.DATA_DIR)
    return folder


def run(folder, *args, backend="tensorflow", check=True):
    env = {**os.environ, "KERAS_BACKEND": backend}
    out = subprocess.run([sys.executable, *args], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def smoke(sandbox):
    """One small run: 1,000 training images (850 train, 150 validate), two copies each, 1 epoch."""
    out = run(sandbox, "train.py", "--epochs", "1", "--limit", "1000", "--name", "smoke")
    return sandbox, out


def test_training_writes_both_models_the_json_the_csv_and_the_plot(smoke):
    folder, out = smoke
    for name in ["smoke.h5", "smoke.json", "smoke.csv", "latest_acc.h5", "latest_acc.json", "latest.csv"]:
        assert (folder / "models" / name).is_file(), name
    assert (folder / "screenshots" / "Training_history.png").stat().st_size > 10_000
    assert "Images: 2550 training (copies), 150 validation, 10000 test" in out.stdout
    assert "Training on CPU" in out.stdout or "Training on GPU" in out.stdout
    info = json.loads((folder / "models" / "smoke.json").read_text())
    assert info["settings"]["batch_size"] == 250 and info["settings"]["augment_copies"] == 2
    assert info["seed"] == 1 and info["epochs"] == 1 and info["limit"] == 1000
    assert info["argv"][1:] == ["--epochs", "1", "--limit", "1000", "--name", "smoke"]
    assert info["device"] and info["keras"] == keras.__version__ and info["train_seconds"] > 0
    assert f"Test accuracy: {info['test_accuracy']:.4f}" in out.stdout
    assert 0.0 <= info["val_accuracy"] <= 1.0 and info["test_loss"] > 0
    # The saved model opens in plain Keras, with no help from this project.
    model = keras.models.load_model(folder / "models" / "smoke.h5")
    assert model.count_params() == 3_458_382


def test_test_script_prints_the_figures_and_draws_both_plots(smoke):
    folder, _ = smoke
    out = run(folder, "test.py", "smoke", "--tta")
    info = json.loads((folder / "models" / "smoke.json").read_text())
    assert f"Test accuracy: {info['test_accuracy']:.4f}" in out.stdout.splitlines()
    assert "Model: smoke with TTA" in out.stdout and "Per-class accuracy:" in out.stdout
    assert "T-shirt/top" in out.stdout and "macro avg" in out.stdout  # scikit-learn's report
    for png in ["Confusion_matrix.png", "Incorrect_classifications.png"]:
        assert (folder / "screenshots" / png).stat().st_size > 10_000


def test_several_models_are_evaluated_then_ensembled(smoke):
    folder, _ = smoke
    out = run(folder, "test.py", "smoke", "latest_acc")
    assert out.stdout.count("Test accuracy:") == 3
    assert "Model: ensemble of smoke + latest_acc" in out.stdout


def test_an_unknown_model_name_is_one_line_and_non_zero(smoke):
    folder, _ = smoke
    out = run(folder, "test.py", "nope", check=False)
    assert out.returncode == 1
    assert "error: no model named 'nope'" in out.stderr and "smoke" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_same_seed_gives_the_same_figures(sandbox):
    figures = []
    for name in ["same_a", "same_b"]:
        run(sandbox, "train.py", "--epochs", "1", "--limit", "400", "--name", name, "--augment", "online")
        info = json.loads((sandbox / "models" / f"{name}.json").read_text())
        figures.append((info["val_loss"], info["test_loss"], info["test_accuracy"]))
    assert figures[0] == figures[1]


def test_all_data_trains_on_every_image_and_keeps_no_checkpoint(sandbox):
    # A checkpoint left by an earlier run must not be evaluated as this run's.
    run(sandbox, "train.py", "--epochs", "1", "--limit", "300", "--name", "earlier")
    before = (sandbox / "models" / "latest_acc.json").read_text()
    out = run(sandbox, "train.py", "--epochs", "1", "--limit", "300", "--all-data", "--recipe", "fast",
              "--name", "everything")
    assert "Images: 300 training (online), 0 validation, 10000 test" in out.stdout
    assert "trained on all 300 training images: no validation" in out.stdout
    assert "Best checkpoint" not in out.stdout
    assert (sandbox / "models" / "latest_acc.json").read_text() == before
    info = json.loads((sandbox / "models" / "everything.json").read_text())
    assert info["all_data"] is True and info["val_accuracy"] is None and "best_epoch" not in info
    assert f"Test accuracy: {info['test_accuracy']:.4f}" in out.stdout
    history = np.genfromtxt(sandbox / "models" / "everything.csv", delimiter=",", names=True)
    assert np.isnan(history["val_accuracy"]).all()  # Keras's CSVLogger writes NA
    assert (sandbox / "screenshots" / "Training_history.png").stat().st_size > 10_000


def test_resume_continues_the_epoch_count_and_the_history(sandbox):
    run(sandbox, "train.py", "--epochs", "1", "--limit", "400", "--name", "part", "--recipe", "fast")
    out = run(sandbox, "train.py", "--resume", "--epochs", "2", "--name", "whole")
    assert "Resuming after epoch 1 of 2" in out.stdout
    info = json.loads((sandbox / "models" / "whole.json").read_text())
    assert info["epochs_done"] == 2 and info["recipe"] == "fast" and info["settings"]["augment"] == "online"
    history = np.genfromtxt(sandbox / "models" / "whole.csv", delimiter=",", names=True)
    assert history["epoch"].tolist() == [0, 1]


def test_ctrl_c_keeps_the_best_checkpoint_and_says_how_to_resume(sandbox):
    best = sandbox / "models" / "latest_acc.h5"
    best.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "train.py", "--epochs", "50", "--limit", "600", "--name", "stop"],
                               cwd=sandbox, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not best.exists() and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Continue with: python train.py --resume" in stdout
    assert keras.models.load_model(best).count_params() == 3_458_382
    assert not (sandbox / "models" / "stop.h5").exists()


def test_jax_backend_trains_and_its_model_loads_here(sandbox):
    out = run(sandbox, "train.py", "--epochs", "1", "--limit", "300", "--name", "jax_smoke", backend="jax")
    assert "backend jax" in out.stdout
    model = keras.models.load_model(sandbox / "models" / "jax_smoke.h5")  # loaded under TensorFlow
    assert model.count_params() == 3_458_382


def test_bad_options_are_refused_with_one_line(sandbox):
    out = run(sandbox, "train.py", "--epochs", "0", check=False)
    assert out.returncode == 2 and "--epochs and --batch-size must be at least 1" in out.stderr
    out = run(sandbox, "train.py", "--limit", "5", check=False)
    assert out.returncode == 2 and "--limit must be at least 20" in out.stderr
    out = run(sandbox, "train.py", "--minutes", "5", "--epochs", "3", check=False)
    assert out.returncode == 2 and "--minutes must be above 0, and goes without --epochs" in out.stderr


def test_minutes_times_this_machine_and_records_the_epochs_it_chose(sandbox):
    out = run(sandbox, "train.py", "--recipe", "fast", "--minutes", "0.2", "--limit", "600", "--name", "timed")
    info = json.loads((sandbox / "models" / "timed.json").read_text())
    epochs = info["settings"]["epochs"]
    assert f"{epochs} epochs fit in 0.2 minutes (the same run again: --epochs {epochs})" in out.stdout
    assert epochs >= 1 and info["epochs_done"] == epochs
    assert info["timed"]["train_images_per_s"] > 0 and info["timed"]["epoch_seconds_estimate"] > 0
