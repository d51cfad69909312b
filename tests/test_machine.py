"""machine.py: the backend's start, as every script that starts Keras meets it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import machine

ROOT = Path(__file__).resolve().parent.parent


PRELOAD_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import machine
machine.preload_tcmalloc()
print(repr(os.environ.get("LD_PRELOAD")), "tcmalloc" in open("/proc/self/maps").read(), sys.argv[2:])
"""


def test_train_py_runs_again_with_tcmalloc_preloaded_unless_ld_preload_is_set(tmp_path):
    """make setup installs libtcmalloc-minimal4 (apt); a script that asks runs on under it, with its
    arguments, and an LD_PRELOAD the user set (even empty) is left as it is."""
    probe = tmp_path / "probe.py"
    probe.write_text(PRELOAD_PROBE)
    bare = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    for env, expected in [(bare, "'libtcmalloc_minimal.so.4' True ['a b', '--c']\n"),
                          ({**bare, "LD_PRELOAD": ""}, "'' False ['a b', '--c']\n")]:
        done = subprocess.run([sys.executable, "-u", str(probe), str(ROOT), "a b", "--c"], env=env,
                              capture_output=True, text=True)
        assert (done.returncode, done.stdout, done.stderr) == (0, expected, "")
    assert "machine.preload_tcmalloc()" in (ROOT / "train.py").read_text().split("machine.start_backend()")[0]


def test_no_tcmalloc_no_preload(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail(f"ran again: {args}"))
    assert machine.preload_tcmalloc(find_library=lambda name: None) is None


@pytest.mark.parametrize("value", ["torch", "bogus"])
def test_a_wrong_keras_backend_stops_every_script_with_one_line(value):
    """People set KERAS_BACKEND for other projects: one line naming it, what is installed and the fix."""
    for script in ("train.py", "test.py", "predict.py", "export.py"):
        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "KERAS_BACKEND": value})
        assert done.returncode == 1 and done.stdout == "", (script, done.stderr)
        assert done.stderr == (f"error: KERAS_BACKEND={value!r} is not a backend this project runs under "
                               f"(installed: tensorflow, jax); unset KERAS_BACKEND, or set it to tensorflow or jax\n")


def test_a_backend_that_is_not_installed_is_named_with_the_ones_that_are(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        machine.check_backend("jax")
    assert exit_.value.code == ("error: KERAS_BACKEND='jax' is not installed here (installed: tensorflow); "
                                "unset KERAS_BACKEND, or set it to tensorflow")
    assert machine.check_backend(" TensorFlow ") == "tensorflow"  # as a user might spell it


def test_a_full_disk_anywhere_in_a_script_is_one_line_and_leaves_the_old_file(tmp_path):
    """machine.run, around every script's main: what filled up, about how much it needs; the file it
    was replacing stays whole and no temporary file is left."""
    import data

    target = tmp_path / "fast.json"
    target.write_text('{"temperature": 1.5}\n')

    def calibrate():
        def fills_up(f):
            f.write(b"{" * 300)
            raise OSError(28, "No space left on device")

        data.atomic_write(target, fills_up)

    with pytest.raises(SystemExit) as exit_:
        machine.run(calibrate)
    assert exit_.value.code == (f"error: no space left on the disk for {target} (it needs at least 1 kB); nothing "
                                f"half-written is left: free some space and run again")
    assert target.read_text() == '{"temperature": 1.5}\n' and [p.name for p in tmp_path.iterdir()] == ["fast.json"]


@pytest.mark.parametrize("error, expected", [
    (ValueError("bad header\nsecond line"), "bad header"),
    (OSError("\n\n  \x00\x01 garbled  \nmore"), "\x00\x01 garbled"),  # blank lines first, as in random bytes
    (EOFError(), "EOFError"),                                       # no message: the type names it
    (KeyError(""), "''"),
])
def test_an_error_reason_is_one_line_of_its_message_or_its_type(error, expected):
    assert machine.reason(error) == expected
    assert "\n" not in machine.reason(error)


def test_an_error_reason_is_cut_to_its_limit():
    assert machine.reason(RuntimeError("x" * 500), 120) == "x" * 120
