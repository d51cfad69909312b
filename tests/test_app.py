"""app.py in a real browser: Debian's headless Chromium, driven by Playwright, on a server started
here on a free local port and stopped at the end by its own process."""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data
import predict

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.xdist_group("app")  # one server for this file's tests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server():
    """`python app.py --port N` as a user starts it; (url, the process)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not listening(port):
        assert process.poll() is None and time.time() < deadline, process.communicate(timeout=10)[0]
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", process
    process.terminate()
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 143 and "Traceback" not in output, output
    assert not listening(port)  # nothing left listening


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Catalogue-style photos of test images (not the page's examples: others, placed otherwise): paths, labels."""
    folder = tmp_path_factory.mktemp("photos")
    x, y = data.load_data("t10k")
    rng = np.random.default_rng(11)
    chosen = [100, 200, 300, 400, 500]
    paths = []
    for i in chosen:
        paths.append(folder / f"test{i}.jpg")
        predict.catalogue_photo(x[i], rng).save(paths[-1], quality=90)
    return paths, [data.get_labels()[y[i]] for i in chosen]


HINT = "Drop a picture above, paste one, or click an example."


def answer(page, start):
    """Clear the picture, then wait for the page's answer to `start` (a call that uploads or clicks):
    (class shown or None, bars, the line below them, seconds)."""
    clear = page.locator("#picture button[aria-label='Clear']")
    if clear.count():
        clear.click()
        page.wait_for_function(f"document.querySelector('#verdict').innerText.trim() == {HINT!r}", timeout=30_000)
    began = time.perf_counter()
    start()
    page.wait_for_function(f"(t => t && t != {HINT!r} && !/processing|queue/.test(t))"
                           f"(document.querySelector('#verdict').innerText.trim())", timeout=60_000)
    seconds = time.perf_counter() - began
    page.wait_for_timeout(500)  # the browser may send the picture twice; the second answer changes nothing
    # The answer is read in the same moment as it is found finished: read afterwards, the second
    # send's "processing" may have begun in between (it did, on a loaded machine).
    shown, bars, line = page.wait_for_function("""() => {
        const line = document.querySelector('#verdict').innerText.trim();
        if (/processing|queue/.test(line)) return null;
        const shown = document.querySelector('#bars [data-testid=label-output-value]');
        return [shown ? shown.innerText : null, document.querySelectorAll('#bars meter').length, line];
    }""").json_value()
    return shown, bars, line, seconds


def test_a_person_uploads_photos_clicks_an_example_and_a_broken_file(server, browser, photos, tmp_path):
    url, _ = server
    page = browser.new_page(viewport={"width": 1200, "height": 950})
    elsewhere = []
    page.on("request", lambda request: elsewhere.append(request.url)
            if not request.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.goto(url)
    page.wait_for_selector("#picture input[type=file]", state="attached")
    upload = page.locator("#picture input[type=file]")

    right, times = 0, []
    for path, label in zip(*photos):
        shown, bars, line, seconds = answer(page, lambda: upload.set_input_files(str(path)))
        assert bars == 3 and line.startswith(shown), line
        right += shown == label
        times.append(seconds)
    print(f"\n{right} of {len(times)} photos right, {np.mean(times):.2f} s an answer")
    assert right >= len(times) - 1  # best: 94 % on such photos

    examples = page.locator("button.gallery-item")
    assert examples.count() == 10
    for index in (0, 0, 7):  # twice the same: an example is never deleted as an upload is
        shown, bars, line, _ = answer(page, lambda: examples.nth(index).click())
        assert (shown, bars) == (data.get_labels()[index], 3), line

    (tmp_path / "notes.png").write_text("this is text, not a picture")
    shown, bars, line, _ = answer(page, lambda: upload.set_input_files(str(tmp_path / "notes.png")))
    assert shown is None and bars == 0 and line.startswith("This file gives no answer: it cannot be read as an image")
    shown, bars, _, _ = answer(page, lambda: upload.set_input_files(str(photos[0][0])))  # the server survived
    assert (shown, bars) == (photos[1][0], 3)
    page.screenshot(path=str(tmp_path / "App.png"), full_page=True)
    assert (tmp_path / "App.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert elsewhere == []  # offline: nothing fetched from another host
    page.close()


def test_the_http_api_gives_what_predict_py_gives(server, photos):
    from gradio_client import Client, handle_file

    url, _ = server
    path = photos[0][0]
    bars, _, line = Client(url, verbose=False).predict(handle_file(str(path)), "best", api_name="/classify")
    expected = json.loads(subprocess.run([sys.executable, "predict.py", "--json", str(path)], cwd=ROOT,
                                         capture_output=True, text=True, check=True).stdout)[0]
    assert bars["label"] == expected["class"] and line.startswith(f"**{expected['class']}**")
    assert {c["label"]: round(c["confidence"], 4) for c in bars["confidences"]} == dict(expected["calibrated_top"])
