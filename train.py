"""Train the CNN of models.py on Fashion-MNIST.

    python train.py                                  # the original write-up's recipe (100 epochs, 153,000 images)
    python train.py --dropout full_2 --name full_2   # its second run
    python train.py --recipe fast --name mine        # the one-hour recipe (on a bfloat16 CPU)
    python train.py --epochs 1 --limit 2000 --name smoke   # a quick check
    python train.py --resume --name mine             # continue a stopped run
    python train.py --distribute --name mine         # one model on every GPU (or device) of this machine

Several machines (JAX): the same command on each, with KERAS_BACKEND=jax and the three
KERAS_DISTRIBUTION_* variables (README, "More than one device or machine"; distribute.py). --batch-size
is the global batch whatever the number of devices; process 0 writes the files and prints the epochs.

A run NAME (default "latest") owns its files in models/: NAME.h5 and NAME.json at the end, the
best validation checkpoint NAME_acc.h5 (+ .json) after every epoch that improves it, the history
NAME.csv, and the resume state NAME_resume.keras (+ .json); its history plot goes to
screenshots/NAME/. An existing model is never replaced unless --overwrite says so ("latest",
the scratch name, excepted: a new run replaces it, but asks first at a terminal, and says so
otherwise, when it replaces a stopped run), and two runs of one name cannot run at once.
"""

import argparse
import contextlib
import fcntl
import gc
import itertools
import json
import math
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

import machine

machine.start_backend()  # KERAS_BACKEND (default tensorflow), without the backend's start-up notices

import keras  # noqa: E402

import data  # noqa: E402
import distribute  # noqa: E402
import erasing  # noqa: E402
import models  # noqa: E402

# The recipes. Each key is also a flag (--batch-size for batch_size, ...) that overrides it.
RECIPES = {
    "original": dict(           # the original write-up's recipe, as its code ran it
        epochs=100,             # passes over the training images
        batch_size=250,         # images per step (all devices together)
        optimizer="adam",       # adam, or sgd with Nesterov momentum 0.9
        lr=1e-3,                # peak learning rate
        schedule="constant",    # constant, or cosine decay to 0 after a linear warm-up
        warmup_epochs=0.0,      # epochs of linear warm-up (cosine only)
        dropout="full_1",       # a preset of models.DROPOUT_PRESETS
        augment="copies",       # copies: fixed copies made once; online: fresh flips and erasing every epoch
        augment_copies=2,       # flipped-and-erased copies per image (copies only; 0: no augmentation)
        erase_fill="box",       # box: one grey level per erased box; pixel: a value per pixel
        erase_placement="original",  # as the original's eraser: size and place redrawn until the box fits
        label_smoothing=0.0,    # 0: plain cross-entropy
        weight_decay=0.0,       # decoupled weight decay (AdamW-style); 0: none
        mixed_precision=False,  # bfloat16 on CPUs, float16 on GPUs; "auto": where the hardware has it
    ),
    # About an hour on 2 CPU cores with bfloat16 (AMD EPYC Zen 5: ~40 s an epoch).
    "fast": dict(epochs=80, batch_size=250, optimizer="adam", lr=2e-3, schedule="cosine", warmup_epochs=1.0,
                 dropout="fast", augment="online", augment_copies=0, erase_fill="pixel", erase_placement="paper",
                 label_smoothing=0.0, weight_decay=0.0, mixed_precision="auto"),
}
CHOICES = {"optimizer": ("adam", "sgd"), "schedule": ("constant", "cosine"), "dropout": tuple(models.DROPOUT_PRESETS),
           "augment": ("copies", "online"), "erase_fill": erasing.FILLS, "erase_placement": erasing.PLACEMENTS}
HELP = {
    "epochs": "passes over the training images", "batch_size": "images per step",
    "optimizer": "optimizer (sgd: Nesterov momentum 0.9)", "lr": "peak learning rate",
    "schedule": "learning-rate schedule (cosine: warm-up, then decay to 0)",
    "warmup_epochs": "linear warm-up epochs (cosine only)",
    "dropout": "dropout preset (full_1: 0.3, 0.4, 0.5, 0.5; full_2: 0.2, 0.3, 0.5, 0.35; fast: 0.25, 0.25, 0.5, 0.5)",
    "augment": "fixed copies made once, or fresh flips and erasing every epoch",
    "augment_copies": "augmented copies per image (copies only; 0: none)",
    "erase_fill": "Random Erasing fill: one grey level per box, or one value per pixel",
    "erase_placement": "Random Erasing box: as the paper (size redrawn, then a place that fits), or as the "
                       "original write-up's eraser (size and place redrawn together until it fits: fewer large "
                       "boxes)",
    "label_smoothing": "label smoothing", "weight_decay": "decoupled weight decay",
    "mixed_precision": "bfloat16 on CPUs, float16 on GPUs",
}
SEED = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SCRATCH_NAME = "latest"  # the default name; a new run replaces it (a stopped one: see claim)
SCREENSHOTS_DIR = Path(__file__).resolve().parent / "screenshots"


def parse_args(argv=None):
    """(args, settings): the recipe's settings with the flags given on the command line applied."""
    parser = argparse.ArgumentParser(description="Train the Fashion-MNIST CNN.")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="original",
                        help="settings to start from; the flags below override them (default: original)")
    for key, default in RECIPES["original"].items():
        flag = "--" + key.replace("_", "-")
        shown = f"(default: {default}; fast: {RECIPES['fast'][key]})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{HELP[key]} {shown}")
        else:
            parser.add_argument(flag, type=type(default), choices=CHOICES.get(key), help=f"{HELP[key]} {shown}")
    parser.add_argument("--minutes", type=float, help="instead of --epochs: time a few steps here, then train as "
                                                      "many epochs as fit in this many minutes (default: off)")
    parser.add_argument("--all-data", action="store_true",
                        help="train on all 60,000 images and validate on none, for the final model of a recipe "
                             "already chosen on validation (default: off)")
    parser.add_argument("--limit", type=int, help="use only the first N training images (default: all 60,000)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    parser.add_argument("--name", help=f"the run's name: models/NAME.h5 and its files (default: asked at a "
                                       f"terminal, else {SCRATCH_NAME})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model of that name")
    parser.add_argument("--resume", action="store_true", help="continue the stopped run NAME")
    parser.add_argument("--distribute", action="store_true",
                        help="train one model on every device the backend sees, and with the KERAS_DISTRIBUTION_* "
                             "variables on several processes or machines (JAX) (default: off)")
    parser.add_argument("--show", action="store_true", help="open the history plot in a window at the end")
    parser.add_argument("--verbose", action="store_true", help="keep the backend's start-up messages")
    args = parser.parse_args(argv)
    settings = dict(RECIPES[args.recipe])
    settings.update({key: getattr(args, key) for key in settings if getattr(args, key) is not None})
    problem = check_settings(settings, args)
    if problem:
        parser.error(problem)
    return args, settings


def check_settings(settings, args):
    """The first setting that makes no sense, as a sentence; None when all are fine."""
    finite = {key: value for key, value in [*settings.items(), ("minutes", args.minutes)]
              if isinstance(value, float)}
    for key, value in finite.items():
        if not math.isfinite(value):
            return f"--{key.replace('_', '-')} must be a number, not {value}"
    if settings["epochs"] < 1 or settings["batch_size"] < 1 or settings["augment_copies"] < 0:
        return "--epochs and --batch-size must be at least 1, --augment-copies at least 0"
    if settings["lr"] <= 0 or settings["warmup_epochs"] < 0 or settings["weight_decay"] < 0:
        return "--lr must be above 0, --warmup-epochs and --weight-decay at least 0"
    if not 0 <= settings["label_smoothing"] < 1:
        return "--label-smoothing must be at least 0 and below 1"
    if args.minutes is not None and (args.epochs is not None or args.resume or args.minutes <= 0):
        return "--minutes must be above 0, and goes without --epochs and --resume"
    if args.limit is not None and not 20 <= args.limit <= 60000:
        return "--limit must be between 20 (there must be images to validate on) and 60000"
    if args.name is not None and (not NAME_PATTERN.fullmatch(args.name) or args.name.endswith(("_acc", "_resume"))):
        return ("--name must be 1-64 letters, digits, '.', '_' or '-', start with a letter or digit, "
                "and not end in _acc or _resume")
    return None


# ---- Run management: names, files, locks, resume state ----

def run_files(name):
    """The files a run owns in models/."""
    folder = models.MODELS_DIR
    return dict(model=folder / f"{name}.h5", info=folder / f"{name}.json", best=folder / f"{name}_acc.h5",
                csv=folder / f"{name}.csv", resume=folder / f"{name}_resume.keras",
                resume_info=folder / f"{name}_resume.json", lock=folder / f".{name}.lock",
                plots=SCREENSHOTS_DIR / name)


def ask(question, default):
    """Answer of the user at a terminal; `default` when nobody is there to answer."""
    if not sys.stdin.isatty():
        return default
    try:
        return input(question).strip() or default
    except EOFError:
        return default


def agrees_to_replace(what):
    """Whether the user at a terminal answers yes to replacing `what`; no is the default."""
    return ask(f"{what}: replace it? [y/N] ", "n").lower() in ("y", "yes")


def claim(args):
    """The run's files, checked before any work: the name is free (or may be replaced), the
    folders are writable, and no other train.py runs under this name. Exits with one line if not."""
    if args.name is None:
        args.name = ask(f"Name for this run [{SCRATCH_NAME}]: ", SCRATCH_NAME)
        if not NAME_PATTERN.fullmatch(args.name):
            sys.exit(f"error: {args.name!r} is not a usable name (letters, digits, '.', '_' or '-')")
    files = run_files(args.name)
    for folder in (models.MODELS_DIR, files["plots"]):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            data.write_text(folder / ".write-test", "")
            (folder / ".write-test").unlink()
        except OSError as e:
            sys.exit(f"error: cannot write in {folder} ({e.strerror}); make it writable or free some space")
    lock = open(files["lock"], "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process ends, however it ends
    except BlockingIOError:
        sys.exit(f"error: another train.py is running as {args.name!r}; wait for it, or choose another --name")
    try:
        resume = "" if args.name == SCRATCH_NAME else f" --name {args.name}"
        if args.resume:
            if not files["resume_info"].exists():
                sys.exit(f"error: nothing of {args.name!r} to resume: {files['resume_info'].name} not found "
                         f"(a run writes it when it starts); start it with: python train.py{resume}")
        elif args.name != SCRATCH_NAME and not args.overwrite:
            existing = models.model_path(args.name)
            if existing.exists():
                what = f"{existing} exists"
            elif files["resume_info"].exists():
                what = f"a run named {args.name!r} was stopped (continue it with: python train.py --resume{resume})"
            else:
                what = None
            if what and not agrees_to_replace(what):
                sys.exit(f"error: {what}; choose another --name, or add --overwrite to replace it")
        elif not args.overwrite and (stopped := stopped_at(files)):
            # The scratch name is replaced without asking, except a stopped run's state: hours, maybe.
            what = f"the run {SCRATCH_NAME!r} was stopped after epoch {stopped[0]} of {stopped[1]}"
            if not sys.stdin.isatty():
                print(f"note: {what}; this new run replaces it (to continue it instead: python train.py --resume)",
                      file=sys.stderr)
            elif not agrees_to_replace(what):
                sys.exit(f"error: {what} and is kept; continue it with: python train.py --resume, "
                         f"or choose another --name, or add --overwrite to replace it")
    except SystemExit:
        lock.close()
        raise
    return files, lock


def stopped_at(files):
    """(epochs done, epochs) of a run stopped before its end, with at least one epoch to keep;
    None if there is none (or its record is unreadable: nothing could resume from it anyway)."""
    try:
        info = json.loads(files["resume_info"].read_text())
        done, epochs = int(info["epochs_done"]), int(info["settings"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (done, epochs) if 0 < done < epochs else None


def read_resume_state(files):
    """The run_info of a stopped run, or exit with one line when its state is damaged."""
    try:
        info = json.loads(files["resume_info"].read_text())
        if not isinstance(info, dict) or not isinstance(info.get("settings"), dict):
            raise ValueError("not a run's record")
        return info
    except (OSError, ValueError) as e:
        sys.exit(f"error: the resume state {files['resume_info']} is damaged ({e}); start the run again with "
                 f"--overwrite")


def load_resume_model(files):
    try:
        return keras.models.load_model(files["resume"])
    except Exception as e:  # Keras raises many kinds for a truncated or foreign file
        sys.exit(f"error: the resume state {files['resume']} is damaged ({str(e).splitlines()[0][:120] or e!r}); "
                 f"the best checkpoint so far is {files['best'].name}; start the run again with --overwrite")


def check_resume_pair(model, epochs_done, steps, files, lead=True):
    """Exit with one line, changing nothing, when the resume state's model and its JSON come from
    different saves (copied or restored one without the other, or a stop between the two writes):
    the optimizer's step count tells how many epochs the model has trained. Rounded, because a
    float16 run's loss scaling skips a few steps whose gradients overflowed, far fewer than an epoch."""
    trained = round(int(model.optimizer.iterations) / steps)
    if trained == epochs_done:
        return
    if not lead:
        sys.exit(1)  # process 0 says why
    sys.exit(f"error: {files['resume'].name} has trained {trained} epochs but {files['resume_info'].name} says "
             f"{epochs_done}: the two come from different saves; put back both files from one save "
             f"({files['csv'].name} has a row per epoch done)")


def trim_history(csv_path, epochs_done):
    """Drop rows of epochs after `epochs_done` from the CSV (written before a stop saved their state).
    Byte for byte: the rows kept keep Keras's line ends (CRLF), as the rows the resumed run adds."""
    if not csv_path.exists():
        return
    lines = csv_path.read_bytes().splitlines(keepends=True)
    data.atomic_write(csv_path, lambda f: f.write(b"".join(lines[:1 + epochs_done])))


# ---- Training pieces ----

def set_precision(mixed):
    """Set Keras's global dtype policy: float32, or mixed bfloat16 (CPU) / float16 (GPU).

    mixed: True, False, or "auto" (mixed where the hardware is faster with it).
    """
    on_gpu = bool(machine.accelerators())
    if mixed == "auto":
        mixed = on_gpu or machine.cpu_has_bf16()
    policy = ("mixed_float16" if on_gpu else "mixed_bfloat16") if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def bf16_warning(resuming):
    """The line a bfloat16 run prints on a CPU that emulates bfloat16 (README, 'Speed': an epoch 11x slower
    than float32 on an AMD EPYC with AVX2), with what to do instead."""
    advice = ("this run was started in bfloat16 and keeps it: continue it on a CPU with AVX512_BF16 or AMX"
              if resuming else "leave out --mixed-precision here")
    return (f"warning: this CPU has no bfloat16 instructions (AVX512_BF16 or AMX), so bfloat16 is emulated, "
            f"several times slower than float32 (README, 'Speed'); {advice}")


def erasing_of(settings):
    """Random Erasing's options in a run's settings. A run recorded before erase_placement existed
    placed its boxes as the paper says."""
    return dict(fill=settings["erase_fill"], placement=settings.get("erase_placement", "paper"))


def training_images(x, y, settings, seed):
    """The images an epoch goes through: with "copies", the originals and `augment_copies`
    flipped-and-erased copies of each, made once (51,000 images give 153,000); with "online",
    the originals, flipped and erased anew by batches() every epoch."""
    if settings["augment"] == "copies":
        return erasing.augment(x, y, settings["augment_copies"], rng=seed, **erasing_of(settings))
    return x, y


def feed_plan(n_images, batch_size, replicas=1, process=0, processes=1):
    """(positions, sizes): the places in each shuffled epoch that this process feeds to the model, and
    the sizes of its batches. The global batches are of batch_size; the last one is cut to a multiple
    of the replica count (every device takes as many images; at most replicas - 1 are left out), and
    each of the processes feeds its own slice of every global batch."""
    positions, sizes = [], []
    for start in range(0, n_images, batch_size):
        share = min(batch_size, n_images - start) // replicas * replicas // processes
        if share:
            positions.append(np.arange(start + process * share, start + (process + 1) * share))
            sizes.append(share)
    return (np.concatenate(positions) if positions else np.zeros(0, int)), sizes


def batches(x, y, settings, seed, first_epoch, replicas=1, process=0, processes=1):
    """(images, labels) batches for the model, epoch after epoch without end, from first_epoch on.

    Each epoch is shuffled (and, online, augmented) by its own generator, seeded by (seed, epoch),
    so a resumed run sees exactly the batches the unbroken run would have seen. One stream for
    the whole run (fit's steps_per_epoch marks the epochs), so no batch is drawn for the wrong
    epoch however far ahead the backend reads.

    With --distribute the batches follow feed_plan. One process, on any number of devices, feeds
    every global batch and augments as above: the same images as on one device. Of several
    processes, each shuffles alike and feeds its own slice of every batch, flipped and erased
    (online) from its own stream, seeded by (seed, epoch, process), so no two slices are
    augmented alike.
    """
    positions, sizes = feed_plan(len(x), settings["batch_size"], replicas, process, processes)
    online, erase = settings["augment"] == "online", erasing_of(settings)
    for epoch in itertools.count(first_epoch):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(x))
        if online and processes == 1:
            x_epoch = erasing.flip_and_erase(x[order], rng, **erase)
            x_epoch = x_epoch[positions] if len(positions) < len(x) else x_epoch
        else:
            x_epoch = x[order[positions]]
            if online:
                x_epoch = erasing.flip_and_erase(x_epoch, np.random.default_rng([seed, epoch, process]), **erase)
        y_epoch = y[order[positions]]
        for start, stop in itertools.pairwise(np.cumsum([0, *sizes])):
            yield models.prepare(x_epoch[start:stop]), y_epoch[start:stop]


def learning_rate(settings, steps_per_epoch):
    """A float, or a warm-up + cosine decay schedule over all of the run's epochs."""
    if settings["schedule"] == "constant":
        return settings["lr"]
    total = settings["epochs"] * steps_per_epoch
    warmup = int(settings["warmup_epochs"] * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=settings["lr"] * 0.1 if warmup else settings["lr"],
        decay_steps=max(total - warmup, 1), warmup_target=settings["lr"] if warmup else None,
        warmup_steps=warmup, alpha=0.0)


def build_model(settings, steps_per_epoch):
    return models.build_cnn(settings["dropout"], settings["optimizer"], learning_rate(settings, steps_per_epoch),
                            label_smoothing=settings["label_smoothing"], weight_decay=settings["weight_decay"] or None)


def epoch_budget(minutes, train_rate, predict_rate, n_train, n_val, n_test):
    """(epochs, seconds an epoch): how many epochs fit in `minutes` at these rates (images/s),
    leaving time for the final evaluation of the model and of the best checkpoint."""
    epoch_seconds = n_train / train_rate + n_val / predict_rate + 1.0  # + saving the checkpoints
    final_seconds = 2 * (n_val + n_test) / predict_rate
    return max(1, int((minutes * 60 - final_seconds) // epoch_seconds)), epoch_seconds


def time_this_machine(settings, x_train, probe_steps=8, scope=contextlib.nullcontext, processes=1):
    """(training, prediction) images per second here, timed on a throwaway copy of the model:
    one untimed pass compiles, a second of `probe_steps` full batches is timed. Under --distribute
    the copy is built in `scope`, and each of the processes feeds its share of every batch."""
    batch = settings["batch_size"] // processes
    images = models.prepare(np.resize(x_train, (probe_steps * batch, *x_train.shape[1:])))
    labels = np.zeros(len(images), dtype=np.int64)
    with scope():
        probe = models.build_cnn(settings["dropout"], settings["optimizer"], settings["lr"])
    predict = probe.evaluate if processes > 1 else probe.predict  # predictions would stay spread over processes
    rates = []
    for step in (lambda: probe.fit(images, labels, batch_size=batch, epochs=1, verbose=0),
                 lambda: predict(images, batch_size=batch, verbose=0)):
        step()
        start = time.perf_counter()
        step()
        rates.append(processes * len(images) / (time.perf_counter() - start))
    return tuple(rates)


class CtrlC(keras.callbacks.Callback):
    """Ctrl-C during training: stop after the current step, never inside a checkpoint save.

    Python's own KeyboardInterrupt fires wherever the interpreter happens to be, and one
    that fires inside a finalizer run by the garbage collector is printed and dropped, so
    training would go on. Here the handler only sets a flag; the callback raises
    KeyboardInterrupt between steps (and Checkpoints after its saves). A second Ctrl-C
    raises at once.

    The flag is read before each step, not after: a callback with a batch-end hook makes Keras
    wait for every step's loss before the next step starts, which under JAX (whose backend can
    run such hooks in a thread) keeps a GPU idle between steps.
    """

    def __init__(self):
        super().__init__()
        self.pressed = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def check(self):
        if self.pressed:
            raise KeyboardInterrupt

    def on_train_batch_begin(self, batch, logs=None):
        self.check()

    def on_test_batch_begin(self, batch, logs=None):
        self.check()


class DropoutStreams(keras.callbacks.Callback):
    """At the start of every epoch, points each dropout layer's random stream at (seed, layer,
    epoch): a saved model keeps neither the streams' seeds nor their positions, and a resumed run
    must draw the masks the unbroken run would have drawn."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        for index, layer in enumerate(self.model.layers):
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                layer_seed = np.random.default_rng([self.seed, index]).integers(2**31)
                generator.state.assign(np.array([layer_seed, epoch << 20], dtype=generator.state.dtype))


class Checkpoints(keras.callbacks.Callback):
    """After every epoch: the best validation checkpoint (when it improves), then the resume state.

    Runs after the CSVLogger, so a stop between the two leaves a history row that the resume
    state does not cover; --resume trims it.
    """

    def __init__(self, files, run_info, ctrl_c):
        super().__init__()
        self.files, self.run_info, self.ctrl_c = files, run_info, ctrl_c
        self.best = run_info.get("best_val_accuracy", -1.0)
        self.session_seconds = []  # this session's epochs: the pace of this machine, now

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        lines = []
        val_accuracy = float((logs or {}).get("val_accuracy", float("nan")))
        if val_accuracy > self.best:
            self.best = val_accuracy
            self.run_info.update(best_val_accuracy=val_accuracy, best_epoch=epoch + 1)
            distribute.save(self.model, self.files["best"], include_optimizer=False)
            lines.append(f"Epoch {epoch + 1}: val_accuracy improved to {val_accuracy:.4f}, saved {self.files['best'].name}")
        seconds = time.perf_counter() - self.epoch_start
        self.session_seconds.append(seconds)
        self.run_info.update(epochs_done=epoch + 1, train_seconds=self.run_info["train_seconds"] + seconds)
        distribute.save(self.model, self.files["resume"])
        models.write_json(self.files["resume_info"], self.run_info)
        left = self.params["epochs"] - (epoch + 1)
        if left:
            lines.append(time_left(left, self.session_seconds))
        if lines:  # on a line of their own: in a terminal, Keras's progress bar has not ended its line yet
            print("\n" + "\n".join(lines))
        self.ctrl_c.check()


def time_left(epochs_left, session_seconds):
    """The line after an epoch: how long the epochs left take at this session's pace (the first
    epoch of a session, which builds the model's functions, counts only while it is the only one)."""
    pace = session_seconds[1:] or session_seconds
    seconds = round(epochs_left * sum(pace) / len(pace))
    hours, minutes = divmod(round(seconds / 60), 60)
    remaining = f"{hours} h {minutes} min" if hours else f"{minutes} min" if minutes else f"{seconds} s"
    return f"{epochs_left} epoch{'s' * (epochs_left > 1)} to go: about {remaining} at this pace"


def record(model, name, run_info, epochs, x_val, y_val, x_test, y_test):
    """Evaluate a saved model on validation and test, write its JSON beside it, print its lines;
    returns the JSON's content."""
    val = models.scores(models.predict(model, x_val), y_val) if len(x_val) else (None, None)
    test = models.scores(models.predict(model, x_test), y_test)
    info = {**run_info, **machine.environment(), "model": name, "epochs": epochs,
            "val_accuracy": val[0], "val_loss": val[1], "test_accuracy": test[0], "test_loss": test[1]}
    models.write_json(models.MODELS_DIR / f"{name}.json", info)
    print(f"Model: {models.MODELS_DIR / name}.h5 (epoch {epochs})")
    if val[0] is not None:
        print(f"Validation accuracy: {val[0]:.4f}")
    print(f"Test accuracy: {test[0]:.4f}")
    print(f"Test loss: {test[1]:.4f}")
    return info


def plot_history(csv_path, png_path, show=False):
    """Accuracy and loss per epoch, training vs validation, from the CSV log."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.atleast_1d(np.genfromtxt(csv_path, delimiter=",", names=True))
    epochs = rows["epoch"] + 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, rows[metric], label="training")
        if not np.isnan(rows[f"val_{metric}"]).all():  # NA throughout with --all-data
            ax.plot(epochs, rows[f"val_{metric}"], label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=f"Model {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    data.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    if show:
        plt.show()
    plt.close(fig)


def begin(args, settings, files, command, replicas=1):
    """(run_info, settings, extended): a new run's record, or the stopped run's own (its settings and
    seed; only --epochs may change, `extended` says if it did). Exits with one line, before writing
    anything, when the batch does not divide among the replicas."""
    if not args.resume:
        distribute.check_batch(settings["batch_size"], replicas)
        for stale in ("best", "csv", "resume"):  # an earlier run's, if --overwrite allowed it
            files[stale].unlink(missing_ok=True)
        run_info = {"command": command, "recipe": args.recipe, "settings": settings, "seed": args.seed,
                    "limit": args.limit, "all_data": args.all_data, "epochs_done": 0, "train_seconds": 0.0}
        models.write_json(files["resume_info"], run_info)  # the run owns its resume state from the start
        return run_info, settings, False
    run_info = read_resume_state(files)
    settings, args.seed, args.limit = run_info["settings"], run_info["seed"], run_info["limit"]
    args.all_data = run_info.get("all_data", False)
    distribute.check_batch(settings["batch_size"], replicas)
    extended = args.epochs is not None and args.epochs != settings["epochs"]
    settings["epochs"] = args.epochs or settings["epochs"]
    run_info.setdefault("resumed_with", []).append(command)
    print(f"Resuming {args.name} after epoch {run_info['epochs_done']} of {settings['epochs']}")
    return run_info, settings, extended


def set_up_backend(seed, settings, run_info, devices=None):
    """Seed every generator, make TensorFlow deterministic, pick the precision; say what runs where
    (devices: the names of a --distribute run's devices)."""
    keras.utils.set_random_seed(seed)  # every process of a run alike: they start from one model
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # same seed, same CPU: same figures
    run_info["dtype_policy"] = set_precision(settings["mixed_precision"])
    print(f"Training on {machine.device_name()} (Keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{run_info['dtype_policy']})")
    if devices:
        replicas, processes = run_info["replicas"], run_info["processes"]
        print(f"Data parallel on {replicas} replica{'s' * (replicas > 1)} in {processes} "
              f"process{'es' * (processes > 1)}, {settings['batch_size'] // replicas} images each a step: "
              f"{', '.join(devices)}")
    if run_info["dtype_policy"] == "mixed_bfloat16" and machine.cpu_emulates_bf16():
        print(bf16_warning(resuming="resumed_with" in run_info), file=sys.stderr)
    gpus = machine.accelerators()
    if machine.nvidia_gpu_present() and not gpus:
        print(f"warning: this machine has an NVIDIA GPU that the {keras.backend.backend()} backend does not see; "
              f"install the CUDA build (pip install -r requirements-gpu.txt), see README, 'More than one device "
              f"or machine'", file=sys.stderr)
    if len(gpus) > 1 and not devices:
        print(f"This run trains on one of the {len(gpus)} GPUs; --distribute trains on all of them")


def load_split(args):
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)), uint8 images: the first 85 % of the
    training file trains and the last 15 % validates (--all-data: all of it trains), --limit first."""
    try:
        x, y = data.load_data("train")
        test = data.load_data("t10k")
    except data.DataError as e:
        sys.exit(f"error: {e}")
    x, y = x[:args.limit], y[:args.limit]
    if args.all_data:
        return (x, y), (x[:0], y[:0]), test
    return (*data.split_data(x, y), test)


def fit_epochs_to_minutes(minutes, settings, run_info, x_train, n_train, n_val, n_test,
                          scope=contextlib.nullcontext, processes=1):
    """--minutes: time this machine, then set settings["epochs"] to what fits (process 0's timing,
    in every process of the run)."""
    rates = time_this_machine(settings, x_train, scope=scope, processes=processes)
    train_rate, predict_rate = distribute.from_process_0([np.array(rates)])[0].tolist()
    settings["epochs"], epoch_seconds = epoch_budget(minutes, train_rate, predict_rate, n_train, n_val, n_test)
    run_info["timed"] = {"train_images_per_s": round(train_rate, 1), "epoch_seconds": round(epoch_seconds, 1)}
    print(f"Timed here: {train_rate:.0f} training images/s, about {epoch_seconds:.0f} s an epoch: "
          f"{settings['epochs']} epochs fit in {minutes:g} minutes (the same run again: --epochs {settings['epochs']})")


def resume_model(files, settings, steps, extended, epochs_done, scope=None, lead=True):
    """The stopped run's model, weights and optimizer state; a longer cosine run gets its schedule
    rebuilt over the new length (else the learning rate would sit at 0 after the old end). Under
    --distribute (a scope), every process builds the model in it and takes process 0's state."""
    rebuilt = extended and settings["schedule"] == "cosine"
    if scope is None:
        model = load_resume_model(files)
        if rebuilt:
            model.optimizer.learning_rate = learning_rate(settings, steps)
    else:
        def build():
            with scope():
                return build_model(settings, steps)  # the schedule over settings["epochs"]

        model = distribute.resume_everywhere(build, lambda: load_resume_model(files), lead,
                                             files and files["resume"])
    check_resume_pair(model, epochs_done, steps, files, lead)
    if rebuilt:
        print(f"The cosine schedule is rebuilt over {settings['epochs']} epochs from step "
              f"{int(model.optimizer.iterations)}: the learning rate jumps to where the longer run would be")
    return model


def record_run(model, args, files, run_info, settings, x_val, y_val, x_test, y_test):
    """The final model, then this run's best checkpoint, each with its figures and JSON; the plot.
    A --distribute run's figures come from the saved file, evaluated here alone on this process's
    device: the trained model's arrays are spread over every process's devices."""
    distribute.save(model, files["model"], include_optimizer=False)
    if args.distribute:
        keras.distribution.set_distribution(None)
        model = models.load_model(files["model"])
    figures = record(model, args.name, run_info, settings["epochs"], x_val, y_val, x_test, y_test)
    if run_info.get("best_epoch") == settings["epochs"]:  # the checkpoint holds the final weights
        models.write_json(files["best"].with_suffix(".json"), {**figures, "model": f"{args.name}_acc"})
        print(f"Model: {files['best']}: the same weights (the last epoch was the best)")
    elif "best_epoch" in run_info:
        record(models.load_model(files["best"]), f"{args.name}_acc", run_info, run_info["best_epoch"],
               x_val, y_val, x_test, y_test)
    plot_history(files["csv"], files["plots"] / "Training_history.png", args.show)
    print(f"History: {files['csv']}, {files['plots'] / 'Training_history.png'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, settings = parse_args(argv)
    group = distribute.process_group(args)  # one process alone, or one of the processes of a --distribute run
    lead = group.process == 0    # process 0 owns the run's files and prints; the others only train
    files, lock = claim(args) if lead else (None, None)  # noqa: F841 (held while the process runs)
    if group.coordinator:
        distribute.join(group)
    scope, devices = distribute.data_parallel(group) if args.distribute else (contextlib.nullcontext, [])
    replicas = len(devices) or 1
    run_info, settings, extended = (begin(args, settings, files, shlex.join(["python", "train.py", *argv]), replicas)
                                    if lead else ({}, settings, False))
    first_epoch = distribute.agree(args, settings, run_info) if group.processes > 1 else run_info["epochs_done"]
    run_info.update(replicas=replicas, processes=group.processes)
    set_up_backend(args.seed, settings, run_info, devices)

    # Data: uint8 images; the training images with their fixed copies (or none: fresh ones every epoch).
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_split(args)
    one_hot = settings["label_smoothing"] > 0  # the smoothed loss takes one-hot labels
    encode = (lambda labels: np.eye(models.NUM_CLASSES, dtype=np.float32)[labels]) if one_hot else (lambda v: v)
    x_images, y_images = training_images(x_train, encode(y_train), settings, args.seed)
    validation = distribute.validation_share(x_val, encode(y_val), replicas, group) if len(x_val) >= replicas else None
    steps = len(feed_plan(len(x_images), settings["batch_size"], replicas)[1])
    if not steps:
        sys.exit(f"error: {len(x_images)} training images are too few for {replicas} replicas; raise --limit")
    print(f"Images: {len(x_images)} training ({settings['augment']}), {len(x_val)} validation, {len(x_test)} test")
    if args.minutes:
        fit_epochs_to_minutes(args.minutes, settings, run_info, x_train, len(x_images), len(x_val), len(x_test),
                              scope, group.processes)
        keras.utils.set_random_seed(args.seed)  # the run draws what it would have drawn without the probe

    # Model: new, or the stopped run's; one initial model in every process (the same seed).
    mirrored = args.distribute and keras.backend.backend() == "tensorflow"  # MirroredStrategy
    if first_epoch:
        model = resume_model(files, settings, steps, extended, first_epoch, scope if args.distribute else None, lead)
    else:
        with scope():
            model = build_model(settings, steps)
    if mirrored and replicas > 1:
        distribute.synchronize_batch_norm(model)
    if lead:
        if first_epoch:
            trim_history(files["csv"], first_epoch)
        models.write_json(files["resume_info"], run_info)

    # Train: after each epoch its CSV row, then its checkpoints; Ctrl-C stops between steps.
    ctrl_c = CtrlC()
    callbacks = ([keras.callbacks.CSVLogger(str(files["csv"]), append=first_epoch > 0),
                  DropoutStreams(args.seed), Checkpoints(files, run_info, ctrl_c), ctrl_c] if lead
                 else [DropoutStreams(args.seed), ctrl_c])
    stream = lambda: batches(x_images, y_images, settings, args.seed, first_epoch, replicas,  # noqa: E731
                             group.process, group.processes)
    feed = distribute.mirrored_feed(stream, x_images, y_images) if mirrored else stream()
    start = time.perf_counter()
    interrupted = False
    try:
        with ctrl_c:
            model.fit(feed, steps_per_epoch=steps, shuffle=False, epochs=settings["epochs"], initial_epoch=first_epoch,
                      validation_data=validation, callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2,
                      validation_batch_size=settings["batch_size"] // group.processes if args.distribute else None)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        # Out of the except block (whose traceback holds fit's frames): the fit's input iterator is
        # freed now; left to the interpreter's exit, TensorFlow reports an "Error occurred when
        # finalizing GeneratorDataset iterator" that is none.
        feed = None
        gc.collect()
        if not lead:
            sys.exit(130)
        print(f"\nInterrupted after epoch {run_info['epochs_done']}.")
        if "best_epoch" in run_info:
            print(f"The best model so far is {files['best']} (val_accuracy {run_info['best_val_accuracy']:.4f}).")
        print("Continue with: python train.py --resume" + ("" if args.name == SCRATCH_NAME else f" --name {args.name}")
              + (" --distribute" if args.distribute else ""))
        sys.exit(130)
    if not lead:
        print(f"Process {group.process} of {group.processes}: done", file=sys.__stdout__)
        return
    print(f"Training time: {time.perf_counter() - start:.0f} s this session, {run_info['train_seconds']:.0f} s in all")

    # Record: the final model and the best checkpoint, evaluated on validation and test.
    record_run(model, args, files, run_info, settings, x_val, y_val, x_test, y_test)


if __name__ == "__main__":
    main()
