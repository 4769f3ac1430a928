"""The web page in real headless Chromium against a real server on a loopback port: choose an image,
read its caption, drop another, ask a question, read the streamed answer; each equals what the
pipeline says directly.

Needs Debian's chromium (`apt-get install chromium`) and the `playwright` Python package, whose
driver starts the installed browser (no `playwright install`, no download). Skipped without them.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM = os.environ.get("MMGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on PATH (apt-get install chromium, or set MMGPT_CHROMIUM)", allow_module_level=True)
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from test_chat_cli import ANSWERS, Q1, Q2, WORLD, train_chat_model
from test_chat_cli import draw as draw_shape
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

    with page.expect_response("**/v1/chat/completions") as reply:  # a conversation of one turn
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
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 2", timeout=WAIT_MS)
    assert read_when_done(page, "#caption") == vl.caption(second)


def test_the_page_shows_server_errors(page, base_url):
    page.goto(base_url + "/")
    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.wait_for_selector('#caption[data-state="error"]', timeout=WAIT_MS)
    assert page.locator("#caption").text_content() == "notes.png: not an image"
    assert page.locator("#thumbs .thumb").count() == 0  # it left the conversation


def test_api_docs_render_offline_in_chromium(page, base_url):
    """/docs (Swagger UI) and /redoc list the operations with every request to another host refused: their
    scripts and styles come from this server (a CDN script would leave the pages blank)."""
    outside: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(base_url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    try:
        page.goto(base_url + "/docs")
        path = page.locator('.opblock-summary-path[data-path="/v1/chat/completions"]')
        path.wait_for(timeout=WAIT_MS)
        assert path.inner_text().replace("\u200b", "") == "/v1/chat/completions"
        assert page.locator(".opblock").count() >= 10  # caption, ask, embed, ... from /openapi.json
        page.goto(base_url + "/redoc")
        page.wait_for_selector("h1", timeout=WAIT_MS)
        assert page.locator("h1").first.inner_text().startswith("mmgpt:")
        page.wait_for_selector('h2:has-text("Chat Completions")', timeout=WAIT_MS)  # the operation's summary
    finally:
        page.unroute("**/*", only_this_server)
    # ReDoc's script asks its CDN for the logo of its "API docs by Redocly" footer, and nothing else
    assert [url for url in outside if url != "https://cdn.redoc.ly/redoc/logo-mini.svg"] == []


# --- the chat ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return train_chat_model(tmp_path_factory.mktemp("chat-model"))  # 4 images, answers of several words


class SlowPieces:
    """A streamed answer whose pieces come at least DELAY_S apart (its `turn` as the stream's)."""

    DELAY_S = 0.2

    def __init__(self, pieces):
        self.pieces, self.first = pieces, True

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = next(self.pieces)
        if not self.first:
            time.sleep(self.DELAY_S)
        self.first = False
        return piece

    @property
    def turn(self):
        return getattr(self.pieces, "turn", None)


class SlowStreams:
    """A pipeline whose streamed answers come piece by piece slowly enough that each piece reaches the page
    on its own however busy the machine is: the test sees the answer grow."""

    def __init__(self, vl):
        self.vl = vl

    def __getattr__(self, name: str):
        return getattr(self.vl, name)

    def stream_chat(self, *args, **kwargs) -> SlowPieces:
        return SlowPieces(self.vl.stream_chat(*args, **kwargs))


@pytest.fixture(scope="module")
def chat_url(chat_dir):
    with background(create_app(SlowStreams(load(chat_dir, device="cpu")), name=chat_dir.name)) as url:
        yield url


def drop_files(page, files: list[tuple[str, bytes]]) -> None:
    """Drag and drop files onto the drop zone, all at once."""
    transfer = page.evaluate_handle(
        """(files) => {
            const dt = new DataTransfer();
            for (const [name, bytes] of files) dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
            return dt;
        }""",
        [[name, list(data)] for name, data in files],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


WATCH_ANSWERS = """() => {  // every text each answer bubble shows, in order, as it streams in
    window.seen = [];
    new MutationObserver(() => {
        const last = [...document.querySelectorAll('#log .assistant')].pop();
        if (last && last.textContent && window.seen[window.seen.length - 1] !== last.textContent)
            window.seen.push(last.textContent);
    }).observe(document.querySelector('#log'), { childList: true, subtree: true, characterData: true });
}"""


def ask_and_read(page, question: str) -> tuple[str, list[str]]:
    """Send a question; -> the answer once done, and the texts its bubble showed on the way."""
    page.evaluate("() => { window.seen = []; }")
    with page.expect_response("**/v1/chat/completions") as reply:
        page.fill("#question", question)
        page.click("#ask")
    assert reply.value.status == 200 and reply.value.headers["content-type"].startswith("text/event-stream")
    answer = read_when_done(page, "#answer")
    return answer, page.evaluate("() => window.seen")


def test_chat_two_images_streamed_follow_up_and_reset(page, chat_url, chat_dir):
    vl = load(chat_dir, device="cpu")
    red, blue = (draw_shape(f, s) for f, s, _ in WORLD)
    page.goto(chat_url + "/")
    page.evaluate(WATCH_ANSWERS)

    drop_files(page, [("red.png", png(red)), ("blue.png", png(blue))])
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb.pending').length === 2", timeout=WAIT_MS)
    assert page.locator("#thumbs .thumb .n").all_text_contents() == ["1", "2"]

    # the first question takes both images; the answer streams in piece by piece
    msgs = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "image", "image": blue},
                                         {"type": "text", "text": Q1}]}]
    answer, seen = ask_and_read(page, Q1)
    assert answer == vl.chat(msgs) and " " in answer
    assert len(seen) >= 2 and seen[-1] == answer and all(answer.startswith(s) for s in seen), seen

    # the follow-up is sent with the whole conversation; the images stay in view, no longer pending
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": Q2}]
    follow_up, _ = ask_and_read(page, Q2)
    assert follow_up == vl.chat(msgs)
    assert page.locator("#thumbs .thumb").count() == 2 and page.locator("#thumbs .thumb.pending").count() == 0
    assert page.locator("#log .msg").all_text_contents() == [Q1, answer, Q2, follow_up]

    # Reset starts over; an image not sent yet can be removed: the blue square alone is asked about
    page.click("#reset")
    assert page.locator("#thumbs .thumb").count() == 0 and page.locator("#log .msg").count() == 0
    assert page.locator("#ask").is_disabled()
    drop_files(page, [("red.png", png(red)), ("blue.png", png(blue))])
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 2", timeout=WAIT_MS)
    page.click("#thumbs .thumb:first-child .x")
    assert page.locator("#thumbs img").get_attribute("alt") == "blue.png"
    assert page.locator("#thumbs .thumb .n").all_text_contents() == ["1"]
    again, _ = ask_and_read(page, Q1)
    assert again == vl.chat([{"role": "user", "content": [{"type": "image", "image": blue},
                                                          {"type": "text", "text": Q1}]}]) == ANSWERS["blue"][0]


def test_chat_asks_for_the_api_key_and_keeps_it_in_the_page(page, chat_dir):
    red = draw_shape(*WORLD[0][:2])
    with background(create_app(chat_dir, device="cpu", api_key="sesame")) as url:
        page.goto(url + "/")
        assert page.locator("#key-box").get_attribute("open") is None
        page.evaluate(  # paste the image into the question field
            """(bytes) => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], "red.png", { type: "image/png" }));
                document.querySelector("#question").dispatchEvent(
                    new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
            }""",
            list(png(red)),
        )
        assert page.locator("#thumbs .thumb").count() == 1
        page.wait_for_selector('#caption[data-state="error"]', timeout=WAIT_MS)
        assert page.locator("#caption").text_content() == "this server needs an API key: enter it below"
        assert page.locator("#key-box").get_attribute("open") is not None

        page.fill("#key", "wrong")
        page.fill("#question", Q1)
        page.click("#ask")
        page.wait_for_selector('#answer[data-state="error"]', timeout=WAIT_MS)
        assert page.locator("#answer").text_content() == "the server refused this API key"
        assert page.input_value("#question") == Q1  # the question waits to be sent again

        page.fill("#key", "sesame")
        page.click("#ask")
        assert read_when_done(page, "#answer") == ANSWERS["red"][0]
        stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]


def test_chat_sends_a_large_image_as_a_smaller_jpeg(page, chat_url):
    import base64
    import io
    import json

    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 1100, 3), dtype=np.uint8))
    big = png(noise)
    assert 1.5 * 2**20 < len(big) < 10 * 2**20  # over the page's 1.5 MB, within the server's 10 MB
    page.goto(chat_url + "/")
    page.set_input_files("#file", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": big}])
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#question", Q1)
        page.click("#ask")
    read_when_done(page, "#answer")
    url = json.loads(sent.value.post_data)["messages"][0]["content"][0]["image_url"]["url"]
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        assert im.size == (1024, 745)  # the long side to 1024, the aspect kept
