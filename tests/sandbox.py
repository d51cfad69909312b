"""Runs of train.py for the tests. In-process (run, refused, under conftest's `project` fixture); and
as separate processes in a copy of the scripts in a temporary folder, that must not touch the
project's files: its own models/ and screenshots/, the project's data/ linked.

run_train.py in the copy is train.py with the test images cut to the first 200: these runs test what
is written and how it trains, not accuracy, and evaluating 10,000 images would be most of their time.
"""

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

import data
import models
import train

ROOT = Path(__file__).resolve().parent.parent
# Whole batches only (a smaller last batch would cost another trace of the training step).
TINY = ["--epochs", "1", "--limit", "40", "--batch-size", "51"]  # 34 train (2 steps of 51 with the copies), 6 validate
SMALL = ["--limit", "60", "--batch-size", "51"]  # 51 train (3 steps of 51 with the copies), 9 validate
RUNNER = """
import os, sys
if os.environ.get("KERAS_BACKEND") == "jax":
    sys.modules["tensorflow"] = None  # JAX alone: Keras would import TensorFlow only to seed it
import data
load_data = data.load_data
data.load_data = lambda kind: tuple(a[:200] if kind == "t10k" else a for a in load_data(kind))
import train
import distribute
distribute.JOIN_SECONDS = float(os.environ.get("JOIN_SECONDS", distribute.JOIN_SECONDS))
import machine
machine.run(lambda: train.main(sys.argv[1:]))  # as train.py runs its main
"""


def make(folder, extra=()):
    """The copy in `folder` (made here): every top-level script (so a new module needs no list kept up to
    date here), the `extra` paths (such as "bench/seeds.py"), and run_train.py beside them."""
    data.get_data("train"), data.get_data("t10k")
    folder.mkdir(parents=True, exist_ok=True)
    for script in sorted(path.name for path in ROOT.glob("*.py")) + list(extra):
        (folder / script).parent.mkdir(exist_ok=True)
        (folder / script).write_bytes((ROOT / script).read_bytes())
    (folder / "run_train.py").write_text(RUNNER)
    (folder / "data").symlink_to(data.DATA_DIR)
    return folder


def stop_after_first_checkpoint(folder, signum, *args, name="latest"):
    """`python train.py *args` in the copy, sent `signum` once run NAME has written its first best
    checkpoint (so there is an epoch to keep): (returncode, stdout, stderr)."""
    best = folder / "models" / f"{name}_acc.h5"
    process = start(folder, *args)
    deadline = time.time() + 120
    while not best.exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


def environment(**variables):
    """The environment of a run in a copy: the copy reports the commit of the checkout it came from."""
    return {**os.environ, "GIT_DIR": str(ROOT / ".git"), "GIT_WORK_TREE": str(ROOT), **variables}


def start(folder, *args, **variables):
    """`python train.py *args` in the copy (its run_train.py), in the background, with `variables` added
    to the environment: a Popen whose stdout and stderr are text pipes."""
    return subprocess.Popen([sys.executable, "run_train.py", *args], cwd=folder, env=environment(**variables),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- In-process runs (in conftest's `project`) ----

def run(*argv):
    train.main(list(argv))
    return models.MODELS_DIR


def info(name):
    return json.loads((models.MODELS_DIR / f"{name}.json").read_text())


def refused(*argv):
    """The one-line error of a run that must not start."""
    with pytest.raises(SystemExit) as exit_:
        train.main(list(argv))
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    exit_ = None  # the traceback holds the run's frame, and with it the run's lock
    gc.collect()
    return message


def weights(path):
    return keras.models.load_model(path).get_weights()
