"""export.py: each format is written, runs in its own runtime and agrees with Keras."""

import shutil

import keras
import numpy as np
import pytest

import data
import export
import models

N_IMAGES = 300  # test images compared: a few hundred keeps each round trip to seconds


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    """A little CNN trained for one pass, under mixed precision as the shipped models were, so the
    export's float32 copy is exercised too; trained once for this file's tests."""
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        small = keras.Sequential([
            keras.Input((28, 28, 1)),
            keras.layers.BatchNormalization(),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ])
    finally:
        keras.config.set_dtype_policy("float32")
    x, y = data.load_data("train")
    small.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    small.fit(data.normalize(x[:2000])[..., None], y[:2000], epochs=1, batch_size=100, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "small.h5"
    small.save(path)
    return path


@pytest.fixture
def models_dir(tmp_path, monkeypatch, small_h5):
    """models/ of its own, with `small` in it."""
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    shutil.copy(small_h5, tmp_path / "small.h5")
    return tmp_path


def reload_and_predict(fmt, path, x):
    """The export's probabilities for float32 images x, loaded the way a user of that format would."""
    if fmt == "keras":
        return keras.models.load_model(path).predict(x, verbose=0)
    if fmt == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))  # held: its variables go when it goes
        return loaded.serve(tf.constant(x)).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape[1:] == [28, 28, 1]
        return session.run(None, {"images": x})[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("fmt, written", [("keras", "small.keras"), ("saved_model", "small_saved_model"),
                                          ("onnx", "small.onnx"), ("tflite", "small.tflite")])
def test_each_format_round_trips_and_agrees_with_keras(models_dir, capsys, fmt, written):
    export.main(["small.h5", "--format", fmt, "--limit", str(N_IMAGES)])
    out = capsys.readouterr().out
    assert f"Agreement with Keras on {N_IMAGES} test images: 100.00 % of the predicted classes" in out
    assert "computes in mixed_bfloat16 as saved, the export in float32" in out
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(["small.h5", written])  # no temporary left

    # Loaded here the plain way, the export takes pixels / 255 and gives Keras's probabilities.
    x = data.normalize(data.load_data("t10k")[0][:20])[..., None]
    expected = models.load_model("small").predict(x, verbose=0)
    probabilities = reload_and_predict(fmt, models_dir / written, x)
    assert probabilities.shape == (20, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(probabilities, expected, atol=1e-4)


def test_a_saved_model_folder_is_replaced_whole(models_dir, capsys):
    export.main(["small", "--format", "saved_model", "--limit", "50"])
    (models_dir / "small_saved_model" / "stale.txt").write_text("from an earlier export")
    export.main(["small", "--format", "saved_model", "--limit", "50"])
    assert not (models_dir / "small_saved_model" / "stale.txt").exists()
    assert (models_dir / "small_saved_model" / "saved_model.pb").is_file()
    assert sorted(p.name for p in models_dir.iterdir()) == ["small.h5", "small_saved_model"]


def test_an_export_that_disagrees_is_deleted_and_said_in_one_line(models_dir, monkeypatch):
    def wrong_runtime(fmt, path, x):
        return np.roll(np.eye(10)[np.arange(len(x)) % 10], 1, axis=1)  # made-up probabilities

    monkeypatch.setattr(export, "run_export", wrong_runtime)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["small", "--format", "onnx", "--limit", "100"])
    message = str(exit_info.value)
    assert message.startswith("error: the onnx export of small agrees with Keras on only ")
    assert message.endswith("nothing was written") and "\n" not in message
    assert [p.name for p in models_dir.iterdir()] == ["small.h5"]


def test_an_unknown_model_is_one_line(models_dir):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["nope", "--format", "onnx"])
    assert str(exit_info.value).startswith("error: no model named 'nope'")


def test_scratch_left_by_a_killed_export_is_removed_by_the_next_one(models_dir, tmp_path, capsys):
    """kill -9 during an export leaves its scratch folder (up to 14 MB): the next export removes it,
    and an old one from before the scratch had a lock, but never the scratch of an export still running."""
    import fcntl
    import os
    import time

    killed = models_dir / ".small.onnx.killed"
    killed.mkdir()
    (killed / export.SCRATCH_LOCK).write_text("")  # its lock went with its process
    (killed / "small.onnx").write_bytes(b"\0" * 1000)
    older = models_dir / ".small.onnx.older"  # no lock, an hour old
    older.mkdir()
    os.utime(older, (time.time() - 3600,) * 2)
    running = models_dir / ".small.onnx.running"
    running.mkdir()
    with open(running / export.SCRATCH_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the export that made it holds it
        export.main(["small", "--format", "onnx", "--limit", "50"])
        assert sorted(p.name for p in models_dir.iterdir()) == [".small.onnx.running", "small.h5", "small.onnx"]


def test_a_full_disk_during_an_export_is_one_line_and_writes_nothing(models_dir, monkeypatch):
    def fills_up(model, fmt, path):
        path.write_bytes(b"\0" * 200_000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "export", fills_up)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["small", "--format", "onnx", "--limit", "50"])
    assert str(exit_info.value) == (f"error: no space left on the disk in {models_dir} for the onnx export of small "
                                    f"(it needs at least 0.2 MB); nothing was written: free some space and run again")
    assert [p.name for p in models_dir.iterdir()] == ["small.h5"]
