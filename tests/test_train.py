"""train.py as the recipe: its settings and flags, its schedule, its feed of batches, and whole runs
on small subsets (in-process: train.main with models/ and screenshots/ moved to a temporary
folder) of what the recipe's settings change. A run's life (names, resume, Ctrl-C, the record) is
tested in test_runs.py; runs under JAX in test_distribute.py.
"""

import functools
import math

import keras
import numpy as np
import pytest

import backend
import feed
import machine
import models
import runs
import train
from sandbox import TINY, info, run


# ---- Pure parts ----

def test_flags_override_the_recipe_and_the_rest_comes_from_it():
    args, settings = train.parse_args(["--recipe", "fast", "--lr", "0.01", "--dropout", "full_2"])
    assert settings == {**train.RECIPES["fast"], "lr": 0.01, "dropout": "full_2"}
    args, settings = train.parse_args([])
    assert settings == train.RECIPES["original"] and args.seed == train.SEED and args.name is None
    assert settings["erase_fill"] == "box" and train.RECIPES["fast"]["erase_fill"] == "pixel"
    assert settings["erase_placement"] == "original" and train.RECIPES["fast"]["erase_placement"] == "paper"


def test_a_run_recorded_before_a_setting_existed_goes_on_as_it_ran():
    """Such runs (full_1 and full_2 among them) lack the settings added since. They placed their
    boxes as the paper says, erased half the images, shifted none, used the seed's network and
    decayed every variable, and averaged no weights; their --resume (and the seeds benchmark's check) must take them so."""
    recorded = {key: value for key, value in train.RECIPES["original"].items() if key not in runs.ADDED_SETTINGS}
    assert feed.erasing_of(runs.as_run(recorded)) == {"erase_p": 0.5, "fill": "box", "placement": "paper"}
    assert feed.erasing_of(train.RECIPES["original"]) == {"erase_p": 0.5, "fill": "box", "placement": "original"}
    assert runs.as_run(recorded) == {**recorded, "arch": "seed", "erase_placement": "paper", "translate": 0,
                                     "erase_p": 0.5, "decay_batchnorm": True, "ema": 0.0}
    assert set(runs.as_run(recorded)) == set(train.RECIPES["original"])
    assert runs.as_run(train.RECIPES["quick"]) == train.RECIPES["quick"]  # a setting it has is its own


@pytest.mark.parametrize("erase_p, erased", [(0.0, 0), (1.0, 64)])
def test_erase_p_sets_the_share_of_images_erased(erase_p, erased):
    x = np.full((64, 28, 28), 200, np.uint8)  # no garment is its own mirror image but a flat one
    settings = {**train.RECIPES["quick"], "translate": 0, "erase_p": erase_p, "batch_size": 64}
    images, _ = next(feed.batches(x, np.zeros(64, int), settings, seed=1, first_epoch=0))
    assert int((images != images[:, :1, :1]).any(axis=(1, 2, 3)).sum()) == erased


def test_every_setting_has_a_flag_with_its_defaults_in_the_help(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, default in train.RECIPES["original"].items():
        assert f"--{key.replace('_', '-')}" in text
        shown = "; ".join(f"{name}: {recipe[key]}" for name, recipe in train.RECIPES.items())
        assert f"({shown})" in text and shown.startswith(f"original: {default}; fast: ")
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
    (["--ema", "1"], "--ema must be at least 0 and below 1"),
    (["--ema", "-0.5"], "--ema must be at least 0 and below 1"),
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
    epochs, seconds = backend.epoch_budget(60, 1000, 4000, 51000, 9000, 10000)
    assert seconds == pytest.approx(54.25)
    assert epochs == int((3600 - 2 * 19000 / 4000) // 54.25) == 66
    assert backend.epoch_budget(0.01, 1000, 4000, 51000, 9000, 10000)[0] == 1  # never less than one


def test_batches_cover_each_epoch_once_seeded_by_seed_and_epoch():
    x = np.arange(1000, dtype=np.uint8).reshape(-1, 1, 1).repeat(28, 1).repeat(28, 2)[:1000]
    y = np.arange(1000) % 10
    settings = dict(train.RECIPES["original"], batch_size=300)
    x_images, y_images = feed.training_images(x, y, settings, seed=3)
    assert len(x_images) == 3000 and np.array_equal(x_images[:1000], x)  # originals, then 2 copies
    stream = feed.batches(x_images, y_images, settings, seed=3, first_epoch=0)
    steps = math.ceil(3000 / 300)
    epoch0 = [next(stream) for _ in range(steps)]
    epoch1 = [next(stream) for _ in range(steps)]
    labels0 = np.concatenate([b[1] for b in epoch0])
    assert sorted(labels0.tolist()) == sorted(y_images.tolist())  # every image once
    assert epoch0[0][0].shape == (300, 28, 28, 1) and epoch0[0][0].dtype == np.float32
    assert not np.array_equal(labels0, np.concatenate([b[1] for b in epoch1]))  # reshuffled
    # A stream started at epoch 1 (a resumed run) gives what the unbroken stream gave.
    resumed = feed.batches(x_images, y_images, settings, seed=3, first_epoch=1)
    for expected in epoch1:
        got = next(resumed)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


# ---- Whole runs, in-process ----


def test_bfloat16_on_a_cpu_that_emulates_it_is_run_as_asked_with_a_warning(project, monkeypatch, capsys):
    """--mixed-precision (and --resume of such a run) on a CPU without AVX512_BF16 or AMX: bfloat16 as
    asked, and one line that says it is emulated and what to do; "auto" picks float32 there."""
    assert machine.cpu_emulates_bf16({"avx2", "fma"}) and not machine.cpu_emulates_bf16(set())
    assert not machine.cpu_emulates_bf16({"avx2", "avx512_bf16"}) and not machine.cpu_emulates_bf16({"amx_bf16"})
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"sse2", "avx2", "fma"})
    run("--mixed-precision", "--epochs", "1", *TINY[2:], "--name", "emulated")
    assert info("emulated")["dtype_policy"] == "mixed_bfloat16"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "bfloat16 is emulated" in line]
    assert warnings == [backend.bf16_warning(resuming=False)] and "leave out --mixed-precision" in warnings[0]
    run("--resume", "--epochs", "2", "--name", "emulated")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "bfloat16 is emulated" in line]
    assert warnings == [backend.bf16_warning(resuming=True)] and "continue it on a CPU with" in warnings[0]
    assert backend.set_precision("auto") == "float32"
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert backend.set_precision("auto") == "mixed_bfloat16"


def test_all_data_and_minutes(project, monkeypatch):
    # The timing probe's size is not what is tested here: 2 steps instead of 8.
    monkeypatch.setattr(backend, "time_this_machine", functools.partial(backend.time_this_machine, probe_steps=2))
    run("--recipe", "fast", "--all-data", "--minutes", "0.05", *TINY[2:], "--name", "everything")
    record = info("everything")
    assert record["all_data"] is True and record["val_accuracy"] is None and "best_epoch" not in record
    assert not (project / "models" / "everything_acc.h5").exists()
    history = np.genfromtxt(project / "models" / "everything.csv", delimiter=",", names=True)
    assert np.isnan(history["val_accuracy"]).all()  # Keras's CSVLogger writes NA
    assert record["epochs_done"] == record["settings"]["epochs"] >= 1
    assert record["timed"]["train_images_per_s"] > 0 and record["timed"]["epoch_seconds"] > 0


def test_translation_shifts_each_image_by_its_own_offset_within_the_limit():
    x = np.zeros((500, 28, 28), dtype=np.uint8)
    x[:, 10:18, 10:18] = 200  # a block well inside: every shift keeps it whole
    shifted = feed.translate(x, np.random.default_rng(0), 3)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    assert (shifted.sum(axis=(1, 2)) == x.sum(axis=(1, 2))).all()  # moved, not cut
    rows, cols = [np.array([np.flatnonzero(img.any(axis=axis))[0] for img in shifted]) - 10 for axis in (1, 0)]
    assert rows.min() == cols.min() == -3 and rows.max() == cols.max() == 3  # every offset, none further
    assert len({(r, c) for r, c in zip(rows, cols)}) == 49
    assert feed.translate(x, np.random.default_rng(0), 0) is x
    settings = dict(train.RECIPES["fast"], batch_size=100, translate=2)
    one, again = (feed.batches(x, np.zeros(500, int), settings, seed=5, first_epoch=3) for _ in range(2))
    assert np.array_equal(next(one)[0], next(again)[0])  # seeded by (seed, epoch), as the rest of the feed


def reference_translate(x, rng, pixels):
    """feed.translate one image at a time, the plain way: the same offsets drawn, each image padded
    with zeros and cut back to its size at its own offset."""
    height, width = x.shape[1:3]
    down, right = rng.integers(0, 2 * pixels + 1, size=(2, len(x)))
    out = np.empty_like(x)
    for i, image in enumerate(x):
        padded = np.pad(image, ((pixels, pixels), (pixels, pixels)) + ((0, 0),) * (image.ndim - 2))
        out[i] = padded[down[i]:down[i] + height, right[i]:right[i] + width]
    return out


@pytest.mark.parametrize("pixels, shape", [(1, (300, 28, 28)), (2, (300, 28, 28)), (8, (50, 28, 28)),
                                           (2, (40, 28, 28, 1))])
def test_translation_is_exactly_the_per_image_reference_and_seeded(pixels, shape):
    x = np.random.default_rng(7).integers(0, 256, size=shape, dtype=np.uint8)
    fast = feed.translate(x, np.random.default_rng(11), pixels)
    assert np.array_equal(fast, reference_translate(x, np.random.default_rng(11), pixels))
    assert np.array_equal(fast, feed.translate(x, np.random.default_rng(11), pixels))  # seeded
    assert not np.array_equal(fast, feed.translate(x, np.random.default_rng(12), pixels))


def test_translation_goes_with_online_augmentation_only(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--translate", "2"])  # the original recipe makes fixed copies
    assert "--translate must be 0 to 8 pixels, and goes with --augment online" in capsys.readouterr().err
    assert train.parse_args(["--recipe", "fast", "--translate", "2"])[1]["translate"] == 2


@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_one_epoch_of_each_architecture_trains_saves_and_reloads_in_plain_keras(project, arch, capsys):
    # 1,700 training images in 10 whole steps of 170, 300 to validate; the quick recipe's other settings
    run("--recipe", "quick", "--arch", arch, "--epochs", "1", "--limit", "2000", "--batch-size", "170",
        "--name", arch)
    record = info(arch)
    network = keras.models.load_model(project / "models" / f"{arch}.h5")  # Keras alone, no project code
    assert record["arch"] == arch and record["parameters"] == network.count_params()
    assert record["mflop_per_image"] == round(models.mflops(network), 1) > 0
    assert f"Network: {arch}, {record['parameters']:,} parameters, {record['mflop_per_image']:g} MFLOP" \
        in capsys.readouterr().out
    assert record["epochs_done"] == 1 and 0 <= record["val_accuracy"] <= 1 and record["command_seconds"] > 0
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    assert np.allclose(network.predict(x, verbose=0).sum(axis=1), 1, atol=1e-5)
