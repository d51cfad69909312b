"""Evaluate saved models on the 10,000 test images, and draw where they go wrong.

    python test.py                  # models/latest.h5
    python test.py best             # models/best.h5: Test accuracy, Test loss, per-class report
    python test.py best --tta       # also with test-time augmentation (image + its mirror image)
    python test.py full_1 full_2    # each model, then the ensemble of their averaged probabilities

Draws screenshots/Confusion_matrix.png and screenshots/Incorrect_classifications.png
for the last result printed (the single model, or the ensemble); --show opens them.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

SCREENSHOTS_DIR = Path(__file__).resolve().parent / "screenshots"
SAMPLE = 12  # wrong predictions drawn
SEED = 0  # which wrong predictions are drawn


def report(label, probabilities, y):
    """Print accuracy and loss in the project's format; returns the accuracy."""
    import models

    accuracy, loss = models.scores(probabilities, y)
    print(f"{label}")
    print(f"Test accuracy: {accuracy:.4f}")
    print(f"Test loss: {loss:.4f}")
    return accuracy


def save(fig, path):
    """Write the figure as a PNG, atomically."""
    import data

    data.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_confusion_matrix(y, predictions, class_names, path, title):
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(9, 8))
    ConfusionMatrixDisplay.from_predictions(y, predictions, display_labels=class_names, ax=ax,
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate saved models on the Fashion-MNIST test set.")
    parser.add_argument("names", nargs="*", default=["latest"],
                        help="models in models/ (NAME or NAME.h5), or paths (default: latest)")
    parser.add_argument("--tta", action="store_true", help="also report test-time augmentation (mirror images)")
    parser.add_argument("--show", action="store_true", help="open the plots in windows")
    parser.add_argument("--plots-dir", type=Path, default=SCREENSHOTS_DIR,
                        help=f"where the plots go (default: {SCREENSHOTS_DIR})")
    args = parser.parse_args(argv)

    import matplotlib

    if not args.show:
        matplotlib.use("Agg")  # files only: never a window that blocks an unattended run
    import matplotlib.pyplot as plt
    from sklearn.metrics import classification_report

    import data
    import models

    try:
        x_test, y_test = data.load_data("t10k")
        loaded = [(name, models.load_model(name)) for name in args.names]
    except (data.DataError, models.ModelError) as e:
        sys.exit(f"error: {e}")
    class_names = data.get_labels()

    results = []
    for name, model in loaded:
        probabilities = models.predict(model, x_test)
        recorded = models.read_info(name).get("test_accuracy")
        report(f"Model: {name}" + (f" (its JSON records {recorded:.4f})" if recorded is not None else ""),
               probabilities, y_test)
        if args.tta:  # test-time augmentation: the mean of each image's and its mirror image's probabilities
            mirrored = models.predict(model, x_test[:, :, ::-1])
            report(f"Model: {name} with TTA (mean of image and mirror image)", (probabilities + mirrored) / 2, y_test)
        results.append((name, probabilities))
    if len(results) > 1:
        probabilities = np.mean([p for _, p in results], axis=0)
        results.append(("ensemble of " + " + ".join(args.names), probabilities))
        report(f"Model: {results[-1][0]}", probabilities, y_test)

    label, probabilities = results[-1]
    predictions = probabilities.argmax(axis=1)
    print(classification_report(y_test, predictions, target_names=class_names, digits=4))
    print(data.per_class_accuracy(predictions, y_test))
    plot_confusion_matrix(y_test, predictions, class_names, args.plots_dir / "Confusion_matrix.png",
                          f"Confusion matrix: {label}")
    plot_incorrect(x_test, y_test, probabilities, class_names, args.plots_dir / "Incorrect_classifications.png",
                   label)
    print(f"Plots: {args.plots_dir / 'Confusion_matrix.png'}, {args.plots_dir / 'Incorrect_classifications.png'}")
    if args.show:
        plt.show()


if __name__ == "__main__":
    main()
