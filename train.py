"""Train the CNN of models.py on Fashion-MNIST.

    python train.py                       # the seed's recipe: 100 epochs, ~6-21 h on 2 CPU cores
    python train.py --recipe fast         # the 60-minute CPU recipe (README: its figures)
    python train.py --epochs 1 --limit 2000 --name smoke     # a quick check
    python train.py --resume              # continue an interrupted run
    python train.py --recipe fast --all-data --name best    # the shipped model: all 60,000 images

The seed's recipe: the first 51,000 training images train and the last 9,000
validate; every training image gets two copies, each mirrored and randomly
erased with probability 0.5 (153,000 images); pixels / 255; Adam, batch 250,
100 epochs. The best validation accuracy is kept in models/latest_acc.h5, the
final model in models/NAME.h5 (NAME asked at a terminal, else "latest"), each
with a JSON of what produced it and its validation and test figures. The
history goes to models/latest.csv and screenshots/Training_history.png.

--all-data trains on all 60,000 training images instead, once a recipe has been
chosen on the validation split: nothing validates, no best checkpoint is kept,
and the model after the last epoch is the result.

It runs under any Keras 3 backend (KERAS_BACKEND=tensorflow, the default, jax
or torch), on a GPU when the backend sees one.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

# The settings of each recipe; a flag given on the command line overrides them.
RECIPES = {
    "seed": dict(
        epochs=100,             # passes over the training images
        batch_size=250,         # images per step
        optimizer="adam",       # adam or sgd (Nesterov momentum 0.9)
        lr=1e-3,                # peak learning rate
        schedule="constant",    # constant, or cosine decay to 0 after a linear warm-up
        warmup_epochs=0,        # epochs of linear warm-up (cosine only)
        dropout="full_1",       # models.DROPOUT_PRESETS
        augment="copies",       # copies: fixed copies made once; online: fresh flips and erasing each epoch
        augment_copies=2,       # augmented copies per image (copies only; 0: no augmentation)
        label_smoothing=0.0,    # 0: plain cross-entropy
        weight_decay=0.0,       # decoupled weight decay (AdamW-style); 0: none
        mixed_precision=False,  # bfloat16 compute on CPUs, float16 on GPUs; auto: where the hardware has it
    ),
    # 60 minutes on 2 CPU cores (AMD EPYC Zen 5, bfloat16): ~40 s an epoch. See README.
    "fast": dict(
        epochs=80, batch_size=250, optimizer="adam", lr=2e-3, schedule="cosine", warmup_epochs=1,
        dropout="full_1", augment="online", augment_copies=0, label_smoothing=0.0, weight_decay=0.0,
        mixed_precision="auto",
    ),
}
VAL_FRACTION = 0.15  # the last 15 % of the training file validates (not shuffled, as the seed)
SEED = 1
ROOT = Path(__file__).resolve().parent
SCREENSHOTS_DIR = ROOT / "screenshots"
RESUME = "latest_resume.keras"  # full state (weights + optimizer) after every epoch, in models/
RESUME_INFO = "latest_resume.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the Fashion-MNIST CNN.")
    seed_recipe = RECIPES["seed"]
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="seed",
                        help="settings to start from; flags below override them (default: seed)")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: {seed_recipe['epochs']})")
    parser.add_argument("--minutes", type=float,
                        help="instead of --epochs: time a few steps on this machine, then train as many epochs "
                             "as fit in this many minutes (default: off)")
    parser.add_argument("--batch-size", type=int, help=f"images per step (default: {seed_recipe['batch_size']})")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer (default: adam)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: {seed_recipe['lr']})")
    parser.add_argument("--schedule", choices=("constant", "cosine"), help="learning-rate schedule (default: constant)")
    parser.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs for cosine (default: 0)")
    parser.add_argument("--dropout", choices=("full_1", "full_2"), help="dropout preset (default: full_1)")
    parser.add_argument("--augment", choices=("copies", "online"),
                        help="fixed copies made once, or fresh ones every epoch (default: copies)")
    parser.add_argument("--augment-copies", type=int, help="augmented copies per image, 0: none (default: 2)")
    parser.add_argument("--label-smoothing", type=float, help="label smoothing (default: 0)")
    parser.add_argument("--weight-decay", type=float, help="decoupled weight decay (default: 0)")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction,
                        help="bfloat16 on CPUs, float16 on GPUs (default: off; fast recipe: where the "
                             "hardware has it)")
    parser.add_argument("--all-data", action="store_true",
                        help="train on all 60,000 images, keep none for validation (for the final model of a "
                             "recipe chosen on validation; default: off)")
    parser.add_argument("--limit", type=int, help="use only the first N training images (default: all 60,000)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    parser.add_argument("--name", help="save the final model as models/NAME.h5 (default: ask, else latest)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in models/")
    parser.add_argument("--show", action="store_true", help="open the history plot in a window at the end")
    args = parser.parse_args(argv)
    settings = dict(RECIPES[args.recipe])
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["epochs"] < 1 or settings["batch_size"] < 1 or settings["augment_copies"] < 0:
        parser.error("--epochs and --batch-size must be at least 1, --augment-copies at least 0")
    if args.minutes is not None and (args.epochs is not None or args.resume or args.minutes <= 0):
        parser.error("--minutes must be above 0, and goes without --epochs and --resume")
    if args.limit is not None and args.limit < 20:
        parser.error("--limit must be at least 20 (there must be images to validate on)")
    if args.name is not None and (not args.name or "/" in args.name or args.name.endswith("_acc")):
        parser.error("--name must be a plain file name, not ending in _acc")
    return args, settings


def cpu_has_bf16():
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX); emulated, it is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_precision(mixed, keras):
    """Set Keras's global dtype policy: float32, or mixed bfloat16 (CPU) / float16 (GPU).

    mixed: True, False, or "auto" (mixed where the hardware is faster with it).
    """
    import models

    on_gpu = models.device_name().startswith("GPU")
    if mixed == "auto":
        mixed = on_gpu or cpu_has_bf16()
    policy = ("mixed_float16" if on_gpu else "mixed_bfloat16") if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def make_online_dataset(x, y, batch_size, seed, first_epoch, keras):
    """Batches of freshly flipped and erased training images, a new draw each epoch.

    A keras.utils.PyDataset, so it works under every backend. Each epoch's images are
    made in one vectorised NumPy call at its start (about 0.1 s for 51,000 images,
    against a minute or more of training on a CPU).
    """
    import data

    class Dataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = first_epoch
            self.prepare()

        def prepare(self):
            # One generator per epoch, so a resumed run draws what the whole run would have.
            rng = np.random.default_rng([seed, self.epoch])
            order = rng.permutation(len(x))
            self.x_epoch = data.normalize(data.flip_and_erase(x[order], rng))[..., None]
            self.y_epoch = y[order]

        def __len__(self):
            return math.ceil(len(x) / batch_size)

        def __getitem__(self, index):
            batch = slice(index * batch_size, (index + 1) * batch_size)
            return self.x_epoch[batch], self.y_epoch[batch]

        def on_epoch_end(self):
            self.epoch += 1
            self.prepare()

    return Dataset()


def learning_rate(settings, steps_per_epoch, keras):
    """A float, or a warm-up + cosine decay schedule over the whole run."""
    if settings["schedule"] == "constant":
        return settings["lr"]
    total = settings["epochs"] * steps_per_epoch
    warmup = int(settings["warmup_epochs"] * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=settings["lr"] * 0.1 if warmup else settings["lr"],
        decay_steps=max(total - warmup, 1), warmup_target=settings["lr"] if warmup else None,
        warmup_steps=warmup, alpha=0.0)


class CtrlC:
    """Ctrl-C during training: stop after the current step, never inside a checkpoint save.

    Python's own KeyboardInterrupt fires wherever the interpreter happens to be, and one
    that fires inside a finalizer run by the garbage collector is printed and dropped, so
    training would go on. Here the handler only sets a flag; the callback raises
    KeyboardInterrupt between steps. A second Ctrl-C raises at once.
    """

    def __init__(self):
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


def make_callbacks(keras, models, run_info, best_path, resume_path, csv_path, first_epoch, ctrl_c):
    """Best-checkpoint (atomic), per-epoch resume state, CSV history, Ctrl-C between steps."""

    class Checkpoints(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = run_info.get("best_val_accuracy", -1.0)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            val_accuracy = float(logs.get("val_accuracy", float("nan")))
            if val_accuracy > self.best:
                self.best = val_accuracy
                run_info.update(best_val_accuracy=val_accuracy, best_epoch=epoch + 1)
                models.save_model(self.model, best_path, include_optimizer=False)
                print(f"\nEpoch {epoch + 1}: val_accuracy improved to {val_accuracy:.4f}, saved {best_path.name}")
            run_info.update(epochs_done=epoch + 1, train_seconds=run_info["train_seconds"]
                            + time.perf_counter() - self.epoch_start)
            models.save_model(self.model, resume_path, suffix=".keras")
            models.write_json(resume_path.with_suffix(".json"), run_info)
            ctrl_c.check()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            ctrl_c.check()

        def on_test_batch_end(self, batch, logs=None):
            ctrl_c.check()

    return [Checkpoints(), keras.callbacks.CSVLogger(str(csv_path), append=first_epoch > 0)]


def plot_history(csv_path, png_path, show=False):
    """Accuracy and loss per epoch, training vs validation, from the CSV log."""
    import matplotlib

    import data

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.genfromtxt(csv_path, delimiter=",", names=True)
    rows = np.atleast_1d(rows)
    epochs = rows["epoch"] + 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, rows[metric], label="training")
        if not np.isnan(rows[f"val_{metric}"]).all():  # NA throughout with --all-data
            ax.plot(epochs, rows[f"val_{metric}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"Model {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    data.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    if show:
        plt.show()
    plt.close(fig)


def epochs_for_minutes(minutes, settings, x_train, n_train, n_val, n_test, keras, probe_steps=8):
    """How many epochs fit in `minutes` here, timed on a throwaway copy of the model.

    One untimed pass compiles, a second of `probe_steps` steps is timed, then a timed
    prediction pass gives the cost of validation and the final evaluation.
    """
    import data
    import models

    batch = settings["batch_size"]
    images = data.normalize(x_train[:probe_steps * batch])[..., None]
    labels = np.zeros(len(images), dtype=np.int64)
    probe = models.build_cnn(settings["dropout"], settings["optimizer"], settings["lr"])
    probe.fit(images, labels, batch_size=batch, epochs=1, verbose=0)
    start = time.perf_counter()
    probe.fit(images, labels, batch_size=batch, epochs=1, verbose=0)
    train_rate = len(images) / (time.perf_counter() - start)
    probe.predict(images, batch_size=batch, verbose=0)
    start = time.perf_counter()
    probe.predict(images, batch_size=batch, verbose=0)
    predict_rate = len(images) / (time.perf_counter() - start)
    del probe
    epoch_seconds = n_train / train_rate + n_val / predict_rate + 1.0  # + saving the checkpoints
    final_seconds = 2 * (n_val + n_test) / predict_rate  # the final model and the best checkpoint
    epochs = max(1, int((minutes * 60 - final_seconds) // epoch_seconds))
    print(f"Timed here: {train_rate:.0f} training images/s, about {epoch_seconds:.0f} s an epoch: "
          f"{epochs} epochs fit in {minutes:g} minutes (the same run again: --epochs {epochs})")
    return epochs, {"train_images_per_s": round(train_rate, 1), "epoch_seconds_estimate": round(epoch_seconds, 1)}


def ask_name(default="latest"):
    """The model's name, asked at a terminal; never asks when stdin is not one."""
    if not sys.stdin.isatty():
        return default
    try:
        answer = input(f"Name for the final model [{default}]: ").strip()
    except EOFError:
        return default
    return answer or default


def main(argv=None):
    args, settings = parse_args(argv)
    import data
    import models

    import keras

    models_dir = models.MODELS_DIR
    resume_path = models_dir / RESUME
    command = " ".join(["python"] + sys.argv)
    run_info = {"command": command, "settings": settings, "recipe": args.recipe, "seed": args.seed,
                "limit": args.limit, "all_data": args.all_data, "epochs_done": 0, "train_seconds": 0.0}
    if args.resume:
        info_path = resume_path.with_suffix(".json")
        if not resume_path.exists() or not info_path.exists():
            sys.exit(f"error: nothing to resume: {resume_path} not found (it is written after each epoch)")
        run_info = json.loads(info_path.read_text())
        settings, args.seed, args.limit = run_info["settings"], run_info["seed"], run_info["limit"]
        args.all_data = run_info.get("all_data", False)
        if args.epochs is not None:  # a resumed run may be extended
            settings["epochs"] = args.epochs
        run_info.setdefault("resumed_with", []).append(command)
        print(f"Resuming after epoch {run_info['epochs_done']} of {settings['epochs']}")

    keras.utils.set_random_seed(args.seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # same seed, same CPU: same figures
    policy = set_precision(settings["mixed_precision"], keras)
    run_info["dtype_policy"] = policy
    print(f"Training on {models.device_name()} (Keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{policy})")
    if args.recipe == "fast" and policy == "float32" and args.epochs is None and not args.minutes and not args.resume:
        print("Note: without bfloat16 hardware the fast recipe's epochs take 2-7 times longer than the 60 minutes "
              "it was sized for; --minutes 60 fits the epochs to an hour on this machine")

    # Data: first 85 % trains, last 15 % validates (--all-data: all train); pixels / 255.
    try:
        x, y = data.load_data("train")
        x_test, y_test = data.load_data("t10k")
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if args.all_data:
        (x_train, y_train), (x_val, y_val) = (x, y), (x[:0], y[:0])
    else:
        (x_train, y_train), (x_val, y_val) = data.split_data(x, y, VAL_FRACTION)
    one_hot = settings["label_smoothing"] > 0  # the smoothed loss takes one-hot labels
    encode = (lambda labels: np.eye(models.NUM_CLASSES, dtype=np.float32)[labels]) if one_hot else (lambda v: v)
    first_epoch = run_info["epochs_done"]
    if settings["augment"] == "online":
        train_data = make_online_dataset(x_train, encode(y_train), settings["batch_size"], args.seed,
                                         first_epoch, keras)
        n_train = len(x_train)
        fit_args = dict(x=train_data)
    else:
        x_aug, y_aug = data.augment(x_train, y_train, settings["augment_copies"], rng=args.seed)
        n_train = len(x_aug)
        fit_args = dict(x=data.normalize(x_aug)[..., None], y=encode(y_aug),
                        batch_size=settings["batch_size"], shuffle=True)
    validation = (data.normalize(x_val)[..., None], encode(y_val)) if len(x_val) else None
    steps = math.ceil(n_train / settings["batch_size"])
    print(f"Images: {n_train} training ({settings['augment']}), {len(x_val)} validation, {len(x_test)} test")

    if args.minutes:
        settings["epochs"], run_info["timed"] = epochs_for_minutes(args.minutes, settings, x_train, n_train,
                                                                   len(x_val), len(x_test), keras)
        keras.utils.set_random_seed(args.seed)  # the run draws what it would have drawn without the probe
    if args.resume:
        model = keras.models.load_model(resume_path)
    else:
        model = models.build_cnn(settings["dropout"], settings["optimizer"], learning_rate(settings, steps, keras),
                                 label_smoothing=settings["label_smoothing"],
                                 weight_decay=settings["weight_decay"] or None)
    best_path = models_dir / "latest_acc.h5"
    csv_path = models_dir / "latest.csv"
    models_dir.mkdir(exist_ok=True)
    ctrl_c = CtrlC()
    callbacks = make_callbacks(keras, models, run_info, best_path, resume_path, csv_path, first_epoch, ctrl_c)

    start = time.perf_counter()
    try:
        with ctrl_c:
            model.fit(**fit_args, epochs=settings["epochs"], initial_epoch=first_epoch,
                      validation_data=validation, callbacks=callbacks, verbose=2 if not sys.stdout.isatty() else 1)
    except KeyboardInterrupt:
        print(f"\nInterrupted after epoch {run_info['epochs_done']}.")
        if "best_epoch" in run_info:
            print(f"The best model so far is {best_path} "
                  f"(val_accuracy {run_info['best_val_accuracy']:.4f}).")
        print("Continue with: python train.py --resume")
        sys.exit(130)
    wall = time.perf_counter() - start
    print(f"Training time: {wall:.0f} s this session, {run_info['train_seconds']:.0f} s in all")

    # Final model and best checkpoint: test figures, then the JSON of each.
    environment = models.environment()
    name = args.name or "latest"
    val_accuracy, val_loss = models.scores(models.predict(model, x_val), y_val) if validation else (None, None)
    test_accuracy, test_loss = models.scores(models.predict(model, x_test), y_test)
    final_info = {**run_info, **environment, "model": name, "epochs": settings["epochs"],
                  "val_accuracy": val_accuracy, "val_loss": val_loss,
                  "test_accuracy": test_accuracy, "test_loss": test_loss}
    path = models.save_model(model, name, final_info, include_optimizer=False)
    shutil.copyfile(csv_path, path.with_suffix(".csv"))
    print(f"Final model: {path}" + (f"  Validation accuracy: {val_accuracy:.4f}" if validation else
                                    f"  (trained on all {len(x_train):,} training images: no validation)"))
    print(f"Test accuracy: {test_accuracy:.4f}")
    print(f"Test loss: {test_loss:.4f}")
    if "best_epoch" in run_info:  # this run's checkpoint, not one left by an earlier run
        best = models.load_model(best_path)
        best_val = models.scores(models.predict(best, x_val), y_val)
        best_test = models.scores(models.predict(best, x_test), y_test)
        models.write_json(best_path.with_suffix(".json"), {
            **run_info, **environment, "model": best_path.stem, "epochs": run_info.get("best_epoch"),
            "val_accuracy": best_val[0], "val_loss": best_val[1],
            "test_accuracy": best_test[0], "test_loss": best_test[1]})
        print(f"Best checkpoint: {best_path} (epoch {run_info.get('best_epoch')})  "
              f"Validation accuracy: {best_val[0]:.4f}  Test accuracy: {best_test[0]:.4f}")
    plot_history(csv_path, SCREENSHOTS_DIR / "Training_history.png", args.show)

    if args.name is None:
        chosen = ask_name()
        if chosen != name:
            for suffix in (".h5", ".json", ".csv"):
                os.replace(path.with_suffix(suffix), models_dir / f"{chosen}{suffix}")
            final_info["model"] = chosen
            models.write_json(models_dir / f"{chosen}.json", final_info)
            print(f"Saved as {models_dir / chosen}.h5")


if __name__ == "__main__":
    main()
