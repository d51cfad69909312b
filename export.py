"""Export a trained model to run outside this project, and check the export against Keras.

    python export.py best --format onnx          # models/best.onnx, run back in onnxruntime
    python export.py best --format tflite        # models/best.tflite, run back in the LiteRT interpreter
    python export.py best --format saved_model   # models/best_saved_model/, run back in TensorFlow
    python export.py best --format keras         # models/best.keras, run back in Keras

Every export takes float32 images (n, 28, 28, 1) with pixels divided by 255
(in [0, 1]) and returns the 10 class probabilities (n, 10), in data.py's class
order. It computes in float32: a model trained under mixed precision is
exported with the same weights and float32 arithmetic (ONNX Runtime and
LiteRT have no bfloat16 kernels on CPU); the script says how often that
changes a prediction. Each export is written under a temporary name, run
back in its own runtime on the test images and compared with Keras; only
if at least 99.9 % of the predicted classes agree is it renamed into place.
"""

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import data
import machine
import models  # starts the Keras backend, quietly

import keras  # noqa: E402 (after models: a quiet start)

FORMATS = {  # format: what is written in models/ for model NAME
    "keras": "{name}.keras",
    "saved_model": "{name}_saved_model",  # a folder
    "onnx": "{name}.onnx",
    "tflite": "{name}.tflite",
}
MIN_AGREEMENT = 0.999  # share of test images whose predicted class must be the same as in Keras
BATCH_SIZE = 1000  # images per call of the exported model
SCRATCH_LOCK = ".export.lock"  # in a scratch folder: held while its export runs
INPUT_NAME = "images"  # the input's name in the exported signature



def export(model, fmt, path):
    """Write `model` to `path` in format `fmt` with Keras's own exporters."""
    import tensorflow as tf

    # Keras's tf2onnx patch probes np.object, which NumPy 2 answers with a FutureWarning: noise here.
    warnings.filterwarnings("ignore", message=".*np.object.*", category=FutureWarning)

    signature = [tf.TensorSpec((None, 28, 28, 1), tf.float32, name=INPUT_NAME)]  # tf2onnx needs it explicit
    if fmt == "keras":
        model.save(path)
    elif fmt == "saved_model":
        model.export(path, format="tf_saved_model", input_signature=signature, verbose=False)
    elif fmt == "onnx":
        model.export(path, format="onnx", input_signature=signature, verbose=False)
    elif fmt == "tflite":  # Keras converts from a SavedModel (TFLiteConverter.from_keras_model fails on Keras 3)
        model.export(path, format="litert", input_signature=signature, verbose=False)


def run_export(fmt, path, x):
    """Probabilities (n, 10) of the export at `path` on float32 images x, in the format's own runtime."""
    batches = [x[i:i + BATCH_SIZE] for i in range(0, len(x), BATCH_SIZE)]
    if fmt == "keras":
        model = keras.models.load_model(path, compile=False)
        outputs = [model.predict(batch, verbose=0) for batch in batches]
    elif fmt == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))  # kept: its variables die with it
        outputs = [loaded.serve(tf.constant(batch)).numpy() for batch in batches]
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        outputs = [session.run(None, {input_name: batch})[0] for batch in batches]
    else:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        input_index = interpreter.get_input_details()[0]["index"]
        output_index = interpreter.get_output_details()[0]["index"]
        outputs = []
        for batch in batches:
            interpreter.resize_tensor_input(input_index, batch.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(input_index, batch)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(output_index).copy())
    return np.concatenate(outputs).astype(np.float64)


def size_of(path):
    """Bytes of a file, or of all the files in a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def put_in_place(new, target, work):
    """Rename `new` to `target`; an existing target folder is moved into `work` first (rename
    cannot replace a folder that has files), so the real name is never half written."""
    if target.is_dir():
        os.replace(target, work / "previous")
    os.replace(new, target)


def claim_scratch(target):
    """A scratch folder beside `target` (same disk: the rename is atomic), locked while this export
    runs. Scratch that a killed export left (`kill -9`, a crash: up to 14 MB each) is removed first: its
    lock is free once its process has gone (a folder without a lock, from an export that died before
    taking it or from before locks, once it is a minute old)."""
    for old in target.parent.glob(f".{target.name}.*"):
        lock_path = old / SCRATCH_LOCK
        try:
            if lock_path.exists():
                with open(lock_path) as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its export has gone
            elif time.time() - old.stat().st_mtime < 60:
                continue
        except (BlockingIOError, FileNotFoundError):
            continue  # another export is running, or has just finished
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    lock = open(work / SCRATCH_LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends, however it ends
    return work, lock


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a trained model and check it against Keras.")
    parser.add_argument("name", help="a model in models/ (NAME or NAME.h5), or a path to one")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="keras (.keras), saved_model (TensorFlow SavedModel folder), onnx (.onnx) "
                             "or tflite (LiteRT .tflite)")
    parser.add_argument("--limit", type=int, default=10000,
                        help="compare on the first N test images (default: 10000, all)")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be at least 1")

    name = models.model_name(args.name)
    if args.format != "keras" and keras.backend.backend() != "tensorflow":
        sys.exit(f"error: --format {args.format} needs KERAS_BACKEND=tensorflow (it is {keras.backend.backend()})")
    try:
        saved = models.load_model(name, as_saved=True)
        x_test, y_test = data.load_data("t10k")
    except (data.DataError, models.ModelError) as e:
        sys.exit(f"error: {e}")
    target = models.model_path(name).parent / FORMATS[args.format].format(name=Path(name).stem)
    x = data.normalize(x_test[:args.limit])[..., None]  # float32 (n, 28, 28, 1) in [0, 1]
    y = y_test[:args.limit]

    model = models.float32_copy(saved)
    start = time.perf_counter()
    reference = np.asarray(model.predict(x, batch_size=BATCH_SIZE, verbose=0), dtype=np.float64)
    keras_seconds = time.perf_counter() - start

    work, lock = claim_scratch(target)
    try:
        new = work / target.name
        start = time.perf_counter()
        try:
            export(model, args.format, new)
        except ImportError as e:
            sys.exit(f"error: --format {args.format} needs {e.name}: pip install -r requirements.txt")
        except Exception as e:  # the converters raise many types; say which in one line
            if machine.out_of_space(e):
                sys.exit(f"error: no space left on the disk in {target.parent} for the {args.format} export of "
                         f"{name} (it needs at least {machine.size_text(size_of(work))}); nothing was written: "
                         f"free some space and run again")
            sys.exit(f"error: the {args.format} export of {name} failed ({machine.reason(e)}); nothing was written")
        export_seconds = time.perf_counter() - start
        start = time.perf_counter()
        exported = run_export(args.format, new, x)
        run_seconds = time.perf_counter() - start

        agreement = float((exported.argmax(axis=1) == reference.argmax(axis=1)).mean())
        largest_difference = float(np.abs(exported - reference).max())
        if exported.shape != reference.shape or not np.isfinite(exported).all() or agreement < MIN_AGREEMENT:
            sys.exit(f"error: the {args.format} export of {name} agrees with Keras on only {agreement * 100:.2f} % of "
                     f"{len(y)} test images (at least {MIN_AGREEMENT * 100:.1f} % needed); nothing was written")
        put_in_place(new, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.close()

    print(f"Exported: {target} ({size_of(target) / 1e6:.1f} MB) in {export_seconds:.1f} s")
    print(f"Agreement with Keras on {len(y)} test images: {agreement * 100:.2f} % of the predicted classes; "
          f"largest probability difference: {largest_difference:.2e}")
    print(f"Test accuracy: {(exported.argmax(axis=1) == y).mean():.4f} "
          f"(Keras: {(reference.argmax(axis=1) == y).mean():.4f})")
    print(f"Time for {len(y)} images: {run_seconds:.1f} s in the export's runtime, {keras_seconds:.1f} s in Keras "
          f"(CPU, {os.cpu_count()} cores)")
    if model is not saved:  # say what computing in float32 changes against the model as saved
        as_saved = models.predict(saved, x_test[:args.limit])
        policy = saved.layers[0].dtype_policy.name
        print(f"Note: {name} computes in {policy} as saved, the export in float32: the same class for "
              f"{(as_saved.argmax(axis=1) == reference.argmax(axis=1)).mean() * 100:.2f} % of the test images; "
              f"test accuracy as saved {(as_saved.argmax(axis=1) == y).mean():.4f}")


if __name__ == "__main__":
    machine.run(main)
