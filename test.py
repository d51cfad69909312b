"""Evaluate saved models on the 10,000 test images, and draw where they go wrong.

    python test.py                  # models/latest.h5
    python test.py best             # models/best.h5: accuracy, loss, calibration, per-class report
    python test.py best --tta       # also with test-time augmentation (image + its mirror image)
    python test.py fast --calibrate # fit a temperature on fast's validation split, store it in fast.json
    python test.py full_1 full_2    # each model, then the ensemble of their averaged probabilities
                                    # (and its validation accuracy, when the members share a split)

Prints Test accuracy, Test loss, ECE (expected calibration error) and NLL; when
the model's JSON holds a temperature (from --calibrate), the calibrated
figures too, beside the raw ones. Draws Confusion_matrix.png,
Incorrect_classifications.png and Reliability_diagram.png for the last result
printed (the single model, or the ensemble): the shipped model `best` into
screenshots/, any other into screenshots/NAME/; --show opens them.

Calibration is temperature scaling (Guo et al. 2017, "On Calibration of
Modern Neural Networks"): one number T, the probabilities become
softmax(log(p) / T); T is fitted on the model's validation split (the last
15 % of the training file, as train.py held it out), never on the test set.
A model trained with --all-data has no held-out images: it borrows the
temperature of the same recipe's validation run. With several models,
--calibrate also fits one temperature for their ensemble on the validation
split the members share; it is printed beside the ensemble's figures, not
stored (an ensemble has no JSON).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import data
import machine
import models  # starts the Keras backend, quietly

SCREENSHOTS_DIR = Path(__file__).resolve().parent / "screenshots"
SHIPPED_MODEL = "best"  # the one model whose plots go to screenshots/ itself (the README shows them)
SAMPLE = 12  # wrong predictions drawn
SEED = 0  # which wrong predictions are drawn
ECE_BINS = 15  # equal-width bins of the top probability, as in Guo et al. 2017
TEMPERATURE_RANGE = (0.05, 20.0)  # where the fitted temperature is searched for
CONFIDENT = 0.9  # a wrong prediction above this top probability is counted as a confident error


class CalibrationError(Exception):
    """A temperature cannot be fitted or borrowed; the message says why and what to do."""



# Calibration

def reliability(probabilities, labels, bins=ECE_BINS):
    """Per bin of the top probability ((i/bins, (i+1)/bins]): (counts, accuracy, mean confidence).

    Empty bins have accuracy and confidence 0.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    return counts, accuracy, mean_confidence


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """Sum over bins of |accuracy - mean confidence|, each weighted by its share of the images."""
    counts, accuracy, confidence = reliability(probabilities, labels, bins)
    return float((counts / counts.sum() * np.abs(accuracy - confidence)).sum())



def nll(probabilities, labels, temperature=1.0):
    """Mean negative log-likelihood of the labels under softmax(log(p) / T), computed in log space."""
    from scipy.special import logsumexp

    logits = np.log(np.clip(probabilities, 1e-30, None)) / temperature
    return float((logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]).mean())


def fit_temperature(probabilities, labels):
    """The T that minimises the NLL of softmax(log(p) / T) on these (held-out) images."""
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(lambda log_t: nll(probabilities, labels, np.exp(log_t)), bounds=(low, high),
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def validation_split(info):
    """The images the model was validated on: the last 15 % of the training file (of its first `limit`)."""

    x, y = data.load_data("train")
    if info.get("limit"):
        x, y = x[:info["limit"]], y[:info["limit"]]
    _, (x_val, y_val) = data.split_data(x, y)
    return x_val, y_val


def has_validation_split(info):
    """Whether train.py held a validation split out of this model's training images (its JSON has a
    recipe, and no --all-data)."""
    return "recipe" in info and not info.get("all_data")


def recipe_sibling(name, info):
    """The model in models/ trained with the same recipe and settings, but with a validation split."""

    same = []
    for other in sorted({p.stem for p in models.MODELS_DIR.glob("*") if p.suffix in (".h5", ".keras")
                         and not p.name.startswith(".")}):
        other_info = models.read_info(other)
        if (other != name and not other_info.get("all_data") and info.get("recipe") is not None
                and other_info.get("recipe") == info.get("recipe")
                and other_info.get("settings") == info.get("settings")
                and other_info.get("limit") == info.get("limit")):
            same.append(other)
    if len(same) > 1:  # several seeds of the recipe: the same seed, if one is there
        same = [other for other in same if models.read_info(other).get("seed") == info.get("seed")] or same
    if len(same) != 1:
        found = f"several ({', '.join(same)})" if same else "none"
        raise CalibrationError(f"{name} was trained on all the training images, so it has no validation split; "
                         f"models with its recipe and settings and a validation split: {found}. "
                         "Name the one to borrow the temperature from with --calibrate-from NAME")
    return same[0]


def fit_and_store(name, model, borrow_from=None, as_saved=False):
    """Fit the temperature of `name` on its validation split and record it in its JSON.

    A model trained on all the data borrows the temperature of `borrow_from` (found by recipe
    when not given), which is fitted and recorded first. Returns the temperature.
    """

    info = models.read_info(name)
    if info.get("all_data") or borrow_from:
        source = borrow_from or recipe_sibling(name, info)
        temperature = fit_and_store(source, models.load_model(source, as_saved=as_saved), as_saved=as_saved)
        fields = {"temperature": temperature, "temperature_from": source,
                  "temperature_fitted_on": f"{source}'s validation split (this model has none of its own)"}
    else:
        x_val, y_val = validation_split(info)
        probabilities = models.predict(model, x_val)
        temperature = fit_temperature(probabilities, y_val)
        before = (nll(probabilities, y_val), expected_calibration_error(probabilities, y_val))
        calibrated = models.calibrate(probabilities, temperature)
        after = (nll(probabilities, y_val, temperature), expected_calibration_error(calibrated, y_val))
        print(f"Model: {name}: temperature {temperature:.4f} fitted on its validation split "
              f"({len(y_val)} images): NLL {before[0]:.4f} -> {after[0]:.4f}, ECE {before[1]:.4f} -> {after[1]:.4f}")
        fields = {"temperature": temperature, "temperature_computed_in": model.layers[0].dtype_policy.name,
                  "temperature_fitted_on": f"validation split: last {data.VAL_FRACTION:.0%} of the first "
                                           f"{info.get('limit') or 60000} training images ({len(y_val)} images)",
                  "temperature_validation": {"nll": before[0], "nll_calibrated": after[0],
                                             "ece": before[1], "ece_calibrated": after[1]}}
    info = models.read_info(name)  # everything else in the JSON is kept as it is
    info.pop("temperature_from", None)
    info.pop("temperature_validation", None)
    info.update(fields)
    models.write_json(models.model_path(name).with_suffix(".json"), info)
    print(f"Model: {name}: temperature {temperature:.4f} written to {models.model_path(name).with_suffix('.json')}"
          + (f" (borrowed from {fields['temperature_from']})" if "temperature_from" in fields else ""))
    return temperature


def record_figures(name, model, test_probabilities, y_test):
    """--record: the model's figures, as this script computes them (float32), into its JSON. The figures
    the JSON held before (from train.py, in the training precision) are kept under "as_trained" once."""
    info = models.read_info(name)
    if "as_trained" not in info and "test_accuracy" in info:
        info["as_trained"] = {key: info.get(key) for key in ("val_accuracy", "val_loss", "test_accuracy",
                                                             "test_loss", "dtype_policy", "device")}
    val = (None, None)
    if has_validation_split(info):
        x_val, y_val = validation_split(info)
        val = models.scores(models.predict(model, x_val), y_val)
    test = models.scores(test_probabilities, y_test)
    info.update(val_accuracy=val[0], val_loss=val[1], test_accuracy=test[0], test_loss=test[1],
                evaluated_in=model.layers[0].dtype_policy.name, evaluated_on=machine.device_name())
    models.write_json(models.model_path(name).with_suffix(".json"), info)
    print(f"Model: {name}: figures written to {models.model_path(name).with_suffix('.json')}")


# Reporting and plots

def report(label, probabilities, y):
    """Print accuracy, loss and calibration in the project's format; returns the accuracy."""

    accuracy, loss = models.scores(probabilities, y)
    print(f"{label}")
    print(f"Test accuracy: {accuracy:.4f}")
    print(f"Test loss: {loss:.4f}")
    print(f"ECE: {expected_calibration_error(probabilities, y):.4f}")
    print(f"NLL: {nll(probabilities, y):.4f}")
    wrong = probabilities.argmax(axis=1) != y
    print(f"Confident errors: {(wrong & (probabilities.max(axis=1) > CONFIDENT)).sum()} of {wrong.sum()} "
          f"wrong predictions have a top probability above {CONFIDENT}")
    return accuracy


def save(fig, path):
    """Write the figure as a PNG, atomically."""

    data.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_confusion_matrix(y, predictions, class_names, path, title):
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(9, 8))
    ConfusionMatrixDisplay.from_predictions(y, predictions, labels=range(len(class_names)),
                                            display_labels=class_names, ax=ax,
                                            xticks_rotation=45, colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    save(fig, path)
    return fig


def plot_incorrect(x, y, probabilities, class_names, path, title, sample=SAMPLE, seed=SEED):
    """A seeded sample of wrong predictions: each image beside a bar chart of its probabilities."""
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y)
    chosen = np.sort(np.random.default_rng(seed).choice(wrong, size=min(sample, len(wrong)), replace=False))
    cols = 3
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.5 * cols, 2.2 * rows),
                             gridspec_kw={"width_ratios": [1, 1.4] * cols}, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for slot, i in enumerate(chosen):
        image_ax, bar_ax = axes[slot // cols, 2 * (slot % cols)], axes[slot // cols, 2 * (slot % cols) + 1]
        predicted = int(probabilities[i].argmax())
        image_ax.imshow(x[i], cmap="gray_r")
        image_ax.set_title(f"true: {class_names[y[i]]}\npredicted: {class_names[predicted]}", fontsize=8)
        bar_ax.axis("on")
        colors = ["tab:gray"] * len(class_names)
        colors[predicted], colors[y[i]] = "tab:red", "tab:green"
        bar_ax.barh(range(len(class_names)), probabilities[i], color=colors)
        bar_ax.set_yticks(range(len(class_names)), class_names, fontsize=6)
        bar_ax.invert_yaxis()
        bar_ax.set_xlim(0, 1)
        bar_ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(f"{title}: {len(wrong)} wrong of {len(y)} (green: true class, red: predicted)", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return fig


def plot_reliability(y, panels, path, title, bins=ECE_BINS):
    """Accuracy against mean confidence in each bin of the top probability, one panel per
    (label, probabilities); the image count of each bin is written at the foot of its bar."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.5), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (label, probabilities) in zip(axes[0], panels):
        counts, accuracy, confidence = reliability(probabilities, y, bins)
        shown = counts > 0
        ax.bar(edges[:-1][shown], accuracy[shown], width=1 / bins, align="edge", color="tab:blue",
               edgecolor="black", label="accuracy")
        ax.bar(edges[:-1][shown], (confidence - accuracy)[shown], bottom=accuracy[shown], width=1 / bins,
               align="edge", color="tab:red", alpha=0.35, edgecolor="tab:red", label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        for left, count in zip(edges[:-1][shown], counts[shown]):
            ax.text(left + 0.5 / bins, 0.02, str(count), ha="center", va="bottom", fontsize=7, rotation=90,
                    color="white")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}\nECE {expected_calibration_error(probabilities, y, bins):.4f}, "
                     f"NLL {nll(probabilities, y):.4f}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Reliability diagram: {title} ({bins} bins, images per bin at the foot of the bars)", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return fig


def plot_history(csv_path, png_path, show=False):
    """train.py's plot: accuracy and loss per epoch, training vs validation, from the run's CSV log."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.atleast_1d(np.genfromtxt(csv_path, delimiter=",", names=True))
    epochs = rows["epoch"] + 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, rows[metric], label="training")
        if not np.isnan(rows[f"val_{metric}"]).all():  # NA throughout with --all-data
            ax.plot(epochs, rows[f"val_{metric}"], label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=f"Model {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save(fig, png_path)
    if show:
        plt.show()
    plt.close(fig)


def shared_validation(loaded):
    """(the members' mean probabilities on the validation split they all held out, its labels), for
    choosing and calibrating an ensemble on validation; None when they share none: a member trained
    with --all-data or not by train.py (no recipe in its JSON), or members of different --limit."""
    infos = [models.read_info(name) for name, _ in loaded]
    if not all(map(has_validation_split, infos)) or len({info.get("limit") for info in infos}) > 1:
        return None
    x_val, y_val = validation_split(infos[0])
    return np.mean([models.predict(model, x_val) for _, model in loaded], axis=0), y_val


def plots_folder(names, plots_dir):
    """--plots-dir, else screenshots/ for the shipped model and screenshots/NAME/ for any other."""
    if plots_dir is not None:
        return plots_dir
    stems = [Path(models.model_name(name)).stem for name in names]
    return SCREENSHOTS_DIR if stems == [SHIPPED_MODEL] else SCREENSHOTS_DIR / "+".join(stems)


def check_writable(folder):
    """Create `folder` if needed and write a file in it; returns the folders it created (to remove
    on a later failure). Raises OSError when that is not possible."""
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass
    return created


def ensemble_report(names, results, tta, validation, calibrate, y_test):
    """The ensemble of the models in `results` (the mean of their probabilities): its validation accuracy
    where the members share a validation split (`validation`, from shared_validation), with --calibrate
    a temperature fitted there, then its test figures (with --tta, those of the members' TTA too).
    Appends the ensemble to `results`."""
    label = "ensemble of " + " + ".join(names)
    probabilities = np.mean([p for _, p, _ in results], axis=0)
    calibrated = None
    if validation is None:
        print(f"Model: {label}: the members share no validation split (one was trained with --all-data, or "
              f"not by train.py, or with another --limit), so the ensemble is reported on test only")
    else:
        val_probabilities, y_val = validation
        accuracy, loss = models.scores(val_probabilities, y_val)
        print(f"Model: {label}: validation accuracy {accuracy:.4f}, loss {loss:.4f} ({len(y_val)} images, "
              f"the validation split its members share)")
        if calibrate:
            temperature = fit_temperature(val_probabilities, y_val)
            calibrated = models.calibrate(probabilities, temperature)
            print(f"Model: {label}: temperature {temperature:.4f} fitted on that validation split: ECE "
                  f"{expected_calibration_error(val_probabilities, y_val):.4f} -> "
                  f"{expected_calibration_error(models.calibrate(val_probabilities, temperature), y_val):.4f}")
    results.append((label, probabilities, calibrated))
    report(f"Model: {label}", probabilities, y_test)
    if calibrated is not None:
        report(f"Model: {label} calibrated (temperature {temperature:.4f}, fitted on the members' validation "
               f"split)", calibrated, y_test)
    if tta:
        report(f"Model: {label} with TTA (mean of the members' TTA probabilities)", np.mean(tta, axis=0), y_test)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate saved models on the Fashion-MNIST test set.")
    parser.add_argument("names", nargs="*", default=["latest"],
                        help="models in models/ (NAME or NAME.h5), or paths (default: latest)")
    parser.add_argument("--tta", action="store_true", help="also report test-time augmentation (mirror images)")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit each model's temperature on its validation split and store it in its JSON "
                             "(default: use the temperature already stored, if any)")
    parser.add_argument("--calibrate-from", metavar="NAME",
                        help="with --calibrate: borrow the temperature of this model (default: for a model "
                             "trained with --all-data, the model in models/ with the same recipe and settings)")
    parser.add_argument("--as-saved", action="store_true",
                        help="compute in the precision each model was trained in (mixed_bfloat16: emulated "
                             "differently on each CPU) (default: float32, one figure on every machine)")
    parser.add_argument("--record", action="store_true",
                        help="write each model's validation and test figures, as computed here, into its JSON")
    parser.add_argument("--show", action="store_true", help="open the plots in windows")
    parser.add_argument("--plots-dir", type=Path,
                        help=f"where the plots go (default: {SCREENSHOTS_DIR} for {SHIPPED_MODEL}, "
                             f"{SCREENSHOTS_DIR}/NAME for any other model)")
    args = parser.parse_args(argv)
    if args.calibrate_from and not args.calibrate:
        parser.error("--calibrate-from needs --calibrate")
    names = [models.model_name(name) for name in args.names]

    plots_dir = plots_folder(names, args.plots_dir)
    try:
        created = check_writable(plots_dir)
    except OSError as e:
        sys.exit(f"error: cannot write the plots to {plots_dir} ({e.strerror or e}); choose a folder with --plots-dir")

    import matplotlib

    if not args.show:
        matplotlib.use("Agg")  # files only: never a window that blocks an unattended run
    import matplotlib.pyplot as plt
    from sklearn.metrics import classification_report


    try:
        loaded = [(name, models.load_model(name, as_saved=args.as_saved)) for name in names]
        if args.calibrate:
            for name, model in loaded:
                fit_and_store(name, model, args.calibrate_from and models.model_name(args.calibrate_from),
                              args.as_saved)
        ensemble_val = shared_validation(loaded) if len(loaded) > 1 else None
        x_test, y_test = data.load_data("t10k")  # only now: nothing above sees the test set
    except (data.DataError, models.ModelError, CalibrationError) as e:
        for folder in created:  # leave no empty plots folder behind
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        sys.exit(f"error: {e}")
    class_names = data.get_labels()

    results = []  # (label, probabilities, calibrated probabilities or None)
    tta = []  # with --tta: each model's test probabilities with TTA
    for name, model in loaded:
        probabilities = models.predict(model, x_test)
        info = models.read_info(name)
        recorded = info.get("test_accuracy")
        policy = model.layers[0].dtype_policy.name
        report(f"Model: {name}" + (f" in {policy} (--as-saved)" if args.as_saved else "")
               + (f" (its JSON records {recorded:.4f})" if recorded is not None else ""), probabilities, y_test)
        if args.record:
            record_figures(name, model, probabilities, y_test)
        calibrated = None
        if info.get("temperature"):
            temperature = info["temperature"]
            source = info.get("temperature_from", name)
            calibrated = models.calibrate(probabilities, temperature)
            report(f"Model: {name} calibrated (temperature {temperature:.4f}, fitted on {source}'s validation split)",
                   calibrated, y_test)
        if args.tta:  # test-time augmentation: the mean of each image's and its mirror image's probabilities
            with_tta = (probabilities + models.predict(model, x_test[:, :, ::-1])) / 2
            report(f"Model: {name} with TTA (mean of image and mirror image)", with_tta, y_test)
            tta.append(with_tta)
        results.append((name, probabilities, calibrated))
    if len(results) > 1:
        ensemble_report(names, results, tta, ensemble_val, args.calibrate, y_test)

    label, probabilities, calibrated = results[-1]
    predictions = probabilities.argmax(axis=1)
    print(classification_report(y_test, predictions, labels=range(len(class_names)), target_names=class_names,
                                digits=4, zero_division=0))
    print(data.per_class_accuracy(predictions, y_test))
    paths = [plots_dir / "Confusion_matrix.png", plots_dir / "Incorrect_classifications.png",
             plots_dir / "Reliability_diagram.png"]
    plot_confusion_matrix(y_test, predictions, class_names, paths[0], f"Confusion matrix: {label}")
    plot_incorrect(x_test, y_test, probabilities, class_names, paths[1], label)
    panels = [(label, probabilities)] + ([(f"{label} calibrated", calibrated)] if calibrated is not None else [])
    plot_reliability(y_test, panels, paths[2], label)
    print(f"Plots: {', '.join(map(str, paths))}")
    if args.show:
        plt.show()
    plt.close("all")  # main() may run again in one process (the tests)


if __name__ == "__main__":
    machine.run(main)
