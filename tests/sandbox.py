"""A copy of the scripts in a temporary folder, for runs as separate processes that must not touch the
project's files: its own models/ and screenshots/, the project's data/ linked.

run_train.py in the copy is train.py with the test images cut to the first 200: these runs test what
is written and how it trains, not accuracy, and evaluating 10,000 images would be most of their time.
"""

import os
import subprocess
import sys
from pathlib import Path

import data

ROOT = Path(__file__).resolve().parent.parent
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
train.main(sys.argv[1:])
"""


def make(folder, scripts=("data.py", "distribute.py", "erasing.py", "machine.py", "models.py", "train.py")):
    """The copy in `folder` (made here), with run_train.py beside the scripts."""
    data.get_data("train"), data.get_data("t10k")
    folder.mkdir(parents=True, exist_ok=True)
    for script in scripts:
        (folder / script).write_bytes((ROOT / script).read_bytes())
    (folder / "run_train.py").write_text(RUNNER)
    (folder / "data").symlink_to(data.DATA_DIR)
    return folder


def environment(**variables):
    """The environment of a run in a copy: the copy reports the commit of the checkout it came from."""
    return {**os.environ, "GIT_DIR": str(ROOT / ".git"), "GIT_WORK_TREE": str(ROOT), **variables}


def start(folder, *args, **variables):
    """`python train.py *args` in the copy (its run_train.py), in the background, with `variables` added
    to the environment: a Popen whose stdout and stderr are text pipes."""
    return subprocess.Popen([sys.executable, "run_train.py", *args], cwd=folder, env=environment(**variables),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
