"""runs.py: a run's life around the recipe. Its names and files, the lock and the replace question,
the resume state (a resumed run is the unbroken run), the checkpoints and the time left, Ctrl-C,
and the record. Runs happen in-process where they can (train.main under conftest's `project`), and
as a subprocess where the process itself matters: `python train.py` as the README gives it,
stopped with Ctrl-C, then --resume.
"""

import fcntl
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import callbacks
import machine
import models
import runs
import sandbox
import train
from sandbox import SMALL, TINY, info, refused, run, weights

ROOT = Path(__file__).resolve().parent.parent
# Whole batches only (a smaller last batch would cost another trace of the training step).


# ---- Pure parts ----

def test_the_time_left_is_told_at_this_sessions_pace_without_its_first_epoch():
    assert callbacks.time_left(99, [960.0]) == "99 epochs to go: about 26 h 24 min at this pace"
    assert callbacks.time_left(2, [40.0, 700.0, 800.0]) == "2 epochs to go: about 25 min at this pace"
    assert callbacks.time_left(1, [9.0, 3.0]) == "1 epoch to go: about 3 s at this pace"


def test_a_resumed_run_is_the_unbroken_run_and_resume_finds_its_own_run(project):
    run("--epochs", "2", *SMALL, "--name", "whole")
    run("--epochs", "1", *SMALL, "--name", "split")
    after_1 = runs.run_files("split")["resume_info"].read_text()
    run("--resume", "--epochs", "2", "--name", "split")
    for a, b in zip(weights(project / "models" / "whole.h5"), weights(project / "models" / "split.h5")):
        assert np.array_equal(a, b)
    assert (project / "models" / "whole.csv").read_bytes() == (project / "models" / "split.csv").read_bytes()
    whole, split = info("whole"), info("split")
    assert split["epochs_done"] == 2 and split["resumed_with"] == ["python train.py --resume --epochs 2 --name split"]
    assert (whole["test_accuracy"], whole["val_loss"]) == (split["test_accuracy"], split["val_loss"])
    assert whole["command"] == "python train.py --epochs 2 --limit 60 --batch-size 51 --name whole"
    assert whole["settings"]["erase_fill"] == "box" and whole["settings"]["dropout"] == "full_1"
    # C starts after `whole` ended, and stops before its first epoch ends: its resume state,
    # written when it started, says 0 epochs done. --resume continues C, not `whole`.
    args, settings = train.parse_args(["--epochs", "1", *TINY[2:], "--seed", "9", "--name", "C"])
    runs.claim(args)[1].close()
    models.write_json(runs.run_files("C")["resume_info"],
                      {"command": "...", "recipe": "original", "settings": settings, "seed": 9, "limit": 40,
                       "all_data": False, "epochs_done": 0, "train_seconds": 0.0})
    args, _ = train.parse_args(["--resume", "--name", "C"])
    files, lock = runs.claim(args)
    resumed, resumed_settings, extended = runs.begin(args, settings, files, "python train.py --resume --name C")
    lock.close()
    assert (args.seed, args.limit, resumed_settings, extended) == (9, 40, settings, False)
    assert resumed["epochs_done"] == 0 and resumed["resumed_with"] == ["python train.py --resume --name C"]
    assert "nothing of 'D' to resume" in refused("--resume", "--name", "D")
    # split's model after epoch 2 beside its JSON of epoch 1 (one put back without the other, or a
    # stop between the two writes): refused, nothing changed, rather than epoch 2 trained twice.
    files = runs.run_files("split")
    files["resume_info"].write_text(after_1)
    before = {path: path.read_bytes() for path in (files["resume"], files["resume_info"], files["csv"])}
    message = refused("--resume", "--epochs", "3", "--name", "split")
    assert "split_resume.keras has trained 2 epochs but split_resume.json says 1" in message
    assert before == {path: path.read_bytes() for path in before}


def test_latest_is_replaced_but_a_named_model_only_with_overwrite(project):
    models.MODELS_DIR.mkdir()
    for name in ("latest.h5", "latest.csv", "latest_acc.h5", "latest.json"):  # an earlier run's
        (models.MODELS_DIR / name).write_text("earlier")
    run(*TINY, "--seed", "3")
    assert info("latest")["seed"] == 3 and info("latest_acc")["best_epoch"] == 1
    assert (project / "models" / "latest.csv").read_text().count("\n") == 2  # header and epoch 0
    for name in ("latest.h5", "latest.csv", "latest_acc.h5", "latest_resume.keras"):
        assert (project / "models" / name).is_file(), name
    assert (project / "screenshots" / "latest" / "Training_history.png").stat().st_size > 10_000
    assert not (project / "screenshots" / "Training_history.png").exists()  # the shipped plots stay
    # A named model, e.g. a shipped one, is refused unless --overwrite says so.
    shutil.copy(project / "models" / "latest.h5", project / "models" / "mine.h5")
    models.write_json(project / "models" / "mine.json", {"test_accuracy": 0.9487})
    message = refused(*TINY, "--name", "mine")
    assert "mine.h5 exists" in message and "--overwrite" in message
    assert info("mine") == {"test_accuracy": 0.9487}
    # With --overwrite the run starts, and first deletes what an earlier run of the name left behind
    # (its files are then replaced as latest's were above).
    args, settings = train.parse_args([*TINY, "--seed", "2", "--name", "mine", "--overwrite"])
    files, lock = runs.claim(args)
    for stale in ("best", "csv", "resume"):
        files[stale].write_text("earlier")
    runs.begin(args, settings, files, "python train.py --name mine --overwrite")
    lock.close()
    assert not any(files[stale].exists() for stale in ("best", "csv", "resume"))
    assert json.loads(files["resume_info"].read_text())["seed"] == 2
    # A damaged resume state is one line.
    files = runs.run_files("latest")
    files["resume"].write_bytes(files["resume"].read_bytes()[:5000])
    json.loads(files["resume_info"].read_text())  # still fine: the .keras is the damaged one
    message = refused("--resume", "--epochs", "2")
    assert "the resume state" in message and "latest_resume.keras is damaged" in message
    files["resume_info"].write_text("{not json")
    message = refused("--resume")
    assert "latest_resume.json is damaged" in message and "--overwrite" in message


def test_a_new_latest_run_names_resume_before_it_replaces_a_stopped_one(project, monkeypatch, capsys):
    """`python train.py` twice: the second replaces the first's resume state, as the scratch name's
    runs do, but not silently; at a terminal it asks, and "no" (the default) keeps everything."""
    files = runs.run_files("latest")
    files["resume_info"].parent.mkdir(parents=True)

    def start(*argv, answer=None):
        monkeypatch.setattr(sys.stdin, "isatty", lambda: answer is not None, raising=False)
        monkeypatch.setattr("builtins.input", lambda question: print(question) or answer)
        args, _ = train.parse_args(["--name", "latest", *argv])
        _, lock = runs.claim(args)
        lock.close()
        return capsys.readouterr()

    stopped = {"settings": {"epochs": 100}, "epochs_done": 18, "seed": 1}
    models.write_json(files["resume_info"], stopped)
    note = start().err  # unattended (nohup, a pipe): goes on, and says what it replaces
    assert note == ("note: the run 'latest' was stopped after epoch 18 of 100; this new run replaces it "
                    "(to continue it instead: python train.py --resume)\n")
    assert "replace it? [y/N]" in start(answer="y").out  # at a terminal: asked, and yes goes on
    for no in ("", "n"):
        monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
        monkeypatch.setattr("builtins.input", lambda question: no)
        message = refused("--name", "latest")
        assert message == ("error: the run 'latest' was stopped after epoch 18 of 100 and is kept; continue it "
                           "with: python train.py --resume, or choose another --name, or add --overwrite to "
                           "replace it")
        assert json.loads(files["resume_info"].read_text()) == stopped
    # Nothing to lose, or the user said so: no word, no question.
    assert start("--overwrite", answer="n") == ("", "")
    for quiet in ({**stopped, "epochs_done": 100}, {**stopped, "epochs_done": 0}):  # ended; stopped in epoch 1
        models.write_json(files["resume_info"], quiet)
        assert start(answer="n") == ("", "")
    files["resume_info"].write_text("{not json")  # nothing could resume from it
    assert start(answer="n") == ("", "")


def test_a_second_run_of_the_same_name_waits_for_nobody(project):
    files = runs.run_files("busy")
    files["lock"].parent.mkdir(parents=True)
    with open(files["lock"], "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert "another train.py is running as 'busy'" in refused(*TINY, "--name", "busy")
    assert not files["model"].exists() and not files["csv"].exists()


def test_folders_are_checked_before_training(project):
    (project / "models").mkdir()
    (project / "screenshots").write_text("a file where the plots should go")
    message = refused(*TINY, "--name", "fine")
    assert message.startswith("error: cannot write in") and "screenshots" in message
    assert list((project / "models").glob("fine*")) == []


def test_extending_a_cosine_run_rebuilds_its_schedule(project, capsys):
    run("--recipe", "fast", "--epochs", "1", "--limit", "60", "--batch-size", "17", "--name", "f")
    run("--resume", "--epochs", "3", "--name", "f")
    assert "The cosine schedule is rebuilt over 3 epochs" in capsys.readouterr().out
    optimizer = keras.models.load_model(project / "models" / "f_resume.keras").optimizer
    steps = int(optimizer.iterations)
    assert steps == 3 * (51 // 17)  # the fast recipe: no copies
    schedule = optimizer._learning_rate  # the schedule itself, to read it at every step
    rates = [float(schedule(step)) for step in range(steps)]
    assert all(rate > 0 for rate in rates[:-1]) and rates[3] == pytest.approx(2e-3)


def test_a_resumed_run_keeps_batchnorm_out_of_the_weight_decay_as_the_unbroken_run(project):
    """A saved optimizer does not keep which variables are out of the decay: a resume builds the
    model from the run's settings and takes the state, so both halves decay as one run would."""
    quick = ["--recipe", "quick", "--no-decay-batchnorm", "--weight-decay", "0.5"]
    run(*quick, "--epochs", "2", "--limit", "60", "--batch-size", "17", "--name", "whole")
    run(*quick, "--epochs", "1", "--limit", "60", "--batch-size", "17", "--name", "split")
    run("--resume", "--epochs", "2", "--name", "split")
    for a, b in zip(weights(project / "models" / "whole.h5"), weights(project / "models" / "split.h5")):
        assert np.array_equal(a, b)
    assert info("split")["settings"]["decay_batchnorm"] is False


def test_a_resumed_run_keeps_the_weights_average_as_the_unbroken_run(project):
    """The moving average is optimizer state: a resume takes it back, or the first epoch after the
    resume would average from zeros."""
    quick = ["--recipe", "quick", "--ema", "0.9", "--limit", "60", "--batch-size", "17"]
    run(*quick, "--epochs", "2", "--name", "whole")
    run(*quick, "--epochs", "1", "--name", "split")
    run("--resume", "--epochs", "2", "--name", "split")
    for a, b in zip(weights(project / "models" / "whole.h5"), weights(project / "models" / "split.h5")):
        assert np.array_equal(a, b)
    assert info("split")["settings"]["ema"] == 0.9


def test_no_callback_of_train_py_waits_for_each_steps_loss():
    """Keras runs batch-end hooks in a thread under JAX only when no callback defines one of its own;
    one that does makes every step wait for the last step's loss (a GPU idles between steps)."""
    for callback in [callbacks.CtrlC(), callbacks.DropoutStreams(1), callbacks.Checkpoints({}, {}, None)]:
        for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end"):
            assert getattr(type(callback), hook) is getattr(keras.callbacks.Callback, hook), (callback, hook)


def test_a_replaced_model_or_resume_state_does_not_make_the_code_dirty(tmp_path):
    """A run spanning sessions has its resume state committed, then replaces it every epoch: the
    record's git_dirty speaks of the code, not of models/ and screenshots/."""
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    git("init", "-q")
    for path in ("train.py", "models/full_1_resume.keras", "screenshots/full_1/Training_history.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("committed")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    head = git("rev-parse", "HEAD")
    (tmp_path / "models" / "full_1_resume.keras").write_text("after another epoch")
    (tmp_path / "screenshots" / "full_1" / "Training_history.png").write_text("redrawn")
    (tmp_path / "models" / "mine.h5").write_text("a new, untracked model")
    assert machine.git_state(tmp_path) == (head, False)
    (tmp_path / "train.py").write_text("edited")
    assert machine.git_state(tmp_path) == (head, True)


def test_a_copy_without_git_records_the_commit_its_sender_names(tmp_path, monkeypatch):
    """Scripts copied to another machine (a GPU box) without .git: the record keeps the commit
    named by FASHION_GIT_COMMIT, and says nothing about uncommitted changes it cannot see."""
    monkeypatch.delenv(machine.COMMIT_VARIABLE, raising=False)
    assert machine.git_state(tmp_path) == (None, None)
    monkeypatch.setenv(machine.COMMIT_VARIABLE, "ee62368")
    assert machine.git_state(tmp_path) == ("ee62368", None)
    assert machine.git_state(ROOT)[0] != "ee62368"  # a real checkout's own HEAD wins


def test_the_readme_commands_without_a_name_stop_resume_and_save_latest_quietly(project, capsys):
    """`python train.py` as a process, Ctrl-C, then `python train.py --resume` (in-process, on the same
    folders), as the README gives them; the process runs in a copy of the scripts, test images cut to 200."""
    folder = sandbox.make(project)  # its models/ and screenshots/ are the in-process run's too
    best = folder / "models" / "latest_acc.h5"
    returncode, stdout, stderr = sandbox.stop_after_first_checkpoint(folder, signal.SIGINT, "--epochs", "30", *TINY[2:])
    assert returncode == 130, stderr[-2000:]
    assert "Continue with: python train.py --resume\n" in stdout and "Traceback" not in stderr
    for noise in ("cuInit", "cuda drivers", "cpu_feature_guard", "oneDNN", "absl::InitializeLog"):
        assert noise not in stderr, stderr
    assert keras.models.load_model(best).count_params() == 3_458_382
    assert not (folder / "models" / "latest.h5").exists()
    done = json.loads((folder / "models" / "latest_resume.json").read_text())["epochs_done"]
    run("--resume", "--epochs", str(done + 1))
    out = capsys.readouterr().out
    assert f"Resuming latest after epoch {done} of {done + 1}" in out
    history = np.genfromtxt(folder / "models" / "latest.csv", delimiter=",", names=True)
    assert history["epoch"].tolist() == list(range(done + 1))
    record = info("latest")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert record["git_commit"] == head and isinstance(record["git_dirty"], bool)
    assert record["model"] == "latest" and record["epochs_done"] == done + 1 and record["limit"] == 40
    assert record["device"] and record["keras"] == keras.__version__ and record["train_seconds"] > 0
    assert record["preloaded"] == (os.environ.get("LD_PRELOAD") or None)
    assert f"Test accuracy: {record['test_accuracy']:.4f}" in out
    assert keras.models.load_model(folder / "models" / "latest.h5").count_params() == 3_458_382


def test_sigterm_stops_a_run_as_ctrl_c_does_with_status_143(project, capsys):
    """Schedulers (Slurm, Kubernetes, `timeout`) stop a job with SIGTERM: the run stops between steps,
    keeps its state, says how to continue and exits 143; --resume then goes on."""
    folder = sandbox.make(project)
    returncode, stdout, stderr = sandbox.stop_after_first_checkpoint(folder, signal.SIGTERM, "--epochs", "30",
                                                                     *TINY[2:], "--name", "term", name="term")
    assert returncode == 143, stderr[-2000:]
    assert "Interrupted (SIGTERM) after epoch" in stdout and "Traceback" not in stderr
    assert "Continue with: python train.py --resume --name term\n" in stdout
    done = json.loads((folder / "models" / "term_resume.json").read_text())["epochs_done"]
    assert done >= 1 and not list((folder / "models").glob("*.tmp*"))
    run("--resume", "--epochs", str(done + 1), "--name", "term")
    assert f"Resuming term after epoch {done} of {done + 1}" in capsys.readouterr().out


def test_a_full_disk_stops_a_run_with_one_line_that_says_how_to_continue(project, monkeypatch, capsys):
    """The resume state of epoch 2 does not fit: one line with the file, about what it needs, the epoch
    the run is saved at and the command that continues it; epoch 1's state stays whole and resumes."""
    real_save = keras.Model.save
    saves = []

    def save(model, path, *args, **kwargs):
        if str(path).endswith(".keras"):
            saves.append(path)
            if len(saves) == 2:
                with open(path, "wb") as f:
                    f.write(b"\0" * 200_000)
                raise OSError(28, "No space left on device")
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save)
    with pytest.raises(SystemExit) as exit_:
        run("--epochs", "3", *TINY[2:], "--name", "full")
    resume = models.MODELS_DIR / "full_resume.keras"
    assert exit_.value.code.startswith(f"error: no space left on the disk for {resume} (it needs at least ")
    assert exit_.value.code.endswith("MB); the run is saved at epoch 1 of 3: free some space, then continue with: "
                                     "python train.py --resume --name full")
    assert not [p for p in models.MODELS_DIR.iterdir() if p.name.startswith(".full_resume")]
    exit_ = None  # the traceback holds the run's frame, and with it the run's lock
    gc.collect()
    monkeypatch.setattr(keras.Model, "save", real_save)
    capsys.readouterr()
    run("--resume", "--name", "full")
    assert "Resuming full after epoch 1 of 3" in capsys.readouterr().out
    assert info("full")["epochs_done"] == 3
