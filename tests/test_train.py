"""train.py: its pure parts in-process, whole runs on small subsets, and the paths a user takes.

Runs happen in-process where they can (train.main with models/ and screenshots/ moved to a
temporary folder), and as a subprocess where the process itself matters: `python train.py` as the
README gives it, stopped with Ctrl-C, and what it prints at start-up. Runs under JAX are in
test_distribute.py.
"""

import fcntl
import functools
import gc
import json
import math
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
import machine
import models
import sandbox
import train

ROOT = Path(__file__).resolve().parent.parent
# Whole batches only (a smaller last batch would cost another trace of the training step).
TINY = ["--epochs", "1", "--limit", "40", "--batch-size", "51"]  # 34 train (2 steps of 51 with the copies), 6 validate
SMALL = ["--limit", "60", "--batch-size", "51"]  # 51 train (3 steps of 51 with the copies), 9 validate


# ---- Pure parts ----

def test_flags_override_the_recipe_and_the_rest_comes_from_it():
    args, settings = train.parse_args(["--recipe", "fast", "--lr", "0.01", "--dropout", "full_2"])
    assert settings == {**train.RECIPES["fast"], "lr": 0.01, "dropout": "full_2"}
    args, settings = train.parse_args([])
    assert settings == train.RECIPES["original"] and args.seed == train.SEED and args.name is None
    assert settings["erase_fill"] == "box" and train.RECIPES["fast"]["erase_fill"] == "pixel"
    assert settings["erase_placement"] == "original" and train.RECIPES["fast"]["erase_placement"] == "paper"


def test_a_run_recorded_before_erase_placement_existed_keeps_the_papers_placement():
    """Such runs (full_1 and full_2 among them) placed their boxes as the paper says; their
    --resume must go on doing so."""
    recorded = {key: value for key, value in train.RECIPES["original"].items() if key != "erase_placement"}
    assert train.erasing_of(recorded) == {"fill": "box", "placement": "paper"}
    assert train.erasing_of(train.RECIPES["original"]) == {"fill": "box", "placement": "original"}


def test_every_setting_has_a_flag_with_its_defaults_in_the_help(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, default in train.RECIPES["original"].items():
        assert f"--{key.replace('_', '-')}" in text
        assert f"(default: {default}; fast: {train.RECIPES['fast'][key]})" in text
    assert "--erase-fill {pixel,box}" in text and "--dropout {full_1,full_2,fast}" in text
    assert "--erase-placement {paper,original}" in text


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "--lr must be a number"),
    (["--lr", "-1"], "--lr must be above 0"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--minutes", "nan"], "--minutes must be a number"),
    (["--minutes", "inf"], "--minutes must be a number"),
    (["--minutes", "-5"], "--minutes must be above 0"),
    (["--minutes", "5", "--epochs", "3"], "goes without --epochs"),
    (["--epochs", "0"], "--epochs and --batch-size must be at least 1"),
    (["--batch-size", "0"], "--epochs and --batch-size must be at least 1"),
    (["--weight-decay", "-0.1"], "--weight-decay at least 0"),
    (["--label-smoothing", "1"], "--label-smoothing must be at least 0 and below 1"),
    (["--limit", "5"], "--limit must be between 20"),
    (["--limit", "70000"], "--limit must be between 20"),
    (["--name", "x" * 250], "--name must be 1-64 letters"),
    (["--name", "../escape"], "--name must be 1-64 letters"),
    (["--name", "mine_acc"], "not end in _acc"),
    (["--erase-fill", "noise"], "invalid choice"),
])
def test_nonsense_is_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    settings = dict(train.RECIPES["fast"], epochs=10, warmup_epochs=1.0, lr=2e-3)
    schedule = train.learning_rate(settings, steps_per_epoch=100)
    lr = lambda step: float(schedule(step))  # noqa: E731
    assert lr(0) == pytest.approx(2e-4) and lr(100) == pytest.approx(2e-3)
    assert lr(50) == pytest.approx(1.1e-3)  # linear warm-up
    assert lr(550) == pytest.approx(1e-3, rel=1e-3)  # half way through the decay
    assert lr(1000) == pytest.approx(0, abs=1e-9)
    assert train.learning_rate(train.RECIPES["original"], 100) == 1e-3  # constant: a float


def test_the_epoch_budget_leaves_time_for_the_final_evaluation():
    # 1,000 images/s training, 4,000/s predicting: an epoch of 51,000 + 9,000 is 51 + 2.25 + 1 s.
    epochs, seconds = train.epoch_budget(60, 1000, 4000, 51000, 9000, 10000)
    assert seconds == pytest.approx(54.25)
    assert epochs == int((3600 - 2 * 19000 / 4000) // 54.25) == 66
    assert train.epoch_budget(0.01, 1000, 4000, 51000, 9000, 10000)[0] == 1  # never less than one


def test_the_time_left_is_told_at_this_sessions_pace_without_its_first_epoch():
    assert train.time_left(99, [960.0]) == "99 epochs to go: about 26 h 24 min at this pace"
    assert train.time_left(2, [40.0, 700.0, 800.0]) == "2 epochs to go: about 25 min at this pace"
    assert train.time_left(1, [9.0, 3.0]) == "1 epoch to go: about 3 s at this pace"


def test_batches_cover_each_epoch_once_seeded_by_seed_and_epoch():
    x = np.arange(1000, dtype=np.uint8).reshape(-1, 1, 1).repeat(28, 1).repeat(28, 2)[:1000]
    y = np.arange(1000) % 10
    settings = dict(train.RECIPES["original"], batch_size=300)
    x_images, y_images = train.training_images(x, y, settings, seed=3)
    assert len(x_images) == 3000 and np.array_equal(x_images[:1000], x)  # originals, then 2 copies
    stream = train.batches(x_images, y_images, settings, seed=3, first_epoch=0)
    steps = math.ceil(3000 / 300)
    epoch0 = [next(stream) for _ in range(steps)]
    epoch1 = [next(stream) for _ in range(steps)]
    labels0 = np.concatenate([b[1] for b in epoch0])
    assert sorted(labels0.tolist()) == sorted(y_images.tolist())  # every image once
    assert epoch0[0][0].shape == (300, 28, 28, 1) and epoch0[0][0].dtype == np.float32
    assert not np.array_equal(labels0, np.concatenate([b[1] for b in epoch1]))  # reshuffled
    # A stream started at epoch 1 (a resumed run) gives what the unbroken stream gave.
    resumed = train.batches(x_images, y_images, settings, seed=3, first_epoch=1)
    for expected in epoch1:
        got = next(resumed)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


# ---- Whole runs, in-process ----

@pytest.fixture
def project(tmp_path, monkeypatch):
    """models/ and screenshots/ in a temporary folder; the data is the project's, with the first
    200 test images standing for the 10,000 (these runs test what is written, not accuracy)."""
    load_data = data.load_data
    monkeypatch.setattr(data, "load_data", lambda kind: tuple(a[:200] if kind == "t10k" else a
                                                              for a in load_data(kind)))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(train, "SCREENSHOTS_DIR", tmp_path / "screenshots")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    yield tmp_path
    keras.mixed_precision.set_global_policy("float32")


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


def test_a_resumed_run_is_the_unbroken_run_and_resume_finds_its_own_run(project):
    run("--epochs", "2", *SMALL, "--name", "whole")
    run("--epochs", "1", *SMALL, "--name", "split")
    after_1 = train.run_files("split")["resume_info"].read_text()
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
    train.claim(args)[1].close()
    models.write_json(train.run_files("C")["resume_info"],
                      {"command": "...", "recipe": "original", "settings": settings, "seed": 9, "limit": 40,
                       "all_data": False, "epochs_done": 0, "train_seconds": 0.0})
    args, _ = train.parse_args(["--resume", "--name", "C"])
    files, lock = train.claim(args)
    resumed, resumed_settings, extended = train.begin(args, settings, files, "python train.py --resume --name C")
    lock.close()
    assert (args.seed, args.limit, resumed_settings, extended) == (9, 40, settings, False)
    assert resumed["epochs_done"] == 0 and resumed["resumed_with"] == ["python train.py --resume --name C"]
    assert "nothing of 'D' to resume" in refused("--resume", "--name", "D")
    # split's model after epoch 2 beside its JSON of epoch 1 (one put back without the other, or a
    # stop between the two writes): refused, nothing changed, rather than epoch 2 trained twice.
    files = train.run_files("split")
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
    files, lock = train.claim(args)
    for stale in ("best", "csv", "resume"):
        files[stale].write_text("earlier")
    train.begin(args, settings, files, "python train.py --name mine --overwrite")
    lock.close()
    assert not any(files[stale].exists() for stale in ("best", "csv", "resume"))
    assert json.loads(files["resume_info"].read_text())["seed"] == 2
    # A damaged resume state is one line.
    files = train.run_files("latest")
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
    files = train.run_files("latest")
    files["resume_info"].parent.mkdir(parents=True)

    def start(*argv, answer=None):
        monkeypatch.setattr(sys.stdin, "isatty", lambda: answer is not None, raising=False)
        monkeypatch.setattr("builtins.input", lambda question: print(question) or answer)
        args, _ = train.parse_args(["--name", "latest", *argv])
        _, lock = train.claim(args)
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
    files = train.run_files("busy")
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


def test_bfloat16_on_a_cpu_that_emulates_it_is_run_as_asked_with_a_warning(project, monkeypatch, capsys):
    """--mixed-precision (and --resume of such a run) on a CPU without AVX512_BF16 or AMX: bfloat16 as
    asked, and one line that says it is emulated and what to do; "auto" picks float32 there."""
    assert machine.cpu_emulates_bf16({"avx2", "fma"}) and not machine.cpu_emulates_bf16(set())
    assert not machine.cpu_emulates_bf16({"avx2", "avx512_bf16"}) and not machine.cpu_emulates_bf16({"amx_bf16"})
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"sse2", "avx2", "fma"})
    run("--mixed-precision", "--epochs", "1", *TINY[2:], "--name", "emulated")
    assert info("emulated")["dtype_policy"] == "mixed_bfloat16"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "bfloat16 is emulated" in line]
    assert warnings == [train.bf16_warning(resuming=False)] and "leave out --mixed-precision" in warnings[0]
    run("--resume", "--epochs", "2", "--name", "emulated")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "bfloat16 is emulated" in line]
    assert warnings == [train.bf16_warning(resuming=True)] and "continue it on a CPU with" in warnings[0]
    assert train.set_precision("auto") == "float32"
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert train.set_precision("auto") == "mixed_bfloat16"


def test_all_data_and_minutes(project, monkeypatch):
    # The timing probe's size is not what is tested here: 2 steps instead of 8.
    monkeypatch.setattr(train, "time_this_machine", functools.partial(train.time_this_machine, probe_steps=2))
    run("--recipe", "fast", "--all-data", "--minutes", "0.05", *TINY[2:], "--name", "everything")
    record = info("everything")
    assert record["all_data"] is True and record["val_accuracy"] is None and "best_epoch" not in record
    assert not (project / "models" / "everything_acc.h5").exists()
    history = np.genfromtxt(project / "models" / "everything.csv", delimiter=",", names=True)
    assert np.isnan(history["val_accuracy"]).all()  # Keras's CSVLogger writes NA
    assert record["epochs_done"] == record["settings"]["epochs"] >= 1
    assert record["timed"]["train_images_per_s"] > 0 and record["timed"]["epoch_seconds"] > 0


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


def test_no_callback_of_train_py_waits_for_each_steps_loss():
    """Keras runs batch-end hooks in a thread under JAX only when no callback defines one of its own;
    one that does makes every step wait for the last step's loss (a GPU idles between steps)."""
    callbacks = [train.CtrlC(), train.DropoutStreams(1), train.Checkpoints({}, {}, None)]
    for callback in callbacks:
        for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end"):
            assert getattr(type(callback), hook) is getattr(keras.callbacks.Callback, hook), (callback, hook)


def test_a_copy_without_git_records_the_commit_its_sender_names(tmp_path, monkeypatch):
    """Scripts copied to another machine (a GPU box) without .git: the record keeps the commit
    named by FASHION_GIT_COMMIT, and says nothing about uncommitted changes it cannot see."""
    monkeypatch.delenv(machine.COMMIT_VARIABLE, raising=False)
    assert machine.git_state(tmp_path) == (None, None)
    monkeypatch.setenv(machine.COMMIT_VARIABLE, "ee62368")
    assert machine.git_state(tmp_path) == ("ee62368", None)
    assert machine.git_state(ROOT)[0] != "ee62368"  # a real checkout's own HEAD wins


# ---- The README's commands: a process to stop with Ctrl-C, then --resume ----

def test_the_readme_commands_without_a_name_stop_resume_and_save_latest_quietly(project, capsys):
    """`python train.py` as a process, Ctrl-C, then `python train.py --resume` (in-process, on the same
    folders), as the README gives them; the process runs in a copy of the scripts, test images cut to 200."""
    folder = sandbox.make(project)  # its models/ and screenshots/ are the in-process run's too
    best = folder / "models" / "latest_acc.h5"
    process = sandbox.start(folder, "--epochs", "30", *TINY[2:])
    deadline = time.time() + 120
    while not best.exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
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
