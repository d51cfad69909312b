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

main() below is the recipe, top to bottom: settings, data, augmentation, model, fit, record.
The run around it (runs.py) owns its files in models/: NAME.h5 and NAME.json at the end, the best
validation checkpoint NAME_acc.h5 (+ .json), the history NAME.csv, the resume state NAME_resume.keras
(+ .json); the history plot goes to screenshots/NAME/. An existing model is never replaced unless
--overwrite says so ("latest", the scratch name, excepted: a new run replaces it, but asks first at a
terminal, and says so otherwise, when it replaces a stopped run), and two runs of one name cannot run
at once. The batches come from feed.py; the architecture from models.py.
"""

import argparse
import math
import shlex
import sys

import machine

if __name__ == "__main__":
    machine.preload_tcmalloc()  # where it is installed: this command again, with tcmalloc (faster on a CPU)
machine.start_backend()  # KERAS_BACKEND (default tensorflow), without the backend's start-up notices

import keras  # noqa: E402

import data  # noqa: E402
import erasing  # noqa: E402
import feed  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402

# The recipes. Each key is also a flag (--batch-size for batch_size, ...) that overrides it.
RECIPES = {
    "original": dict(           # the original write-up's recipe, as its code ran it
        arch="seed",            # a network of models.ARCHITECTURES: seed is the write-up's CNN
        epochs=100,             # passes over the training images
        batch_size=250,         # images per step (all devices together)
        optimizer="adam",       # adam, or sgd with Nesterov momentum 0.9
        lr=1e-3,                # peak learning rate
        schedule="constant",    # constant, or cosine decay to 0 after a linear warm-up
        warmup_epochs=0.0,      # epochs of linear warm-up (cosine only)
        dropout="full_1",       # a preset of models.DROPOUT_PRESETS (the seed architecture's)
        augment="copies",       # copies: fixed copies made once; online: fresh flips and erasing every epoch
        augment_copies=2,       # flipped-and-erased copies per image (copies only; 0: no augmentation)
        erase_fill="box",       # box: one grey level per erased box; pixel: a value per pixel
        erase_placement="original",  # as the original's eraser: size and place redrawn until the box fits
        erase_p=0.5,            # the share of the images Random Erasing erases a box of (0: no erasing)
        translate=0,            # online only: each image shifted by up to this many pixels each way; 0: none
        label_smoothing=0.0,    # 0: plain cross-entropy
        weight_decay=0.0,       # decoupled weight decay (AdamW-style); 0: none
        decay_batchnorm=True,   # the weight decay on BatchNorm's scale and offset too, as Keras does
        ema=0.0,                # momentum of the weights' moving average, copied in after every epoch; 0: none
        mixed_precision=False,  # bfloat16 on CPUs, float16 on GPUs; "auto": where the hardware has it
    ),
    # About an hour on 2 CPU cores with bfloat16 (AMD EPYC Zen 5: ~40 s an epoch).
    "fast": dict(arch="seed", epochs=80, batch_size=250, optimizer="adam", lr=2e-3, schedule="cosine", warmup_epochs=1.0,
                 dropout="fast", augment="online", augment_copies=0, erase_fill="pixel", erase_placement="paper",
                 erase_p=0.5, translate=0, label_smoothing=0.0, weight_decay=0.0, decay_batchnorm=True, ema=0.0,
                 mixed_precision="auto"),
    # The levers of the CIFAR-10 speed records, on 28x28 clothes: a small BatchNorm net with no big
    # dense layers, Nesterov SGD at a high rate with a short warm-up then cosine decay, label
    # smoothing, weight decay, random translation beside the flips; no Random Erasing (in 28 epochs
    # the small net learns more without it, on validation). About 14 minutes on 2 CPU cores with
    # bfloat16 (AMD EPYC Zen 4: 25-36 s an epoch), timed under glibc's allocator; tcmalloc, which
    # train.py now preloads where it is installed, took an epoch from 144 s to 84 s (AVX2, float32), and
    # changed nothing in bfloat16 (AMD EPYC Zen 4, 2026-12-07: 33-35 s an epoch either way).
    "quick": dict(arch="small", epochs=28, batch_size=256, optimizer="sgd", lr=0.1, schedule="cosine",
                  warmup_epochs=1.0, dropout="fast", augment="online", augment_copies=0, erase_fill="pixel",
                  erase_placement="paper", erase_p=0.0, translate=2, label_smoothing=0.1, weight_decay=5e-3,
                  decay_batchnorm=True, ema=0.0, mixed_precision="auto"),
}
# The quick recipe with a network 1.5x as wide (`mid`: 2.2x the parameters and the FLOPs)
# and 32 epochs: about 31 minutes on 2 CPU cores with bfloat16 (AMD EPYC Zen 4: 55-64 s an epoch).
# Over seeds 1-3, test 94.56 ± 0.19 % against quick's 94.31 ± 0.04 % (NOTEBOOK.md).
RECIPES["quick_mid"] = dict(RECIPES["quick"], arch="mid", epochs=32)
# The quick recipe with the `wide` network (twice quick's widths: 4x its FLOPs), 40 epochs, and Random
# Erasing on half the images: about an hour on 2 CPU cores with bfloat16 (AMD EPYC Zen 4: ~80 s an
# epoch). Seed 1 of it is models/pilot_wide40 (validation 95.33 %, test 94.82 %); NOTEBOOK.md has the seeds.
RECIPES["quick_wide"] = dict(RECIPES["quick"], arch="wide", epochs=40, erase_p=0.5)
# Issue 37's first strong recipe: quick_wide for twice the epochs (80), the one lever changed, so its
# gain over quick_wide is the longer schedule's. About 80 minutes on 2 CPU cores with bfloat16 (AMD EPYC
# Zen 4: 51-61 s an epoch; seed 1 took 78.8 minutes, NOTEBOOK.md, "The strong recipe").
RECIPES["strong"] = dict(RECIPES["quick_wide"], epochs=80)

CHOICES = {"arch": tuple(models.ARCHITECTURES), "optimizer": ("adam", "sgd"), "schedule": ("constant", "cosine"), "dropout": tuple(models.DROPOUT_PRESETS),
           "augment": ("copies", "online"), "erase_fill": erasing.FILLS, "erase_placement": erasing.PLACEMENTS}
HELP = {
    "arch": "the network (models.py): seed is the write-up's CNN", "epochs": "passes over the training images", "batch_size": "images per step",
    "optimizer": "optimizer (sgd: Nesterov momentum 0.9)", "lr": "peak learning rate",
    "schedule": "learning-rate schedule (cosine: warm-up, then decay to 0)",
    "warmup_epochs": "linear warm-up epochs (cosine only)",
    "dropout": "dropout preset, seed network only (full_1: 0.3, 0.4, 0.5, 0.5; full_2: 0.2, 0.3, 0.5, 0.35; fast: 0.25, 0.25, 0.5, 0.5)",
    "augment": "fixed copies made once, or fresh flips and erasing every epoch",
    "augment_copies": "augmented copies per image (copies only; 0: none)",
    "erase_fill": "Random Erasing fill: one grey level per box, or one value per pixel",
    "erase_placement": "Random Erasing box: as the paper (size redrawn, then a place that fits), or as the "
                       "original write-up's eraser (size and place redrawn together until it fits: fewer large "
                       "boxes)",
    "erase_p": "the share of the images Random Erasing erases a box of (0: none)",
    "translate": "random translation, online only: each image shifted by up to this many pixels, zero-padded",
    "label_smoothing": "label smoothing", "weight_decay": "decoupled weight decay",
    "decay_batchnorm": "weight decay on BatchNorm's scale and offset too (--no-decay-batchnorm: on the "
                       "convolution and dense weights only)",
    "ema": "keep an exponential moving average of the weights with this momentum (0.99: over about 100 "
           "steps), and make it the model's weights at the end of every epoch (0: none)",
    "mixed_precision": "bfloat16 on CPUs, float16 on GPUs",
}
SEED = 1


def parse_args(argv=None):
    """(args, settings): the recipe's settings with the flags given on the command line applied."""
    parser = argparse.ArgumentParser(description="Train the Fashion-MNIST CNN.")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="original",
                        help="settings to start from; the flags below override them (default: original)")
    for key, default in RECIPES["original"].items():
        flag = "--" + key.replace("_", "-")
        shown = "(" + "; ".join(f"{name}: {recipe[key]}" for name, recipe in RECIPES.items()) + ")"
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
                                       f"terminal, else {runs.SCRATCH_NAME})")
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
    if not 0 <= settings["translate"] <= 8 or settings["translate"] and settings["augment"] != "online":
        return "--translate must be 0 to 8 pixels, and goes with --augment online"
    if not 0 <= settings["erase_p"] <= 1:
        return "--erase-p must be between 0 and 1"
    if not 0 <= settings["label_smoothing"] < 1:
        return "--label-smoothing must be at least 0 and below 1"
    if not 0 <= settings["ema"] < 1:
        return "--ema must be at least 0 and below 1 (0.99 averages over about 100 steps)"
    if args.minutes is not None and (args.epochs is not None or args.resume or args.minutes <= 0):
        return "--minutes must be above 0, and goes without --epochs and --resume"
    if args.limit is not None and not 20 <= args.limit <= 60000:
        return "--limit must be between 20 (there must be images to validate on) and 60000"
    if args.name is not None and (not runs.NAME_PATTERN.fullmatch(args.name) or args.name.endswith(("_acc", "_resume"))):
        return ("--name must be 1-64 letters, digits, '.', '_' or '-', start with a letter or digit, "
                "and not end in _acc or _resume")
    return None


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
                            label_smoothing=settings["label_smoothing"], weight_decay=settings["weight_decay"] or None,
                            arch=settings["arch"], decay_batchnorm=settings["decay_batchnorm"],
                            ema=settings["ema"], ema_every=steps_per_epoch)


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv

    # 1. Settings: the recipe and the flags; the run claims its name (a resumed run takes back its own).
    args, settings = parse_args(argv)
    run = runs.Run(args, settings, command=shlex.join(["python", "train.py", *argv]))
    settings = run.settings

    # 2. Data: uint8 images; 85 % of the training file trains, 15 % validates.
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_split(args)

    # 3. Augmentation: fixed flipped-and-erased copies made now, or fresh ones every epoch (feed.py).
    x_images, y_images = feed.training_images(x_train, feed.labels(y_train, settings), settings, args.seed)
    stream = run.stream(x_images, y_images)
    steps = run.steps(len(x_images))
    print(f"Images: {len(x_images)} training ({settings['augment']}), {len(x_val)} validation, {len(x_test)} test")

    # 4. Model: models.py's network (--arch) with the recipe's optimizer and schedule (or the stopped run's model).
    build = lambda: build_model(settings, steps)  # noqa: E731
    if args.minutes:
        run.fit_to_minutes(args.minutes, build, x_train, len(x_images), len(x_val), len(x_test))
    model = run.model(build, steps)
    run.describe(model)

    # 5. Fit: checkpointed after every epoch; Ctrl-C stops between steps.
    run.fit(model, stream, steps, run.validation(x_val, feed.labels(y_val, settings)))

    # 6. Record: the final model and the best checkpoint, evaluated on validation and test.
    run.record(model, x_val, y_val, x_test, y_test)


if __name__ == "__main__":
    machine.run(main)
