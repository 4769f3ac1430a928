"""The web page in real headless Chromium against a real server on a loopback port: choose an image,
read its caption, drop another, ask a question, read the streamed answer; each equals what the
pipeline says directly.

Needs Debian's chromium (`apt-get install chromium`) and the `playwright` Python package, whose
driver starts the installed browser (no `playwright install`, no download). Skipped without them.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("MMGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on PATH (apt-get install chromium, or set MMGPT_CHROMIUM)", allow_module_level=True)
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from test_serve import COLORS, QUESTION, build_tiny, draw, png

from mmgpt.api import load
from mmgpt.serve import create_app
from mmgpt.serve.server import background

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base_url(model_dir):
    with background(create_app(model_dir, device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    # launch() gives the browser a fresh temporary profile (--user-data-dir) and --headless
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def read_when_done(page, selector: str) -> str:
    page.wait_for_selector(f'{selector}[data-state="done"], {selector}[data-state="error"]', timeout=WAIT_MS)
    el = page.locator(selector)
    assert el.get_attribute("data-state") == "done", el.text_content()
    return el.text_content()


def test_caption_then_streamed_answer_in_chromium(page, base_url, model_dir):
    vl = load(model_dir, device="cpu")
    first, second = draw(COLORS[0]), draw(COLORS[1])
    page.goto(base_url + "/")
    assert page.title().startswith("mmgpt")

    page.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png(first)}])
    caption = read_when_done(page, "#caption")
    assert caption == vl.caption(first) and caption

    with page.expect_response("**/v1/ask/stream") as reply:
        page.fill("#question", QUESTION)
        page.click("#ask")
    assert reply.value.status == 200 and reply.value.headers["content-type"].startswith("text/event-stream")
    assert read_when_done(page, "#answer") == vl.ask(first, QUESTION)

    # drag and drop a second image onto the drop zone: its caption replaces the first
    data = list(png(second))
    transfer = page.evaluate_handle(
        """(bytes) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "blue.png", { type: "image/png" }));
            return dt;
        }""",
        data,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_function("document.querySelector('#answer').dataset.state === 'idle'", timeout=WAIT_MS)
    assert read_when_done(page, "#caption") == vl.caption(second)


def test_the_page_shows_server_errors(page, base_url):
    page.goto(base_url + "/")
    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.wait_for_selector('#caption[data-state="error"]', timeout=WAIT_MS)
    assert page.locator("#caption").text_content() == "images[0]: not an image"
