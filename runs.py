"""A training run's life, apart from its recipe: its name and files, the lock and the replace
question, the resume state and its checks, the checkpoints after every epoch, Ctrl-C, and the
JSON record at the end. train.py drives it through a Run:

    run = runs.Run(args, settings, command)   # claims NAME, joins the other processes, starts the record
    model = run.model(build, steps)            # a new model, or the stopped run's
    run.fit(model, stream, steps, validation)  # epoch after epoch, checkpointed; Ctrl-C stops between steps
    run.record(model, x_val, y_val, x_test, y_test)

A run NAME owns in models/: NAME.h5 and NAME.json at the end, the best validation checkpoint
NAME_acc.h5 (+ .json) after every epoch that improves it, the history NAME.csv, the resume state
NAME_resume.keras (+ .json) and the lock .NAME.lock; its history plot goes to screenshots/NAME/.
Of a --distribute run's processes, process 0 alone owns the files and prints; the others train.
"""

import contextlib
import fcntl
import gc
import json
import re
import signal
import sys
import time

import numpy as np

import machine

machine.start_backend()

import keras  # noqa: E402

import backend  # noqa: E402
import data  # noqa: E402
import callbacks  # noqa: E402
import distribute  # noqa: E402
import feed  # noqa: E402
import models  # noqa: E402
import test  # noqa: E402 (the history plot)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Settings added since the first runs were recorded, and what a run recorded before each existed did.
ADDED_SETTINGS = {"arch": "seed", "erase_placement": "paper", "translate": 0, "erase_p": 0.5,
                  "decay_batchnorm": True, "ema": 0.0}
SCRATCH_NAME = "latest"  # the default name; a new run replaces it (a stopped one: see claim)
SCREENSHOTS_DIR = test.SCREENSHOTS_DIR  # a run's history plot goes to its folder NAME/


class Run:
    """One run of train.py in this process: its place among the run's processes, its files and lock
    (process 0), its record (`info`) and settings, and the epoch it starts from."""

    def __init__(self, args, settings, command):
        self.args = args
        self.group = distribute.process_group(args)  # one process alone, or one of a --distribute run's
        self.lead = self.group.process == 0          # process 0 owns the run's files and prints
        self.files, self.lock = claim(args) if self.lead else (None, None)  # the lock: held while the process runs
        if self.group.coordinator:
            distribute.join(self.group)
        self.scope, devices = distribute.data_parallel(self.group) if args.distribute else (contextlib.nullcontext, [])
        self.replicas = len(devices) or 1
        self.info, self.settings, self.extended = (begin(args, settings, self.files, command, self.replicas)
                                                   if self.lead else ({}, settings, False))
        self.first_epoch = (distribute.agree(args, self.settings, self.info) if self.group.processes > 1
                            else self.info["epochs_done"])
        self.info.update(replicas=self.replicas, processes=self.group.processes)
        self.mirrored = args.distribute and keras.backend.backend() == "tensorflow"  # MirroredStrategy
        backend.set_up_backend(args.seed, self.settings, self.info, devices)

    def steps(self, n_images):
        """Steps an epoch over n_images; exits with one line when there are too few for the replicas."""
        steps = len(feed.feed_plan(n_images, self.settings["batch_size"], self.replicas)[1])
        if not steps:
            sys.exit(f"error: {n_images} training images are too few for {self.replicas} replicas; raise --limit")
        return steps

    def stream(self, x_images, y_images):
        """A function that starts the run's batch stream at its first epoch (this process's share)."""
        def start():
            return feed.batches(x_images, y_images, self.settings, self.args.seed, self.first_epoch,
                                self.replicas, self.group.process, self.group.processes)

        start.images = x_images, y_images  # their shapes, for MirroredStrategy's dataset
        return start

    def validation(self, x_val, y_val):
        """This process's share of the validation images; None when there are none to share."""
        if len(x_val) < self.replicas:
            return None
        return distribute.validation_share(x_val, y_val, self.replicas, self.group)

    def fit_to_minutes(self, minutes, build, x_train, n_images, n_val, n_test):
        """--minutes: time a throwaway build() here, then set the epochs to what fits (process 0's
        timing, in every process of the run)."""
        batch = self.settings["batch_size"] // self.group.processes
        rates = backend.time_this_machine(build, models.prepare(x_train[:batch]), batch, scope=self.scope,
                                          processes=self.group.processes)
        train_rate, predict_rate = distribute.from_process_0([np.array(rates)])[0].tolist()
        epochs, epoch_seconds = backend.epoch_budget(minutes, train_rate, predict_rate, n_images, n_val, n_test)
        self.settings["epochs"] = epochs
        self.info["timed"] = {"train_images_per_s": round(train_rate, 1), "epoch_seconds": round(epoch_seconds, 1)}
        print(f"Timed here: {train_rate:.0f} training images/s, about {epoch_seconds:.0f} s an epoch: "
              f"{epochs} epochs fit in {minutes:g} minutes (the same run again: --epochs {epochs})")
        keras.utils.set_random_seed(self.args.seed)  # the run draws what it would have drawn without the probe

    def model(self, build, steps):
        """The model to train, the same in every process: build() in the run's scope, and on a resume
        with the stopped run's weights and optimizer state. Built anew, not loaded whole, so that what
        a saved optimizer does not keep holds: the schedule over the run's epochs (a cosine run made
        longer by --epochs would otherwise sit at a learning rate of 0 after the old end), and which
        variables are kept out of the weight decay."""
        rebuilt = self.extended and self.settings["schedule"] == "cosine"

        def build_in_scope():
            with self.scope():
                return build()

        if not self.first_epoch:
            model = build_in_scope()
        else:  # process 0 loads the stopped run's state, and every process takes it
            model = distribute.resume_everywhere(build_in_scope, lambda: load_resume_model(self.files), self.lead,
                                                 self.files and self.files["resume"])
        if self.first_epoch:
            check_resume_pair(model, self.first_epoch, steps, self.files, self.lead)
            if rebuilt:
                print(f"The cosine schedule is rebuilt over {self.settings['epochs']} epochs from step "
                      f"{int(model.optimizer.iterations)}: the learning rate jumps to where the longer run would be")
        if self.mirrored and self.replicas > 1:
            distribute.synchronize_batch_norm(model)
        if self.lead:
            if self.first_epoch:
                trim_history(self.files["csv"], self.first_epoch)
            models.write_json(self.files["resume_info"], self.info)
        return model

    def describe(self, model):
        """Print the network's size and cost, and record them in the run's JSON."""
        params, mflop = model.count_params(), round(models.mflops(model), 1)
        self.info.update(arch=self.settings["arch"], parameters=params, mflop_per_image=mflop)
        print(f"Network: {self.info['arch']}, {params:,} parameters, {mflop:g} MFLOP per image forward "
              f"(about {3 * mflop:.0f} a training image)")

    def fit(self, model, stream, steps, validation):
        """Train to the run's last epoch: after each epoch its CSV row, then its checkpoints. Ctrl-C
        stops between steps and exits (130; SIGTERM: 143) with the command that continues the run."""
        args, settings, files = self.args, self.settings, self.files
        ctrl_c = callbacks.CtrlC()
        hooks = [callbacks.DropoutStreams(args.seed), ctrl_c]
        if self.lead:
            hooks[:0] = [keras.callbacks.CSVLogger(str(files["csv"]), append=self.first_epoch > 0),
                             callbacks.Checkpoints(files, self.info, ctrl_c)]
        batches = distribute.mirrored_feed(stream, *stream.images) if self.mirrored else stream()
        start = time.perf_counter()
        interrupted, failed = False, None
        try:
            with ctrl_c:
                model.fit(batches, steps_per_epoch=steps, shuffle=False, epochs=settings["epochs"],
                          initial_epoch=self.first_epoch, validation_data=validation, callbacks=hooks,
                          verbose=1 if sys.stdout.isatty() else 2,
                          validation_batch_size=settings["batch_size"] // self.group.processes if args.distribute
                          else None)
        except KeyboardInterrupt:
            interrupted = True
        except OSError as e:
            if not machine.out_of_space(e):
                raise
            failed = e
        if interrupted or failed:
            # Out of the except block (whose traceback holds fit's frames): the fit's input iterator is
            # freed now; left to the interpreter's exit, TensorFlow reports an "Error occurred when
            # finalizing GeneratorDataset iterator" that is none.
            batches = None
            if failed:
                failed.__traceback__ = failed.__context__ = failed.__cause__ = None  # they hold fit's frames too
            gc.collect()
            if failed:
                self.out_of_space(failed)
            self.stopped(ctrl_c.pressed)
        if not self.lead:
            print(f"Process {self.group.process} of {self.group.processes}: done", file=sys.__stdout__)
            return
        print(f"Training time: {time.perf_counter() - start:.0f} s this session, "
              f"{self.info['train_seconds']:.0f} s in all")

    def stopped(self, signum):
        """Exit after a stop (130 for Ctrl-C, 143 for SIGTERM): what is kept, and how to continue."""
        if self.lead:
            how = " (SIGTERM)" if signum == signal.SIGTERM else ""
            print(f"\nInterrupted{how} after epoch {self.info['epochs_done']}.")
            if "best_epoch" in self.info:
                print(f"The best model so far is {self.files['best']} "
                      f"(val_accuracy {self.info['best_val_accuracy']:.4f}).")
            print(f"Continue with: {self.resume_command()}")
        sys.exit(machine.stop_code(signum))

    def resume_command(self):
        """The command that continues this run."""
        return ("python train.py --resume" + ("" if self.args.name == SCRATCH_NAME else f" --name {self.args.name}")
                + (" --distribute" if self.args.distribute else ""))

    def out_of_space(self, error):
        """Exit with one line when `error` is a full disk: which file, about how much it needs, the
        epoch the run is saved at, and the command that continues it. Other errors go on up."""
        if not machine.out_of_space(error):
            raise error
        what = str(error) if isinstance(error, machine.DiskFull) else f"no space left on the disk for {error.filename}"
        saved = stopped_at(self.files, finished=True) if self.lead else None
        at = (f"the run is saved at epoch {saved[0]} of {saved[1]}: free some space, then continue with"
              if saved else "no epoch is saved yet: free some space, then start it again with")
        sys.exit(f"error: {what}; {at}: {self.resume_command()}")

    def record(self, model, x_val, y_val, x_test, y_test):
        """The final model and the best checkpoint, evaluated and recorded (process 0); a full disk
        says how to record them later (--resume, which trains no more)."""
        try:
            self.record_all(model, x_val, y_val, x_test, y_test)
        except OSError as e:
            self.out_of_space(e)

    def record_all(self, model, x_val, y_val, x_test, y_test):
        """Process 0: the final model, then the best checkpoint, each with its figures and JSON; the plot.
        A --distribute run's figures come from the saved file, evaluated here alone on this process's
        device: the trained model's arrays are spread over every process's devices."""
        if not self.lead:
            return
        name, files, info, epochs = self.args.name, self.files, self.info, self.settings["epochs"]
        # the wall time of this command, from its start to the record (of the last session, if resumed)
        info["command_seconds"] = round(time.monotonic() - machine.STARTED, 1)
        distribute.save(model, files["model"], include_optimizer=False)
        if self.args.distribute:
            keras.distribution.set_distribution(None)
            model = models.load_model(files["model"])
        figures = record(models.float32_copy(model), name, info, epochs, x_val, y_val, x_test, y_test)
        if info.get("best_epoch") == epochs:  # the checkpoint holds the final weights
            models.write_json(files["best"].with_suffix(".json"), {**figures, "model": f"{name}_acc"})
            print(f"Model: {files['best']}: the same weights (the last epoch was the best)")
        elif "best_epoch" in info:
            record(models.load_model(files["best"]), f"{name}_acc", info, info["best_epoch"],
                   x_val, y_val, x_test, y_test)
        test.plot_history(files["csv"], files["plots"] / "Training_history.png", self.args.show)
        print(f"History: {files['csv']}, {files['plots'] / 'Training_history.png'}")


# ---- Names, files, the lock and the replace question ----

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


# ---- The resume state and its checks ----

def stopped_at(files, finished=False):
    """(epochs done, epochs) of a run stopped before its end (or at it, with finished), with at least
    one epoch to keep; None if there is none (or its record is unreadable: nothing could resume from it)."""
    try:
        info = json.loads(files["resume_info"].read_text())
        done, epochs = int(info["epochs_done"]), int(info["settings"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (done, epochs) if 0 < done < epochs or finished and 0 < done == epochs else None


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
        sys.exit(f"error: the resume state {files['resume']} is damaged ({machine.reason(e, 120)}); "
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
    settings, args.seed, args.limit = as_run(run_info["settings"]), run_info["seed"], run_info["limit"]
    args.all_data = run_info.get("all_data", False)
    distribute.check_batch(settings["batch_size"], replicas)
    extended = args.epochs is not None and args.epochs != settings["epochs"]
    settings["epochs"] = args.epochs or settings["epochs"]
    run_info.setdefault("resumed_with", []).append(command)
    print(f"Resuming {args.name} after epoch {run_info['epochs_done']} of {settings['epochs']}")
    return run_info, settings, extended


def as_run(settings):
    """A recorded run's settings in today's terms: with each setting added since, as the run had it."""
    return {**ADDED_SETTINGS, **settings}


# ---- The record: figures and JSON ----

def record(model, name, run_info, epochs, x_val, y_val, x_test, y_test):
    """Evaluate a saved model on validation and test (in float32, whatever it trained in, as test.py
    does), write its JSON beside it, print its lines; returns the JSON's content."""
    val = models.scores(models.predict(model, x_val), y_val) if len(x_val) else (None, None)
    test = models.scores(models.predict(model, x_test), y_test)
    info = {**run_info, **machine.environment(), "model": name, "epochs": epochs, "evaluated_in": "float32",
            "val_accuracy": val[0], "val_loss": val[1], "test_accuracy": test[0], "test_loss": test[1]}
    models.write_json(models.MODELS_DIR / f"{name}.json", info)
    print(f"Model: {models.MODELS_DIR / name}.h5 (epoch {epochs})")
    if val[0] is not None:
        print(f"Validation accuracy: {val[0]:.4f}")
    print(f"Test accuracy: {test[0]:.4f}")
    print(f"Test loss: {test[1]:.4f}")
    return info
