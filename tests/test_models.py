"""models.py: the original write-up's architecture exactly, the other --arch networks, and safe
saving and loading by name."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import models

SEED_LAYERS = [
    "BatchNormalization", "Conv2D", "BatchNormalization", "Conv2D", "MaxPooling2D", "Dropout",
    "Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Dropout", "Dense", "Dropout",
    "BatchNormalization", "Dense",
]
SEED_PARAMS = [4, 640, 256, 36928, 0, 0, 73856, 0, 0, 0, 3211776, 0, 131328, 0, 1024, 2570]


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def model():
    return models.build_cnn()


def test_layers_and_parameters_are_the_seeds(model):
    assert [type(layer).__name__ for layer in model.layers] == SEED_LAYERS
    assert [layer.count_params() for layer in model.layers] == SEED_PARAMS
    assert model.count_params() == 3_458_382
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert non_trainable == 642
    assert model.output_shape == (None, 10)
    assert model.layers[-1].activation.__name__ == "softmax"


# --arch: parameters and forward MFLOP per image, pinned (a change to a network shows here first)
ARCHITECTURES = {"seed": (3_458_382, 94.3), "small": (293_594, 31.8), "mid": (658_114, 71.3), "wide": (1_167_786, 126.7)}
SEED_CONFIG = Path(__file__).parent / "seed_cnn_config.json"  # models.build_cnn().to_json() before --arch


def test_every_architecture_is_pinned_and_under_the_parameter_budget():
    assert set(models.ARCHITECTURES) == set(ARCHITECTURES)
    for arch, (parameters, mflop) in ARCHITECTURES.items():
        network = models.build_cnn(arch=arch, compile=False)
        assert network.count_params() == parameters <= 3_500_000, arch
        assert round(models.mflops(network), 1) == mflop, arch
        assert network.input_shape == (None, 28, 28, 1) and network.output_shape == (None, 10)
        assert network.layers[-1].activation.__name__ == "softmax" and network.layers[-1].dtype_policy.name == "float32"
        # standard layers only: Keras rebuilds it from its config alone
        assert keras.models.model_from_json(network.to_json()).count_params() == parameters
    with pytest.raises(ValueError, match="arch must be one of seed, small, mid, wide"):
        models.build_cnn(arch="resnet")


def test_the_mflop_count_is_the_convolutions_and_dense_layers_multiply_adds():
    # a 3x3 convolution of 1 to 8 channels over 28x28, then dense 8*28*28 -> 10
    network = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3, padding="same"),
                                keras.layers.Flatten(), keras.layers.Dense(10)])
    assert models.mflops(network) == pytest.approx(2 * (28 * 28 * 9 * 8 + 8 * 28 * 28 * 10) / 1e6)


def test_arch_seed_is_byte_for_byte_the_old_model_config():
    """The default network and --arch seed: the very config build_cnn gave before --arch existed.
    In a fresh process each, as the layers' automatic names count the layers made before them."""
    for call in ("models.build_cnn()", "models.build_cnn(arch='seed')"):
        config = subprocess.run([sys.executable, "-c", f"import models; print({call}.to_json())"],
                                cwd=Path(models.__file__).parent, capture_output=True, text=True, check=True).stdout
        assert config == SEED_CONFIG.read_text(), call


@pytest.mark.parametrize("preset, expected", [
    ("full_1", [0.3, 0.4, 0.5, 0.5]),  # the original write-up's code, its two runs
    ("full_2", [0.2, 0.3, 0.5, 0.35]),
])
def test_dropout_presets_are_the_original_runs_rates(preset, expected):
    rates = [layer.rate for layer in models.build_cnn(preset, compile=False).layers
             if isinstance(layer, keras.layers.Dropout)]
    assert rates == expected
    with pytest.raises(KeyError):
        models.build_cnn("full_3")


def test_optimizers_are_compiled_in(model):
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    sgd = models.build_cnn(optimizer="sgd", learning_rate=0.05)
    assert isinstance(sgd.optimizer, keras.optimizers.SGD)
    assert float(keras.ops.convert_to_numpy(sgd.optimizer.learning_rate)) == pytest.approx(0.05)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_save_load_predict_gives_identical_outputs(models_dir, model, suffix):
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    path = models.save_model(model, "mine", {"note": "a test"}, suffix=suffix)
    assert path == models_dir / f"mine{suffix}"
    assert json.loads((models_dir / "mine.json").read_text()) == {"note": "a test"}
    assert models.available_models() == ["mine"]
    loaded = models.load_model("mine")
    assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    plain = keras.models.load_model(path)  # no custom objects needed
    assert plain.count_params() == model.count_params()


def test_a_keras_file_saved_after_an_h5_one_keeps_the_optimizer(models_dir):
    model = models.build_cnn(optimizer="sgd", learning_rate=0.05)
    models.save_model(model, "first")  # .h5 with its optimizer
    path = models.save_model(model, "then", suffix=".keras")
    plain = keras.models.load_model(path)
    assert isinstance(plain.optimizer, keras.optimizers.SGD)
    assert len(plain.optimizer.variables) == len(model.optimizer.variables)


def test_an_interrupted_save_leaves_no_file(models_dir, model, monkeypatch):
    def broken_save(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        models.save_model(model, "mine", {"x": 1})
    assert list(models_dir.iterdir()) == []


def test_a_missing_model_lists_the_ones_that_exist(models_dir, model):
    models.save_model(model, "best")
    with pytest.raises(models.ModelError, match=r"no model named 'nope'.*available: best"):
        models.load_model("nope")


def test_a_file_that_is_not_a_model_gets_a_clear_error(models_dir):
    (models_dir / "junk.h5").write_bytes(b"not an HDF5 file")
    with pytest.raises(models.ModelError, match="junk.h5 is not a readable Keras model"):
        models.load_model("junk")


def test_a_model_with_the_wrong_input_shape_is_refused(models_dir):
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
    models.save_model(other, "cifar")
    with pytest.raises(models.ModelError, match=r"takes \(32, 32, 3\)"):
        models.load_model("cifar")


def test_a_name_may_carry_its_suffix_and_each_file_is_listed_once(models_dir, model):
    models.save_model(model, "evil")
    models.save_model(model, "evil", suffix=".keras")
    models.save_model(model, "plain", suffix=".keras")
    assert models.model_path("evil.h5") == models_dir / "evil.h5"
    assert models.model_path("evil") == models_dir / "evil.h5"  # .h5 loads when both exist
    assert models.model_path("plain.keras") == models.model_path("plain") == models_dir / "plain.keras"
    assert models.model_name("best.h5") == "best"
    assert models.available_models() == ["evil (evil.h5 loads, evil.keras too)", "plain"]
    assert models.load_model("plain.keras").count_params() == 3_458_382


@pytest.mark.parametrize("content", ['{"test_accuracy": "0.95"}', '{"test_accuracy": [1]}', "null", "[1, 2]",
                                     '{"test_accuracy": NaN}', "{not json"])
def test_a_sidecar_json_with_bad_figures_is_ignored_with_a_warning(models_dir, model, content, capsys):
    models.save_model(model, "odd")
    (models_dir / "odd.json").write_text(content)
    info = models.read_info("odd")
    assert "test_accuracy" not in info
    assert "warning: ignoring" in capsys.readouterr().err


def test_calibrating_keeps_the_argmax_and_temperature_one_changes_nothing():
    p = np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])
    assert np.allclose(models.calibrate(p, 1.0), p)
    softer = models.calibrate(p, 2.0)
    assert np.array_equal(softer.argmax(axis=1), p.argmax(axis=1)) and np.allclose(softer.sum(axis=1), 1)
    assert softer.max() < p.max()


def test_the_shipped_mixed_precision_model_computes_in_float32_unless_asked_as_saved():
    """best.h5 keeps its training policy (mixed_bfloat16), which each CPU emulates its own way; loaded
    for use it computes in float32, the same figure everywhere (0.9483, as its ONNX export does)."""
    import data

    as_saved = models.load_model("best", as_saved=True)
    model = models.load_model("best")
    assert {layer.dtype_policy.name for layer in as_saved.layers} >= {"mixed_bfloat16"}
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), as_saved.get_weights()))
    x_test, y_test = data.load_data("t10k")
    accuracy, _ = models.scores(models.predict(model, x_test), y_test)
    assert round(accuracy, 4) == 0.9483 == models.read_info("best")["test_accuracy"]


def test_ema_makes_the_average_of_the_weights_the_model_every_n_steps():
    model = models.build_cnn(optimizer="sgd", learning_rate=0.1, weight_decay=0.5, arch="small", ema=0.5, ema_every=3)
    variables = model.trainable_variables
    start = [np.array(v) for v in variables]
    averages = []
    # No gradient: each step the decay alone moves the weights, w -> 0.95 w; the average after
    # step 1 is w1, then 0.5 * average + 0.5 * w.
    for step in range(1, 4):
        model.optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in variables])
        raw = [0.95 ** step * w for w in start]
        averages = raw if step == 1 else [0.5 * a + 0.5 * w for a, w in zip(averages, raw)]
        now = [np.array(v) for v in variables]
        expected = averages if step == 3 else raw  # step 3 copies the average into the model
        assert all(np.allclose(a, b, rtol=1e-5) for a, b in zip(now, expected))
    assert not np.allclose(averages[0], 0.95 ** 3 * start[0])  # the copy changed the weights
    saved = keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer))  # a plain Keras optimizer
    assert (saved.use_ema, saved.ema_momentum, saved.ema_overwrite_frequency) == (True, 0.5, 3)


@pytest.mark.parametrize("decay_batchnorm", [True, False])
def test_decay_batchnorm_says_whether_batchnorm_scales_decay(decay_batchnorm):
    model = models.build_cnn(optimizer="sgd", learning_rate=0.1, weight_decay=0.5, arch="small",
                             decay_batchnorm=decay_batchnorm)
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    scales = [layer.gamma for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before = [np.array(v) for v in kernels + scales]
    # No gradient: what moves is the decay alone (each variable shrinks by lr x decay = 5 %).
    model.optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
    after = [np.array(v) for v in kernels + scales]
    for old, new in zip(before[:len(kernels)], after[:len(kernels)]):
        assert np.allclose(new, 0.95 * old)
    for old, new in zip(before[len(kernels):], after[len(kernels):]):
        assert np.allclose(new, 0.95 * old if decay_batchnorm else old)
