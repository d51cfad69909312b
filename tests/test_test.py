"""test.py: calibration figures (ECE, NLL), temperature scaling fitted on validation only, plots."""

import json

import keras
import numpy as np
import pytest

import data
import models
import test as test_script

N_TRAIN = 400  # the tiny models' "training file": the last 15 % (60 images) is their validation split


def test_ece_matches_the_definition_on_a_hand_made_example():
    # Bin m holds top probabilities in ((m-1)/15, m/15]. Six images:
    #   0.95, 0.95, 0.97 -> bin 15 (above 14/15 = 0.933): the first two right, the third wrong;
    #   0.55             -> bin 9 (0.533, 0.6]: wrong;
    #   0.50, 0.50       -> bin 8 (0.467, 0.533]: one right, one wrong.
    probabilities = np.array([
        [0.95, 0.05, 0.00], [0.95, 0.00, 0.05], [0.02, 0.97, 0.01],
        [0.55, 0.45, 0.00], [0.30, 0.20, 0.50], [0.50, 0.25, 0.25],
    ])
    labels = np.array([0, 0, 0, 1, 2, 1])
    bin_15 = 3 / 6 * abs(2 / 3 - (0.95 + 0.95 + 0.97) / 3)
    bin_9 = 1 / 6 * abs(0 / 1 - 0.55)
    bin_8 = 2 / 6 * abs(1 / 2 - (0.50 + 0.50) / 2)
    assert bin_15 + bin_9 + bin_8 == pytest.approx(0.2366667, abs=1e-6)
    assert test_script.expected_calibration_error(probabilities, labels) == pytest.approx(bin_15 + bin_9 + bin_8)
    counts, accuracy, confidence = test_script.reliability(probabilities, labels)
    assert counts.sum() == 6 and (counts[14], counts[8], counts[7]) == (3, 1, 2)
    assert accuracy[7] == 0.5 and confidence[8] == pytest.approx(0.55)
    # Perfectly calibrated: confidence 0.8 for all and 4 of 5 right.
    flat = np.tile([0.8, 0.2], (5, 1))
    assert test_script.expected_calibration_error(flat, np.array([0, 0, 0, 0, 1])) == pytest.approx(0.0)


def test_temperature_scaling_lowers_the_nll_of_over_confident_probabilities_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(3000, 10))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(10, p=p) for p in true])  # labels drawn from the true probabilities
    over_confident = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)

    temperature = test_script.fit_temperature(over_confident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)  # it undoes the factor 3
    calibrated = models.calibrate(over_confident, temperature)
    assert test_script.nll(calibrated, labels) < test_script.nll(over_confident, labels) - 0.1
    assert test_script.nll(over_confident, labels, temperature) == pytest.approx(test_script.nll(calibrated, labels))
    assert (test_script.expected_calibration_error(calibrated, labels)
            < test_script.expected_calibration_error(over_confident, labels))
    assert np.array_equal(calibrated.argmax(axis=1), over_confident.argmax(axis=1))
    assert np.allclose(calibrated.sum(axis=1), 1.0)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A models/ and screenshots/ of their own, a tiny model `mine`, and small made-up data in
    which 95 % of the test labels are the model's own predictions but only 40 % of the training
    labels: a temperature fitted on the test set would be far smaller than one fitted on validation."""
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(test_script, "SCREENSHOTS_DIR", tmp_path / "screenshots")
    (tmp_path / "models").mkdir()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    model.save(tmp_path / "models" / "mine.h5")
    info = {"recipe": "tiny", "settings": {"epochs": 1}, "seed": 1, "limit": N_TRAIN, "note": "kept"}
    models.write_json(tmp_path / "models" / "mine.json", info)

    rng = np.random.default_rng(1)

    def made_up(n, share_predicted):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        predicted = models.predict(model, x).argmax(axis=1)
        y = np.where(rng.random(n) < share_predicted, predicted, rng.integers(0, 10, size=n))
        return x, y.astype(np.uint8)

    x_train, y_train = made_up(1000, 0.4)
    x_test, y_test = made_up(200, 0.95)
    splits = {"train": (x_train, y_train), "t10k": (x_test, y_test)}
    reads = []

    def load_data(kind, data_dir=None):
        reads.append(kind)
        return splits[kind]

    monkeypatch.setattr(data, "load_data", load_data)
    return tmp_path, model, splits, reads


def test_calibrate_fits_on_the_validation_split_and_keeps_the_rest_of_the_json(project, capsys):
    folder, model, splits, reads = project
    test_script.main(["mine", "--calibrate"])
    assert reads == ["train", "t10k"]  # the test set is read only after the temperature is stored

    x_train, y_train = splits["train"]
    _, (x_val, y_val) = data.split_data(x_train[:N_TRAIN], y_train[:N_TRAIN])  # the JSON's limit
    assert len(y_val) == 60
    on_validation = test_script.fit_temperature(models.predict(model, x_val), y_val)
    on_test = test_script.fit_temperature(models.predict(model, splits["t10k"][0]), splits["t10k"][1])
    info = json.loads((folder / "models" / "mine.json").read_text())
    assert info["temperature"] == pytest.approx(on_validation, rel=1e-4)
    assert min(test_script.TEMPERATURE_RANGE) < on_test < on_validation / 2 < max(test_script.TEMPERATURE_RANGE)
    assert info["note"] == "kept" and info["limit"] == N_TRAIN and "temperature_from" not in info

    out = capsys.readouterr().out
    assert "Model: mine calibrated (temperature" in out
    assert out.count("Test accuracy:") == 2 and out.count("ECE: ") == 2 and out.count("NLL: ") == 2
    assert out.count("Confident errors: ") == 2


def test_a_model_trained_on_all_data_borrows_its_recipes_temperature(project, capsys):
    folder, model, _, _ = project
    model.save(folder / "models" / "mine_all.h5")
    models.write_json(folder / "models" / "mine_all.json",
                      {"recipe": "tiny", "settings": {"epochs": 1}, "seed": 1, "limit": N_TRAIN, "all_data": True})
    models.write_json(folder / "models" / "other.json", {"recipe": "other", "settings": {"epochs": 1}})
    model.save(folder / "models" / "other.h5")

    test_script.main(["mine_all.h5", "--calibrate"])  # a name with its suffix is accepted
    mine = json.loads((folder / "models" / "mine.json").read_text())
    mine_all = json.loads((folder / "models" / "mine_all.json").read_text())
    assert mine_all["temperature_from"] == "mine"
    assert mine_all["temperature"] == mine["temperature"]
    assert mine_all["all_data"] is True
    assert "Model: mine_all calibrated" in capsys.readouterr().out

    # Without a model of the same recipe, one line says what to do.
    (folder / "models" / "mine.json").write_text(json.dumps({"recipe": "changed"}))
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(["mine_all", "--calibrate"])
    assert "--calibrate-from" in str(exit_info.value) and str(exit_info.value).startswith("error: ")
    test_script.main(["mine_all", "--calibrate", "--calibrate-from", "other"])
    assert json.loads((folder / "models" / "mine_all.json").read_text())["temperature_from"] == "other"


def test_the_plots_go_to_screenshots_name_and_include_the_reliability_diagram(project, capsys):
    folder, model, _, _ = project
    test_script.main(["mine"])
    for png in ["Confusion_matrix.png", "Incorrect_classifications.png", "Reliability_diagram.png"]:
        assert (folder / "screenshots" / "mine" / png).stat().st_size > 10_000
    assert not (folder / "screenshots" / "Reliability_diagram.png").exists()  # only best's go there
    assert "ECE: " in capsys.readouterr().out

    model.save(folder / "models" / "best.h5")
    test_script.main(["best"])
    assert (folder / "screenshots" / "Reliability_diagram.png").stat().st_size > 10_000
    test_script.main(["mine", "best", "--plots-dir", str(folder / "elsewhere")])
    assert (folder / "elsewhere" / "Reliability_diagram.png").exists()


def test_an_unwritable_plots_folder_is_one_line_before_any_model_is_loaded(project, monkeypatch):
    folder, _, _, reads = project
    (folder / "a_file").write_text("not a folder")

    def must_not_load(name, compile=False):
        raise AssertionError("a model was loaded before the plots folder was checked")

    monkeypatch.setattr(models, "load_model", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(["mine", "--plots-dir", str(folder / "a_file" / "plots")])
    assert str(exit_info.value).startswith("error: cannot write the plots to ")
    assert reads == []


def test_an_unknown_model_is_one_line_and_leaves_no_empty_plots_folder(project):
    folder, _, _, _ = project
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(["nope"])
    assert str(exit_info.value).startswith("error: no model named 'nope'")
    assert not (folder / "screenshots" / "nope").exists()


def test_an_ensemble_is_reported_on_the_validation_split_its_members_share_before_the_test_set(project, capsys):
    folder, model, splits, reads = project
    keras.utils.set_random_seed(1)
    other = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    other.save(folder / "models" / "other.h5")
    models.write_json(folder / "models" / "other.json", {"recipe": "tiny", "settings": {"epochs": 1}, "seed": 2,
                                                         "limit": N_TRAIN})
    test_script.main(["mine", "other", "--calibrate", "--tta"])
    assert reads == ["train", "train", "train", "t10k"]  # two members' temperatures, the ensemble's split; then test

    x_train, y_train = splits["train"]
    _, (x_val, y_val) = data.split_data(x_train[:N_TRAIN], y_train[:N_TRAIN])
    mean = (models.predict(model, x_val) + models.predict(other, x_val)) / 2
    temperature = test_script.fit_temperature(mean, y_val)
    out = capsys.readouterr().out
    assert (f"Model: ensemble of mine + other: validation accuracy {models.scores(mean, y_val)[0]:.4f}, "
            f"loss {models.scores(mean, y_val)[1]:.4f} (60 images" in out)
    assert f"Model: ensemble of mine + other calibrated (temperature {temperature:.4f}" in out
    assert "Model: ensemble of mine + other with TTA" in out
    x_test, y_test = splits["t10k"]
    expected = (models.predict(model, x_test) + models.predict(other, x_test)) / 2
    ensemble = out[out.index("Model: ensemble of mine + other\n"):]
    assert ensemble.splitlines()[1] == f"Test accuracy: {models.scores(expected, y_test)[0]:.4f}"
    # 3 models x (plain, calibrated, TTA) test reports
    assert out.count("Test accuracy:") == 9
    assert not list((folder / "models").glob("*ensemble*"))  # the ensemble's temperature is printed, not stored

    # A member trained on all the images holds no validation split out: test figures only, said so.
    models.write_json(folder / "models" / "other.json", {"recipe": "tiny", "settings": {"epochs": 1}, "all_data": True})
    test_script.main(["mine", "other"])
    out = capsys.readouterr().out
    assert "the members share no validation split" in out and "validation accuracy" not in out
    assert "Model: ensemble of mine + other\nTest accuracy:" in out
