"""Classify your own pictures of clothes with a trained model.

    python predict.py photo.jpg                      # one line: class, probability, runners-up
    python predict.py photos/ --top 5                # every image in a folder, sorted by name
    python predict.py photos/ --json                 # a JSON list on stdout
    python predict.py shoe.png --save-prepared seen  # also write the 28x28 input the model saw

Each picture is prepared the way Zalando made Fashion-MNIST from its product
photos (Xiao, Rasul, Vollgraf 2017, arXiv 1708.07747, section 2): trim the
borders close to the corner colour, resize the longest edge to 28, sharpen
with a Gaussian operator, extend the shorter edge to 28 with the image
centred, negate, 8-bit grey. So a photo of a garment on a light background
becomes a light garment on black, as in the data. A picture that is already
light on a dark border is not negated; a 28x28 one of that kind (such as the
files --save-prepared writes) is taken as it is.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

import data
import machine
import models  # starts the Keras backend, quietly

DEFAULT_MODEL = "best"
DEFAULT_TOP = 3  # classes shown per picture: the prediction and its runners-up
SIZE = 28  # pixels, both edges of a Fashion-MNIST image
RESIZE_FILTER = Image.BOX  # area averaging: chosen on validation photos (bench/predict.py --grid)
TRIM_TOLERANCE = 0.05  # a border pixel this close to the corner colour (fraction of 255) is trimmed
SHARPEN_RADIUS = 1.0  # pixels: standard deviation of the Gaussian in the unsharp mask
SHARPEN_PERCENT = 100  # strength of the unsharp mask (Pillow's default 150 loses accuracy: --grid)
DARK = 128  # a border darker than this grey level means "already light on dark, like the data"


def to_rgb(image):
    """RGB version of any Pillow image; a transparent background becomes a plain one first.

    The background colour is white, as in Zalando's photos, unless what is visible is itself
    mostly light (a white garment cut out on a transparent background): then black.
    """
    image = ImageOps.exif_transpose(image)  # phone photos: upright as they are shown
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: scale to 8 bits
        values = np.asarray(image, dtype=np.float32)
        top = max(float(values.max()), 255.0)
        image = Image.fromarray(np.uint8(np.clip(values / top * 255, 0, 255).round()))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    sample = np.asarray(rgba.resize((min(rgba.width, 256), min(rgba.height, 256))), dtype=np.float64)
    alpha = sample[..., 3] / 255
    visible_brightness = (sample[..., :3] @ [0.299, 0.587, 0.114] * alpha).sum() / max(alpha.sum(), 1e-9)
    background = (0, 0, 0, 255) if visible_brightness >= DARK else (255, 255, 255, 255)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert("RGB")


def corner_colour(rgb):
    """The colour of the corners: per channel, the median of the four corner pixels."""
    corners = [rgb.getpixel((x, y)) for x in (0, rgb.width - 1) for y in (0, rgb.height - 1)]
    return np.median(np.array(corners, dtype=np.float64), axis=0)


def trim(rgb, background):
    """Crop the borders whose pixels are all within TRIM_TOLERANCE of the background colour."""
    plain = Image.new("RGB", rgb.size, tuple(int(round(c)) for c in background))
    tolerance = TRIM_TOLERANCE * 255
    content = ImageChops.difference(rgb, plain).point(lambda v: 255 if v > tolerance else 0)
    box = content.getbbox()  # of the pixels that differ in any channel; None: nothing but background
    if box is None:
        raise NoGarment
    return rgb.crop(box)


def prepare(image):
    """A Pillow image of any size and mode -> (uint8 (28, 28) light-on-dark, negated: bool)."""
    rgb = to_rgb(image)
    background = corner_colour(rgb)
    background_grey = float(background @ [0.299, 0.587, 0.114])  # Pillow's own "L" weights
    light_background = background_grey >= DARK
    if rgb.size == (SIZE, SIZE) and not light_background:  # already prepared (--save-prepared writes these)
        grey = np.asarray(rgb.convert("L"))
        if grey.max() <= grey.min() + TRIM_TOLERANCE * 255:
            raise NoGarment
        return grey, False

    rgb = trim(rgb, background)
    # Longest edge to 28, aspect kept ("subsampling" in the paper: each pixel the mean of the area it covers).
    width, height = rgb.size
    scale = SIZE / max(width, height)
    new_size = (max(1, min(SIZE, round(width * scale))), max(1, min(SIZE, round(height * scale))))
    rgb = rgb.resize(new_size, RESIZE_FILTER)
    rgb = rgb.filter(ImageFilter.UnsharpMask(radius=SHARPEN_RADIUS, percent=SHARPEN_PERCENT, threshold=0))
    # Shorter edge extended to 28 with the background colour, the picture centred.
    canvas = Image.new("RGB", (SIZE, SIZE), tuple(int(round(c)) for c in background))
    canvas.paste(rgb, ((SIZE - new_size[0]) // 2, (SIZE - new_size[1]) // 2))
    grey = np.asarray(canvas.convert("L"), dtype=np.float64)

    # Negate against the background, so that it becomes 0 as in the data (a light-grey studio
    # background would otherwise stay a dim grey); a dark background is only stretched.
    if light_background:
        out = (background_grey - grey) / max(background_grey, 1.0) * 255
    else:
        out = (grey - background_grey) / max(255 - background_grey, 1.0) * 255
    return np.uint8(np.clip(out, 0, 255).round()), light_background


class NoGarment(Exception):
    """A picture with nothing on it but its background."""


class PictureError(Exception):
    """A file that gives no model input; the message says why, in one line."""


SCALES = (4, 8)  # catalogue_photo: upscaling factor of a garment, drawn uniformly from this range


def catalogue_photo(image, rng):
    """uint8 (28, 28) light-on-dark (a data image) -> an RGB Pillow image as a shop shows it: a dark
    garment upscaled 4-8x, off centre on white. The reverse of prepare; bench/predict.py measures
    how well prepare undoes it, and app.py makes its examples with it."""
    scale = int(rng.integers(SCALES[0], SCALES[1] + 1))
    side = 28 * scale
    garment = Image.fromarray(255 - image).resize((side, side), Image.BICUBIC).convert("RGB")
    left, right, top, bottom = rng.integers(side // 8, side, size=4)  # uneven white margins
    canvas = Image.new("RGB", (side + int(left + right), side + int(top + bottom)), (255, 255, 255))
    canvas.paste(garment, (int(left), int(top)))
    return canvas


def prepare_file(path):
    """The model input (uint8 (28, 28)) of one picture file; PictureError when it has none."""
    try:
        with Image.open(path) as image:
            return prepare(image)[0]
    except NoGarment:
        raise PictureError("no garment found (the picture is one plain colour)") from None
    except Exception as e:  # Pillow raises many types for a file that is not an image it can decode
        raise PictureError(f"cannot be read as an image ({machine.reason(e)})") from None


def results(probabilities, paths, class_names, temperature=None, top=DEFAULT_TOP):
    """One record per picture, as --json prints them: the class, its probability, the top classes
    (and, with a temperature, the calibrated ones beside them)."""
    records = []
    for path, p in zip(paths, probabilities):
        order = np.argsort(-p, kind="stable")[:top]
        record = {"path": str(path), "class": class_names[order[0]], "probability": round(float(p[order[0]]), 4),
                  "top": [[class_names[c], round(float(p[c]), 4)] for c in order]}
        if temperature:
            q = models.calibrate(p[None], temperature)[0]
            record["calibrated_probability"] = round(float(q[order[0]]), 4)
            record["calibrated_top"] = [[class_names[c], round(float(q[c]), 4)] for c in order]
        records.append(record)
    return records


def list_images(paths):
    """(the files to classify, the paths that do not exist): each path given, a folder meaning its
    files (not hidden), sorted. A path that does not exist is named on stderr."""
    files, missing = [], []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
        elif path.exists():
            files.append(path)
        else:
            print(f"error: {path}: no such file or folder", file=sys.stderr)
            missing.append(path)
    return files, missing


def read_images(files, save_dir=None):
    """(uint8 (n, 28, 28) inputs, the files they came from, the files that could not be read)."""

    images, read, failed = [], [], []
    used_names = set()
    for path in files:
        try:
            prepared = prepare_file(path)
        except PictureError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed.append(path)
            continue
        images.append(prepared)
        read.append(path)
        if save_dir is not None:
            name = f"{path.stem}.png"
            for i in range(2, len(files) + 2):  # two inputs with the same stem get two files
                if name not in used_names:
                    break
                name = f"{path.stem}_{i}.png"
            used_names.add(name)
            image_out = Image.fromarray(prepared)
            try:
                data.atomic_write(save_dir / name, lambda f: image_out.save(f, format="PNG"))
            except OSError as e:  # a full disk: say so once, and classify the pictures all the same
                print(f"error: --save-prepared: {e}; the rest are classified, not saved", file=sys.stderr)
                failed.append(save_dir / name)
                save_dir = None
    return np.array(images, dtype=np.uint8).reshape(-1, SIZE, SIZE), read, failed




def main(argv=None):
    parser = argparse.ArgumentParser(description="Classify pictures of clothes with a trained model.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="image files (PNG, JPEG, BMP, GIF, WebP, TIFF) or folders of them")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a model in models/ (default: {DEFAULT_MODEL})")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"classes shown per picture, the most probable first (default: {DEFAULT_TOP})")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of one line per picture")
    parser.add_argument("--as-saved", action="store_true",
                        help="compute in the precision the model was trained in (default: float32, the same "
                             "answer on every machine)")
    parser.add_argument("--save-prepared", type=Path, metavar="DIR",
                        help="also write each 28x28 model input as DIR/NAME.png (default: not written)")
    args = parser.parse_args(argv)
    if not 1 <= args.top <= 10:
        parser.error("--top must be between 1 and 10")

    if args.save_prepared is not None:
        try:
            args.save_prepared.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: cannot write to {args.save_prepared}: {e.strerror or e}")

    name = models.model_name(args.model)
    try:
        model = models.load_model(name, as_saved=args.as_saved)
    except models.ModelError as e:
        sys.exit(f"error: {e}")
    temperature = models.read_info(name).get("temperature")
    class_names = data.get_labels()

    files, missing = list_images(args.paths)
    images, read, failed = read_images(files, args.save_prepared)
    probabilities = models.predict(model, images) if len(images) else np.zeros((0, len(class_names)))
    records = results(probabilities, read, class_names, temperature, args.top)

    if args.json:
        lines = ",\n".join(json.dumps(record) for record in records)  # one picture a line
        print(f"[\n{lines}\n]" if records else "[]")
    else:
        for result in records:
            line = f"{result['path']}: {result['class']} {result['probability']:.4f}"
            if temperature:
                line += f" (calibrated {result['calibrated_probability']:.4f})"
            runners_up = ", ".join(f"{c} {p:.4f}" for c, p in result["top"][1:])
            print(line + (f"; then {runners_up}" if runners_up else ""))
    if not files and not missing:
        print("error: no files to classify in " + ", ".join(map(str, args.paths)), file=sys.stderr)
    if failed or missing or not files:
        sys.exit(1)


if __name__ == "__main__":
    machine.run(main)
