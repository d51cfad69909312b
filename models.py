"""The one model builder, and saving and loading models by name under models/.

    model = build_cnn()                  # the seed's CNN, 3,458,382 parameters, compiled
    save_model(model, "mine", info)      # models/mine.h5 + models/mine.json, both atomic
    model = load_model("mine")           # plain keras.models.load_model underneath

Models are saved in Keras's HDF5 format (.h5), which `keras.models.load_model`
opens with no custom objects under any backend; `.keras` files load too.
"""

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import machine

machine.start_backend()  # KERAS_BACKEND (default tensorflow), without the backend's start-up notices

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging as absl_logging  # Keras logs through absl
from keras import layers  # noqa: E402

import data  # noqa: E402

# Keras warns on every .h5 save that the format is "legacy"; it is the format this project
# promises (plain load_model opens it under every backend), so the warning is noise here.
absl_logging.set_verbosity(absl_logging.ERROR)

MODELS_DIR = Path(__file__).resolve().parent / "models"
SUFFIXES = (".h5", ".keras")  # the formats a model is saved in; .h5 first when a name has both
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# Dropout rates after (conv block 1, conv block 2, dense 512, dense 256). full_1 and full_2 are
# the original write-up's two runs, as its code set them (its text names the runs, not the rates);
# "fast" is what the fast recipe was chosen with on validation, and what the shipped best, fast,
# fast_all and long were trained with (their JSONs call it full_1, the name these rates had then).
DROPOUT_PRESETS = {
    "full_1": (0.3, 0.4, 0.5, 0.5),
    "full_2": (0.2, 0.3, 0.5, 0.35),
    "fast": (0.25, 0.25, 0.5, 0.5),
}
# Figures a model's JSON records; read_info drops any that is not a number (or null).
FIGURES = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "temperature")


class ModelError(Exception):
    """A model cannot be found or read; the message says why and what exists."""


def build_cnn(dropout="full_1", optimizer="adam", learning_rate=1e-3, momentum=0.9,
              label_smoothing=0.0, weight_decay=None, compile=True, arch="seed", decay_batchnorm=True,
              ema=0.0, ema_every=None):
    """A CNN of ARCHITECTURES (default: the seed's), compiled with the given optimizer and loss.

    dropout: a preset name from DROPOUT_PRESETS or four rates (the seed architecture only).
    optimizer: "adam" or "sgd" (with Nesterov momentum), or a keras optimizer instance;
    learning_rate may be a float or a keras LearningRateSchedule.
    decay_batchnorm: False keeps BatchNorm's scale and offset out of the weight decay.
    ema, ema_every: see compile_model.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, not {arch!r}")
    model = ARCHITECTURES[arch](dropout) if arch == "seed" else ARCHITECTURES[arch]()
    if compile:
        compile_model(model, optimizer, learning_rate, momentum, label_smoothing, weight_decay, decay_batchnorm,
                      ema, ema_every)
    return model


def seed_cnn(dropout="full_1"):
    """The original write-up's CNN: two 64-filter 3x3 convolutions, one of 128, dense 512 and 256
    (3,458,382 parameters, 94 MFLOP per image forward). Most parameters are in the dense layers,
    most of the work in the second 28x28 convolution."""
    rates = DROPOUT_PRESETS[dropout] if isinstance(dropout, str) else tuple(dropout)
    if len(rates) != 4:
        raise ValueError(f"dropout needs four rates, got {rates}")
    return keras.Sequential([
        keras.Input(shape=INPUT_SHAPE),
        layers.BatchNormalization(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),                      # (14, 14, 64)
        layers.Dropout(rates[0]),
        layers.Conv2D(128, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),                      # (7, 7, 128)
        layers.Dropout(rates[1]),
        layers.Flatten(),                            # (6272,)
        layers.Dense(512, activation="relu"),
        layers.Dropout(rates[2]),
        layers.Dense(256, activation="relu"),
        layers.Dropout(rates[3]),
        layers.BatchNormalization(),
        layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),  # float32 even under mixed precision
    ], name="fashion_cnn")


def conv_bn(x, filters, pool=False):
    """A 3x3 convolution (no bias: BatchNorm has one), 2x2 max pooling when asked, BatchNorm, ReLU."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    if pool:
        x = layers.MaxPooling2D(2)(x)
    # momentum 0.9, not Keras's 0.99: the statistics follow the weights within a short run
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def block_cnn(widths, name):
    """A small VGG-style net in the manner of the CIFAR-10 speed records: a 3x3 stem, then one block
    per width, each a convolution at the block's input size, 2x2 max pooling, and a second
    convolution (28 -> 14 -> 7 -> 3); global max pooling and one dense layer. No big dense layers:
    the parameters are in the convolutions, and every convolution is followed by BatchNorm."""
    inputs = keras.Input(shape=INPUT_SHAPE)
    x = conv_bn(inputs, widths[0] // 2)
    for width in widths:
        x = conv_bn(x, width, pool=True)
        x = conv_bn(x, width)
    x = layers.GlobalMaxPooling2D()(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


# --arch: name -> builder, the one place that maps one to the other.
ARCHITECTURES = {
    "seed": seed_cnn,                                              # 3,458,382 parameters, 94 MFLOP
    "small": lambda: block_cnn((32, 64, 128), "fashion_small"),    # 293,594 parameters, 31.8 MFLOP
    "mid": lambda: block_cnn((48, 96, 192), "fashion_mid"),        # 658,114 parameters, 71.3 MFLOP
    "wide": lambda: block_cnn((64, 128, 256), "fashion_wide"),     # 1,167,786 parameters, 126.7 MFLOP
}


def compile_model(model, optimizer="adam", learning_rate=1e-3, momentum=0.9, label_smoothing=0.0,
                  weight_decay=None, decay_batchnorm=True, ema=0.0, ema_every=None):
    """Compile with Adam or Nesterov SGD and cross-entropy (with label smoothing: on one-hot labels).
    With weight decay and decay_batchnorm False, BatchNorm's scale and offset are not decayed (the
    next BatchNorm undoes a convolution's scale, but not the last one's before the pooling).
    ema above 0: the optimizer keeps an exponential moving average of the trainable weights (each
    step average = ema * average + (1 - ema) * weights) and copies it into the model every
    `ema_every` steps, so that the model validated and saved at an epoch's end is the average
    (Keras's own use_ema; with ema_every None the average is kept and never copied)."""
    if isinstance(optimizer, str):
        averaging = dict(use_ema=True, ema_momentum=ema, ema_overwrite_frequency=ema_every) if ema else {}
        if optimizer == "adam":
            optimizer = keras.optimizers.Adam(learning_rate, weight_decay=weight_decay, **averaging)
        elif optimizer == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=True,
                                             weight_decay=weight_decay, **averaging)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
        if weight_decay and not decay_batchnorm:  # Keras can only be told before the optimizer is built
            optimizer.exclude_from_weight_decay(var_list=[
                variable for layer in model.layers if isinstance(layer, layers.BatchNormalization)
                for variable in layer.trainable_weights])
    # Integer labels 0-9; label smoothing needs one-hot labels (train.py makes them) and the
    # categorical form of the loss. Both are Keras's own, so plain load_model opens the file.
    if label_smoothing:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])
    # Every variable is made here, the optimizer's and the metric's (hence no "accuracy" string):
    # one made while TensorFlow traces the first training step makes it trace that step twice.
    model.optimizer.build(model.trainable_variables)


def mflops(model):
    """Millions of floating-point operations (a multiply-add is two) for one image's forward pass,
    counting the convolutions and dense layers; a training step costs about three times this."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.Dense)):
            kernel = layer.kernel.shape  # (kh, kw, in, out) or (in, out)
            positions = math.prod(layer.output.shape[1:-1]) if isinstance(layer, layers.Conv2D) else 1
            total += 2 * positions * math.prod(kernel)
    return total / 1e6


def model_name(name):
    """The name of a model as the scripts take it: "best.h5" and "best.keras" mean "best" (unless
    the name is a path to an existing file, which is used as it is)."""
    path = Path(name)
    if path.suffix in SUFFIXES and not path.exists():
        return str(path.with_suffix(""))
    return str(name)


def model_path(name):
    """The file of model NAME: models/NAME.h5, else models/NAME.keras; NAME may carry its suffix
    (best.h5) or be a path to a model file. A name with no file gives models/NAME.h5."""
    path = Path(name)
    if path.suffix in SUFFIXES and path.is_file():
        return path
    stem = path.name[:-len(path.suffix)] if path.suffix in SUFFIXES and path.parent == Path(".") else str(name)
    for suffix in SUFFIXES:
        candidate = MODELS_DIR / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return MODELS_DIR / f"{stem}.h5"


def available_models():
    """The models in models/, one entry per name: "best", or "evil (evil.h5 loads, evil.keras too)"."""
    files = {}
    for p in sorted(MODELS_DIR.glob("*")):
        if p.suffix in SUFFIXES and not p.name.startswith(".") and not p.stem.endswith("_resume"):
            files.setdefault(p.stem, []).append(p.suffix)
    return [stem if len(suffixes) == 1 else f"{stem} ({stem}{SUFFIXES[0]} loads, {stem}{SUFFIXES[1]} too)"
            for stem, suffixes in files.items()]


def save_model(model, name, info=None, include_optimizer=True, suffix=".h5"):
    """Save models/NAME.h5 (or a path ending in .h5 / .keras) and, with info, NAME.json beside it.

    Both files are written to a temporary name and renamed, so an interrupted save never
    leaves a broken file under the real name.
    """
    path = Path(name) if Path(name).suffix in SUFFIXES else MODELS_DIR / f"{name}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.unlink(tmp)  # Keras writes the file itself; it must not exist yet for .keras
        if path.suffix == ".h5":
            save_h5(model, tmp, include_optimizer)
        else:
            model.save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        full = machine.disk_full(e, path, tmp)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise full from None
        raise
    if info is not None:
        write_json(path.with_suffix(".json"), info)
    return path


def save_h5(model, path, include_optimizer):
    """model.save to .h5, keeping the model's compile settings whole: Keras's legacy writer takes the
    optimizer out of them (keras 3.15), so a later .keras save would reload with RMSprop, not the
    model's optimizer."""
    settings = getattr(getattr(model, "_compile_config", None), "config", None)
    optimizer = settings.get("optimizer") if isinstance(settings, dict) else None
    try:
        model.save(path, include_optimizer=include_optimizer)
    finally:
        if optimizer is not None:
            settings["optimizer"] = optimizer


def write_json(path, info):
    """Write a JSON file atomically."""
    data.write_text(Path(path), json.dumps(info, indent=2, default=str) + "\n")


def read_info(name):
    """The sidecar JSON of a model ({} when there is none). A JSON that is not an object, or a
    figure in it that is not a number, is ignored with a warning rather than trusted."""
    path = model_path(name).with_suffix(".json")
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"warning: ignoring {path}: not readable JSON ({e})", file=sys.stderr)
        return {}
    if not isinstance(info, dict):
        print(f"warning: ignoring {path}: not a JSON object", file=sys.stderr)
        return {}
    for key in FIGURES:
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            print(f"warning: ignoring {key} in {path}: {value!r} is not a number", file=sys.stderr)
            del info[key]
    return info


def float32_copy(model):
    """The same model and weights computing in float32. A mixed-precision model keeps its training
    policy in the file, and bfloat16 is emulated differently on each CPU: in float32 one model gives
    one figure everywhere."""
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float32"
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def load_model(name, compile=False, as_saved=False):
    """Load models/NAME.h5 (or .keras, or a path), computing in float32 (as_saved: in the precision it
    was saved with, such as mixed_bfloat16); ModelError with one line when it cannot."""
    path = model_path(name)
    if not path.exists():
        names = ", ".join(available_models()) or "none yet: train one with python train.py"
        raise ModelError(f"no model named {name!r} in {MODELS_DIR}; available: {names}")
    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many types for a file that is not a model
        raise ModelError(f"{path} is not a readable Keras model ({machine.reason(e)})") from None
    if tuple(model.input_shape[1:]) != INPUT_SHAPE or tuple(model.output_shape[1:]) != (NUM_CLASSES,):
        raise ModelError(f"{path} takes {model.input_shape[1:]} and gives {model.output_shape[1:]}; "
                         f"expected {INPUT_SHAPE} images and {NUM_CLASSES} class probabilities")
    return model if as_saved else float32_copy(model)


def prepare(images):
    """The model's input: uint8 images (n, 28, 28) -> float32 (n, 28, 28, 1) in [0, 1] (pixels / 255)."""
    return data.normalize(images)[..., None]


def predict(model, images, batch_size=1000):
    """Class probabilities (n, 10), float64, for uint8 images (n, 28, 28)."""
    return np.asarray(model.predict(prepare(images), batch_size=batch_size, verbose=0), dtype=np.float64)


def calibrate(probabilities, temperature):
    """softmax(log(p) / T): the probabilities after temperature scaling (Guo et al. 2017); the
    argmax is unchanged. test.py --calibrate fits T on held-out images."""
    logits = np.log(np.clip(probabilities, 1e-30, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def scores(probabilities, labels):
    """(accuracy, cross-entropy loss) of class probabilities against integer labels."""
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    loss = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)).mean())
    return accuracy, loss
