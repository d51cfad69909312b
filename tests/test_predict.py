"""predict.py: shop-style photos of test images are prepared like the data and classified."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import models
import predict

ROOT = Path(__file__).resolve().parent.parent
N_PHOTOS = 300  # test images turned into photos: enough to compare accuracies within a few points


@pytest.fixture(scope="module")
def test_images():
    x, y = data.load_data("t10k")
    return x[:N_PHOTOS], y[:N_PHOTOS]


def classify(*args):
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_catalogue_photos_are_classified_nearly_as_well_as_the_originals(tmp_path, test_images, capsys):
    x, y = test_images
    rng = np.random.default_rng(0)
    originals, photos = tmp_path / "originals", tmp_path / "photos"
    originals.mkdir()
    photos.mkdir()
    for i, image in enumerate(x):
        Image.fromarray(image).save(originals / f"{i:03d}.png")  # 28x28, light on dark: taken as they are
        predict.catalogue_photo(image, rng).save(photos / f"{i:03d}.jpg", quality=90)
    (photos / "notes.txt").write_text("not a picture")

    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--json", str(originals), str(photos)])
    out = capsys.readouterr()
    assert exit_info.value.code == 1  # one file could not be read...
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "notes.txt" in errors[0]
    results = json.loads(out.out)  # ...and all the others are classified
    assert len(results) == 2 * N_PHOTOS
    assert [Path(r["path"]).name for r in results[:3]] == ["000.png", "001.png", "002.png"]  # sorted
    class_names = data.get_labels()
    predicted = np.array([class_names.index(r["class"]) for r in results])
    on_originals, on_photos = (predicted[:N_PHOTOS] == y).mean(), (predicted[N_PHOTOS:] == y).mean()
    assert on_originals > 0.9
    assert on_photos >= on_originals - 0.04
    first = results[0]
    assert len(first["top"]) == 3 and first["top"][0] == [first["class"], first["probability"]]
    assert first["top"][0][1] >= first["top"][1][1] >= first["top"][2][1]


def test_a_transparent_background_is_background(test_images):
    image = test_images[0][0]
    rng = np.random.default_rng(1)
    # A dark-blue garment cut out on a transparent background whose hidden colours are noise.
    rgba = rng.integers(0, 256, size=(28, 28, 4), dtype=np.uint8)
    rgba[..., :3][image > 0] = (20, 20, 80)
    rgba[..., 3] = image
    cut_out = Image.fromarray(rgba).resize((112, 112), Image.NEAREST)
    prepared, negated = predict.prepare(cut_out)
    assert negated  # composited on white, like a shop photo, then negated
    assert prepared[0].max() == 0 and prepared[-1].max() == 0 and prepared.max() > 150

    # A white garment cut out the same way lands on black and is not negated.
    rgba[..., :3][image > 0] = 255
    prepared_white, negated_white = predict.prepare(Image.fromarray(rgba).resize((112, 112), Image.NEAREST))
    assert not negated_white
    assert np.corrcoef(prepared.ravel(), prepared_white.ravel())[0, 1] > 0.9  # the same garment either way


def test_a_picture_that_already_looks_like_the_data_is_not_negated(test_images):
    x, _ = test_images
    assert np.array_equal(predict.prepare(Image.fromarray(x[0]))[0], x[0])  # 28x28: taken as it is
    big = Image.new("L", (300, 200), 0)
    big.paste(Image.fromarray(x[0]).resize((112, 112), Image.BICUBIC), (150, 40))
    prepared, negated = predict.prepare(big)
    assert not negated
    assert np.abs(prepared.astype(int) - x[0]).mean() < 25  # light garment on black, as the original
    photo_prepared, photo_negated = predict.prepare(predict.catalogue_photo(x[0], np.random.default_rng(2)))
    assert photo_negated and np.abs(photo_prepared.astype(int) - x[0]).mean() < 25


@pytest.mark.parametrize("suffix, mode", [(".png", "L"), (".png", "I;16"), (".jpg", "RGB"), (".bmp", "RGB"),
                                          (".gif", "P"), (".webp", "RGB"), (".tiff", "RGBA"), (".jpg", "CMYK")])
def test_common_formats_and_modes_are_read(tmp_path, test_images, suffix, mode):
    garment = Image.fromarray(255 - test_images[0][1]).resize((84, 84))  # dark on white
    if mode == "I;16":
        picture = Image.fromarray((np.asarray(garment, dtype=np.uint16) * 257))
    else:
        picture = garment.convert(mode)
    path = tmp_path / f"picture{suffix}"
    picture.save(path)
    with Image.open(path) as image:
        prepared, negated = predict.prepare(image)
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8 and negated
    assert np.abs(prepared.astype(int) - test_images[0][1]).mean() < 25


def test_save_prepared_writes_what_the_model_saw(tmp_path, test_images, capsys):
    x, y = test_images
    rng = np.random.default_rng(3)
    for i in range(4):
        predict.catalogue_photo(x[i], rng).save(tmp_path / f"shirt{i}.jpg")
    predict.main(["--json", "--save-prepared", str(tmp_path / "seen"), str(tmp_path)])
    first = json.loads(capsys.readouterr().out)
    saved = sorted((tmp_path / "seen").iterdir())
    assert [p.name for p in saved] == [f"shirt{i}.png" for i in range(4)]
    with Image.open(tmp_path / "shirt0.jpg") as photo, Image.open(saved[0]) as seen:
        assert seen.size == (28, 28) and seen.mode == "L"
        assert np.array_equal(np.asarray(seen), predict.prepare(photo)[0])

    predict.main(["--json", str(tmp_path / "seen")])  # the saved inputs give the same answers
    again = json.loads(capsys.readouterr().out)
    assert [r["top"] for r in again] == [r["top"] for r in first]

    predict.main(["--top", "2", str(tmp_path / "shirt0.jpg")])  # the default output: one line
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'shirt0.jpg'}: ") and line.count("; then ") == 1


def garment_photo(path):
    """A grey coat-like block on white: something to classify."""
    photo = Image.new("RGB", (60, 90), "white")
    photo.paste((90, 90, 90), (10, 10, 50, 80))
    photo.save(path)
    return path


def test_a_missing_path_is_named_and_the_rest_are_classified(tmp_path):
    """A PATH that does not exist is like an unreadable file: named, the others classified, exit 1."""
    photo = garment_photo(tmp_path / "coat.png")
    out = classify(tmp_path / "nothing.jpg", photo, tmp_path / "gone")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"error: {tmp_path / 'nothing.jpg'}: no such file or folder",
                                       f"error: {tmp_path / 'gone'}: no such file or folder"]
    assert out.stdout.startswith(f"{photo}: ") and out.stdout.count("\n") == 1


def test_a_blank_picture_has_no_garment(tmp_path, capsys):
    """All white, one colour, or a 28x28 all black: not a "Dress 0.23", but no garment found."""
    Image.new("RGB", (50, 70), "white").save(tmp_path / "white.png")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.jpg")
    Image.new("L", (28, 28), 0).save(tmp_path / "black.png")
    photo = garment_photo(tmp_path / "zcoat.png")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--json", str(tmp_path)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert [r["path"] for r in json.loads(captured.out)] == [str(photo)]
    assert captured.err.splitlines() == [f"error: {tmp_path / name}: no garment found (the picture is one plain "
                                         f"colour)" for name in ("black.png", "red.jpg", "white.png")]


def test_an_unknown_model_is_one_line(tmp_path):
    photo = garment_photo(tmp_path / "coat.png")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model", "nope.h5", str(photo)])
    assert str(exit_info.value).startswith("error: no model named 'nope'")
    out = classify("--model", "nope", photo)
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_a_full_disk_under_save_prepared_is_one_line_and_the_pictures_are_still_classified(tmp_path, monkeypatch,
                                                                                          capsys):
    photos = [garment_photo(tmp_path / f"coat{i}.png") for i in range(3)]

    def full(f):
        f.write(b"x" * 5000)
        raise OSError(28, "No space left on device")

    real = data.atomic_write
    monkeypatch.setattr(data, "atomic_write", lambda path, write, mode="wb": real(path, full, mode))
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--save-prepared", str(tmp_path / "seen"), *map(str, photos)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3  # every picture classified
    assert captured.err.splitlines() == [f"error: --save-prepared: no space left on the disk for "
                                         f"{tmp_path / 'seen' / 'coat0.png'} (it needs at least 5 kB); the rest "
                                         f"are classified, not saved"]
    assert list((tmp_path / "seen").iterdir()) == []  # no half-written file


def test_a_stored_temperature_adds_calibrated_probabilities_beside_the_raw_ones(tmp_path, monkeypatch, capsys):
    import keras

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    keras.utils.set_random_seed(0)
    tiny = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10, activation="softmax")])
    tiny.save(tmp_path / "models" / "tiny.h5")
    models.write_json(tmp_path / "models" / "tiny.json", {"temperature": 2.0})
    garment_photo(tmp_path / "coat.png")

    predict.main(["--model", "tiny", "--json", "--top", "10", str(tmp_path / "coat.png")])
    result = json.loads(capsys.readouterr().out)[0]
    raw = np.array([p for _, p in result["top"]])
    calibrated = np.array([p for _, p in result["calibrated_top"]])
    assert np.allclose(calibrated, models.calibrate(raw[None], 2.0)[0], atol=2e-4)
    assert result["calibrated_probability"] == result["calibrated_top"][0][1]
    assert [c for c, _ in result["calibrated_top"]] == [c for c, _ in result["top"]]
    predict.main(["--model", "tiny", str(tmp_path / "coat.png")])
    assert f"{result['probability']:.4f} (calibrated {result['calibrated_probability']:.4f})" in capsys.readouterr().out
