"""A web page to try a trained model: drop a picture, see the class, how sure the model is, and the
28x28 input it saw.

    python app.py                        # http://127.0.0.1:7860, model best
    python app.py --model fast --port 8000
    python app.py --host 0.0.0.0         # reachable from other machines: your choice, not the default

Set up with `make app` (requirements-app.txt: Gradio). The page prepares each picture with predict.py's
own functions, so a picture gets the same answer here as from `python predict.py --json`. It works
offline: no analytics, no fonts or scripts from other hosts. Uploads live in a temporary folder
and each is deleted a minute after it is answered; the examples are test-set images (never training images)
made into catalogue-style photos at start-up.
"""

import argparse
import atexit
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import machine

# Before Gradio is imported: no usage statistics, uploads in a folder of this process's own.
UPLOADS = Path(tempfile.mkdtemp(prefix="fashion-app-"))
atexit.register(shutil.rmtree, UPLOADS, ignore_errors=True)
os.environ.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(UPLOADS), HF_HUB_OFFLINE="1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402 (starts the Keras backend, quietly)
import predict  # noqa: E402

DEFAULT_PORT = 7860
EXAMPLES = 10  # example pictures, one of each class
UNSURE = 0.5  # below this top probability the page says the model is unsure
SHOWN_SIZE = 224  # pixels: the 28x28 input, scaled up 8x without smoothing
KEPT = set()  # Gradio's copies of the examples, in UPLOADS too: never deleted
HINT = "Drop a picture above, paste one, or click an example."
UPLOAD_SECONDS = 60  # an upload is deleted this long after its answer (the page shows it from the server)


def model_choices():
    """The models in models/, best first."""
    names = models.available_models()
    return sorted(names, key=lambda name: (name != predict.DEFAULT_MODEL, name))


@functools.lru_cache(maxsize=4)
def load(name):
    """(model, temperature) of models/NAME, loaded once; ModelError when it cannot be."""
    return models.load_model(name), models.read_info(name).get("temperature")


def make_examples(folder, seed=0):
    """EXAMPLES catalogue-style photos of test images, one of each class, as JPEGs in folder; their paths."""
    x_test, y_test = data.load_data("t10k")
    rng = np.random.default_rng(seed)
    class_names = data.get_labels()
    paths = []
    for label in range(EXAMPLES):
        index = int(np.flatnonzero(y_test == label)[0])
        path = folder / f"test{index:05d}_{class_names[label].split('/')[0].lower().replace(' ', '_')}.jpg"
        predict.catalogue_photo(x_test[index], rng).save(path, quality=90)
        paths.append(path)
    return paths


def confidence_line(record):
    """What the top probability means, in words (test.py's calibration figures for best: raw top
    probabilities run high; calibrated ones match how often the model is right)."""
    calibrated = "calibrated_probability" in record
    p = record["calibrated_probability" if calibrated else "probability"]
    kind = "calibrated " if calibrated else ""
    if p < UNSURE:
        return (f"**The model is unsure**: its top {kind}probability is {p:.2f}, under {UNSURE}. "
                f"Pictures like this one are often misclassified; check the 28x28 input on the right.")
    return f"Top {kind}probability {p:.2f}." + (
        " Calibrated: a picture given 0.9 is right about 9 times in 10." if calibrated else
        " Not calibrated: the model's raw probabilities run higher than how often it is right.")


def classify(path, name):
    """The page's answer for one picture file: the answer (see answer) and the prepared input, kept
    for a change of model. The upload itself is deleted once it is prepared."""
    if not path:
        return None, None, HINT, None
    upload = Path(path).resolve()
    ours = upload.is_relative_to(UPLOADS.resolve()) and upload not in KEPT  # an upload, not an example
    if ours and not upload.exists():
        import gradio as gr  # an upload answered and deleted: the browser sent it twice (upload, then change)

        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
        prepared = predict.prepare_file(path)
    except predict.PictureError as e:
        return None, None, f"**This file gives no answer**: it {e}.", None
    finally:
        if ours:  # not kept after the answer; a minute's grace, for the browser to fetch its preview
            remove = threading.Timer(UPLOAD_SECONDS, upload.unlink, kwargs={"missing_ok": True})
            remove.daemon = True
            remove.start()
    return (*answer(prepared, name, path), prepared)


def answer(prepared, name, path="picture"):
    """({class: probability} for the bars, the input as the model saw it, scaled up, the line below),
    with predict.py's records: the same figures as `python predict.py --json`."""
    if prepared is None:
        return None, None, HINT
    try:
        model, temperature = load(name)
    except models.ModelError as e:
        return None, None, f"**The model {name} cannot be used**: {e}"
    prepared = np.asarray(prepared, dtype=np.uint8)  # from gr.State, as it was stored
    record = predict.results(models.predict(model, prepared[None]), [path], data.get_labels(), temperature)[0]
    top = record.get("calibrated_top", record["top"])
    shown = Image.fromarray(prepared).resize((SHOWN_SIZE, SHOWN_SIZE), Image.NEAREST)
    label = "calibrated probabilities" if temperature else "probabilities"
    return {c: p for c, p in top}, shown, f"**{record['class']}** ({label} shown). {confidence_line(record)}"


def build_page(default_model, examples):
    import gradio as gr

    class Picture(gr.Image):
        """gr.Image that hands the uploaded file on unopened: predict.py reads it (and says why a
        file is no picture, or refuses a decompression bomb) instead of Gradio failing first."""

        @classmethod
        def get_block_name(cls):
            return "image"

        def preprocess(self, payload):
            if payload is None or (payload.url or "").startswith("data:"):
                return super().preprocess(payload)
            return str(payload.path)

    choices = model_choices()
    with gr.Blocks(title="Fashion-MNIST classifier", analytics_enabled=False) as page:
        gr.Markdown("# Fashion-MNIST classifier\nA picture of one garment, ideally on a plain background. "
                    "It is prepared as Zalando made the dataset (trimmed, 28x28, negated) and classified.")
        with gr.Row():
            with gr.Column():
                picture = Picture(type="filepath", sources=["upload", "clipboard"], label="Picture",
                                  elem_id="picture")
                model = gr.Dropdown(choices, value=default_model if default_model in choices else choices[0],
                                    label="Model", elem_id="model")
                prepared = gr.State()  # the last picture's 28x28 input: a new model answers for it
            with gr.Column():
                bars = gr.Label(num_top_classes=3, label="Top 3", elem_id="bars")
                seen = gr.Image(label="What the model saw (28x28, scaled up)", interactive=False, elem_id="seen",
                                height=SHOWN_SIZE, width=SHOWN_SIZE)
                verdict = gr.Markdown(elem_id="verdict")
        gr.Examples([[str(p)] for p in examples], inputs=[picture], label="Examples: test images as shop photos")
        picture.change(classify, [picture, model], [bars, seen, verdict, prepared], api_name="classify")
        model.change(answer, [prepared, model], [bars, seen, verdict], api_name=False)
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description="A web page to try a trained model.")
    parser.add_argument("--model", default=predict.DEFAULT_MODEL,
                        help=f"the model chosen when the page opens (default: {predict.DEFAULT_MODEL})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    if not model_choices():
        sys.exit("error: no model in models/; train one with python train.py")
    try:
        load(models.model_name(args.model))
        import gradio  # noqa: F401
    except models.ModelError as e:
        sys.exit(f"error: {e}")
    except ImportError:
        sys.exit("error: the web page needs Gradio: pip install -r requirements-app.txt (or: make app)")
    examples = make_examples(Path(tempfile.mkdtemp(prefix="examples-", dir=UPLOADS.parent)))
    atexit.register(shutil.rmtree, examples[0].parent, ignore_errors=True)
    page = build_page(models.model_name(args.model), examples)
    font = ["ui-sans-serif", "system-ui", "sans-serif"]  # local fonts: nothing fetched from other hosts
    import gradio as gr

    try:
        page.launch(server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=["api"],
                    allowed_paths=[str(examples[0].parent)], max_file_size="50mb", prevent_thread_lock=True,
                    theme=gr.themes.Default(font=font, font_mono=["ui-monospace", "monospace"]))
    except OSError as e:  # the port is taken
        sys.exit(f"error: cannot listen on {args.host}:{args.port} ({e}); choose another --port")
    KEPT.update(path.resolve() for path in UPLOADS.rglob("*") if path.is_file())  # the examples, copied by now
    page.block_thread()  # until Ctrl-C or SIGTERM, which Gradio takes to close the server
    print("Stopped: the server is closed", file=sys.stderr)
    sys.exit(machine.stop_code(machine.TERMINATED[0] if machine.TERMINATED else signal.SIGINT))


if __name__ == "__main__":
    machine.run(main)
