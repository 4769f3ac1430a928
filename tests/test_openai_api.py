"""The OpenAI-compatible API, through the unmodified `openai` client against a live `mmgpt serve` (a subprocess
on a free loopback port, started once for the module, with an API key): answers equal `vl.chat` on the same
messages, streamed deltas join to the same answer, three turns reuse the past, two images in one message,
embeddings equal `vl.embed_texts` / `vl.embed_images`, and every refusal is OpenAI's error shape (400, 401).

The model is a tiny random one whose weights are jittered until its answers differ between conversations
(an untrained tiny decoder says '::::::::' to everything, which would make equality checks hollow).
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx")

import torch
from PIL import Image, ImageDraw

from mmgpt import build_model
from mmgpt.api import VisionLanguagePipeline, load
from mmgpt.config import MMGPTConfig
from mmgpt.serve import create_app
from mmgpt.serve.openai_schemas import cut_at_stop

KEY = "test-key-1234"
TEXTS = ["a red circle", "a blue square", "what color is it? red", "which image has a circle? the first",
         "how many objects are there? two"]
GEN = 8  # tokens per answer: quick, and three turns stay well inside 256 positions

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def draw(color, shape: str = "circle") -> Image.Image:
    im = Image.new("RGB", (64, 64), (235, 235, 235))
    (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)((12, 12, 52, 52), fill=color)
    return im


RED, BLUE = draw((220, 40, 40)), draw((40, 80, 220), "square")


def data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # lossless: the server decodes the very pixels the test hands vl.chat
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> dict:
    """A user message in OpenAI's shape from PIL images and strings."""
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(p)}} if isinstance(p, Image.Image) else {"type": "text", "text": p}
        for p in parts]}


def local(messages: list[dict]) -> list[dict]:
    """The same conversation as vl.chat takes it: image parts carry the PIL image."""
    def part(p):
        if p["type"] == "text":
            return p
        raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
        return {"type": "image", "image": Image.open(io.BytesIO(raw)).convert("RGB")}

    return [{**m, "content": [part(p) for p in m["content"]] if isinstance(m["content"], list) else m["content"]}
            for m in messages]


CONVERSATIONS = [[user(RED, "what color is it?")], [user(BLUE, "how many objects are there?")],
                 [user(RED, BLUE, "which image has a circle?")]]


def build_chat_model(folder: Path) -> Path:
    for seed in range(16):
        torch.manual_seed(seed)
        model, proc = build_model(MMGPTConfig.from_preset("tiny", max_images=4, text={"n_positions": 256}), texts=TEXTS)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        vl = VisionLanguagePipeline(model, proc, device="cpu")
        answers = [vl.chat(local(c), max_new_tokens=GEN) for c in CONVERSATIONS]
        if all(len(a) >= 3 for a in answers) and len(set(answers)) == len(answers):
            model.save_pretrained(folder)
            proc.save_pretrained(folder)
            return folder
    raise AssertionError("no seed in 0..15 gives a tiny model whose answers differ between conversations")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def vl(model_dir) -> VisionLanguagePipeline:
    return load(model_dir, device="cpu")


def mmgpt_command() -> list[str]:
    exe = Path(sys.executable).parent / "mmgpt"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mmgpt.cli"]


@pytest.fixture(scope="module")
def server(model_dir):
    """`mmgpt serve MODEL --port 0` with MMGPT_API_KEY set; yields its base URL (the port it printed)."""
    env = {**os.environ, "MMGPT_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*mmgpt_command(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    found = threading.Event()

    def read():  # keeps the pipe drained (uvicorn logs every request) and finds the URL
        for line in proc.stderr:
            lines.append(line)
            if "on http://127.0.0.1:" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(120):
            raise AssertionError("mmgpt serve did not start:\n" + "".join(lines))
        url = next(ln for ln in lines if "on http://" in ln).split(" on ")[1].split("/ ")[0]
        deadline = time.monotonic() + 60
        while True:  # the URL is printed just before uvicorn starts
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError("mmgpt serve did not answer /health:\n" + "".join(lines))
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=GEN, **kw)


# --- answers -----------------------------------------------------------------------------------------


def test_models_list_names_the_served_model(client, model_dir):
    (card,) = client.models.list().data
    assert card.id == model_dir.name and card.object == "model"
    assert client.models.retrieve(model_dir.name).id == model_dir.name


def test_plain_completion_equals_vl_chat_with_its_usage(client, vl):
    for messages in CONVERSATIONS:  # one image, another image and question, two images in one message
        r = ask(client, messages)
        expected = vl.chat(local(messages), max_new_tokens=GEN)
        turn = vl.chats.last
        assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == turn.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (turn.prompt_tokens, turn.completion_tokens)
        assert r.usage.total_tokens == turn.prompt_tokens + turn.completion_tokens
        assert r.model == "tiny-chat" and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_streamed_deltas_join_to_the_plain_answer_and_end_with_usage(client, vl):
    messages = CONVERSATIONS[2]
    plain = ask(client, messages).choices[0].message.content
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]  # GEN tokens, no end token: this random model does not stop on its own
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == GEN
    assert chunks[-1].usage.prompt_tokens == ask(client, messages).usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_three_turns_equal_vl_chat_and_follow_ups_reuse_the_past(client, vl):
    messages = [user(RED, "what color is it?")]
    for turn, follow in enumerate(("how many objects are there?", "which image has a circle?", None)):
        r = ask(client, messages)
        answer = r.choices[0].message.content
        assert answer == vl.chat(local(messages), max_new_tokens=GEN)
        if turn:  # the server kept the conversation: the earlier turns' tokens are read, not run again
            assert r.usage.prompt_tokens_details.cached_tokens > 0
        if follow:
            messages = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": follow}]


def test_stop_strings_cut_the_answer_plain_and_streamed(client):
    messages = CONVERSATIONS[0]
    plain = ask(client, messages).choices[0].message.content
    stop = plain[len(plain) // 2:len(plain) // 2 + 2]
    r = ask(client, messages, stop=[stop, "never there"])
    expected, found = cut_at_stop(plain, [stop])
    assert found and r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(ask(client, messages, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_same_seed_samples_the_same_answer(client):
    messages = CONVERSATIONS[1]
    a, b = (ask(client, messages, temperature=1.5, top_p=0.95, seed=7).choices[0].message.content for _ in range(2))
    assert a == b
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       ask(client, messages, temperature=1.5, top_p=0.95, seed=7, stream=True) if c.choices)
    assert streamed == a
    greedy = ask(client, messages, temperature=0).choices[0].message.content
    others = {ask(client, messages, temperature=1.5, seed=s).choices[0].message.content for s in range(4)}
    assert others != {greedy}, "sampling at temperature 1.5 gave the greedy answer for every seed"


def test_embeddings_equal_the_pipelines(client, server, vl):
    texts = ["a red circle", "a blue square"]
    expected = vl.embed_texts(texts)
    for fmt in ("float", None):  # None: the client's default, base64 (decoded by the client)
        kw = {"encoding_format": fmt} if fmt else {}
        r = client.embeddings.create(model="tiny-chat", input=texts, **kw)
        got = torch.tensor([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert r.usage.prompt_tokens > 0
    one = client.embeddings.create(model="tiny-chat", input="a red circle")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), expected[0], atol=1e-5, rtol=1e-5)
    # the extension: data-URL images in the same list, embedded by the image tower
    body = {"input": ["a red circle", {"type": "image_url", "image_url": {"url": data_url(BLUE)}}]}
    r = httpx.post(f"{server}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    torch.testing.assert_close(torch.tensor(data[0]["embedding"]), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(data[1]["embedding"]), vl.embed_images([BLUE])[0], atol=1e-5, rtol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------


def refused(call, status: int) -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value
    err = info.value.body  # the client hands over the "error" object
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what color is it?"}]}]


def test_a_bad_image_is_400_naming_the_part(client):
    not_image = "data:image/png;base64," + base64.b64encode(b"hello, not a png").decode()
    err = refused(lambda: ask(client, image_message(not_image)), 400)
    assert err["param"] == "messages[0].content[0].image_url" and err["code"] == "invalid_image"
    err = refused(lambda: ask(client, image_message("data:image/png;base64,%%%")), 400)
    assert "base64" in err["message"]


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png", "/etc/passwd",
                                 "file:///etc/passwd", "cat.png"])
def test_urls_and_paths_are_400_and_never_opened(client, url):
    err = refused(lambda: ask(client, image_message(url)), 400)
    assert err["param"] == "messages[0].content[0].image_url" and err["type"] == "invalid_request_error"
    assert ("does not fetch URLs" if url.startswith("http") else "never opened") in err["message"]


def test_other_refusals_are_400_in_openais_shape(client):
    err = refused(lambda: ask(client, CONVERSATIONS[0], n=2), 400)
    assert err["param"] == "n" and "one answer" in err["message"]
    err = refused(lambda: ask(client, [{"role": "user", "content": "hello"}]), 400)
    assert err["code"] == "image_required"
    err = refused(lambda: ask(client, CONVERSATIONS[0], extra_body={"tools_please": 1}), 400)
    assert err["code"] == "unknown_parameter" and err["param"] == "tools_please"
    five = [user(RED, RED, BLUE, BLUE, RED, "which image has a circle?")]
    assert refused(lambda: ask(client, five), 400)["code"] == "too_many_images"
    err = refused(lambda: ask(client, [*CONVERSATIONS[0], {"role": "assistant", "content": "red"}]), 400)
    assert "last message" in err["message"]
    too_long = [user(RED, "what color is it? " * 80)]  # more tokens than the decoder's 256 positions
    for stream in (False, True):
        err = refused(lambda: ask(client, too_long, stream=stream), 400)  # noqa: B023 - called at once
        assert "positions" in err["message"], err


def test_a_wrong_or_missing_key_is_401_on_every_v1_route(client, server):
    for key in ("wrong-key", ""):
        other = openai.OpenAI(base_url=f"{server}/v1", api_key=key or "x", max_retries=0,
                              default_headers={} if key else {"Authorization": ""})
        err = refused(lambda: ask(other, CONVERSATIONS[0]), 401)  # noqa: B023 - called at once
        assert err["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/caption", json={"images": [data_url(RED).split(",", 1)[1]]}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(f"{server}/v1/caption", json={"images": [data_url(RED).split(",", 1)[1]]},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["captions"]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # the page and /health stay open


# --- the batcher -------------------------------------------------------------------------------------


def test_concurrent_chat_requests_share_a_batch_and_equal_vl_chat_one_by_one(vl):
    """The whole-answer path in-process: conversations with one and two images in one batch (chat_batch)."""
    import asyncio

    app = create_app(vl, max_wait_ms=300)
    bodies = [{"model": "m", "messages": c, "max_tokens": GEN} for c in CONVERSATIONS]

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    responses = asyncio.run(main())
    expected = [vl.chat(local(c), max_new_tokens=GEN) for c in CONVERSATIONS]
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == expected
    stats = app.state.batcher.stats
    assert stats.items == len(bodies) and stats.batches < len(bodies)
    for r, c in zip(responses, CONVERSATIONS):
        vl.chat(local(c), max_new_tokens=GEN)
        assert r.json()["usage"]["prompt_tokens"] == vl.chats.last.prompt_tokens


# --- the command -------------------------------------------------------------------------------------


def test_serve_warns_beyond_loopback_without_a_key_and_takes_the_key_from_the_environment(model_dir, monkeypatch,
                                                                                           capsys):
    import argparse

    from fastapi.testclient import TestClient

    import mmgpt.serve.server as server_module
    from mmgpt.cli import UserError
    from mmgpt.commands.serve import add_arguments, run

    served = []
    monkeypatch.setattr(server_module, "serve", lambda app, sock, *a, **kw: served.append(app))
    monkeypatch.delenv("MMGPT_API_KEY", raising=False)

    def args(*argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args([str(model_dir), "--port", "0", *argv])

    assert run(args("--host", "0.0.0.0")) == 0
    assert "NO API KEY" in capsys.readouterr().err
    assert run(args("--host", "0.0.0.0", "--api-key", "k")) == 0
    assert "NO API KEY" not in capsys.readouterr().err
    with pytest.raises(UserError, match="empty"):
        run(args("--api-key", " "))
    monkeypatch.setenv("MMGPT_API_KEY", "from-env")
    assert run(args()) == 0
    with TestClient(served[-1], base_url="http://127.0.0.1") as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()["data"][0]["id"] == "tiny-chat"
        assert c.get("/health").status_code == 200


class SlowChats:
    """A stub pipeline's chat engine: answers 'it is red' after `delay` seconds (whole), or piece by piece."""

    def __init__(self, delay: float):
        self.delay = delay

    def answer(self, messages, **gen):
        from mmgpt.chat import ChatTurn

        time.sleep(self.delay)
        return ChatTurn("it is red", prompt_tokens=5, reused_tokens=0, completion_tokens=3, images_encoded=1,
                        finish_reason="stop")


class SlowPipeline:
    def __init__(self, delay: float, first_piece_delay: float = 0.0):
        self.chats, self.first_piece_delay = SlowChats(delay), first_piece_delay

    def stream_chat(self, messages, **gen):
        time.sleep(self.first_piece_delay)
        yield "it"
        for piece in (" is", " red"):
            time.sleep(self.chats.delay)
            yield piece


def post_chat(app, body: dict) -> httpx.Response:
    import asyncio

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.post("/v1/chat/completions", json=body)

    return asyncio.run(main())


def test_slow_answers_are_504_in_openais_shape_and_a_late_stream_ends_with_an_error_chunk():
    body = {"model": "m", "messages": CONVERSATIONS[0]}
    r = post_chat(create_app(SlowPipeline(delay=2.0), timeout_s=0.3), body)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    r = post_chat(create_app(SlowPipeline(delay=0.0, first_piece_delay=2.0), timeout_s=0.3), {**body, "stream": True})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    r = post_chat(create_app(SlowPipeline(delay=0.5), timeout_s=0.3), {**body, "stream": True})
    events = [block.removeprefix("data: ") for block in r.text.strip().split("\n\n")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert '"code": "timeout"' in events[-2] and '"content": "it"' in events[1]
    fast = post_chat(create_app(SlowPipeline(delay=0.0)), {**body, "stop": " red"})
    assert fast.json()["choices"][0]["message"]["content"] == "it is"
    assert fast.json()["choices"][0]["finish_reason"] == "stop"


def test_openapi_documents_the_routes_with_their_bodies_written_out():
    import json

    from fastapi.testclient import TestClient

    with TestClient(create_app(SlowPipeline(delay=0.0)), base_url="http://127.0.0.1") as c:
        doc = c.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/embeddings", "/v1/models"} <= set(doc["paths"])
    body = json.dumps(doc["paths"]["/v1/chat/completions"]["post"]["requestBody"])
    assert "image_url" in body and "max_completion_tokens" in body and "$defs" not in body


def test_the_stop_scanner_sends_what_cut_at_stop_keeps_however_the_answer_is_split():
    import random

    from mmgpt.serve.openai_schemas import StopScanner

    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab c.") for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice("ab c.") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 5)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)]) if text[i:j]]
        scanner, sent, found = StopScanner(stops), "", False
        for piece in pieces:
            out, found = scanner.feed(piece)
            sent += out
            if found:
                break
        if not found:
            sent += scanner.held
        assert (sent, found) == cut_at_stop(text, stops), (text, stops, pieces)


def test_null_fields_read_as_left_out():  # `stop: null` was a 500 (found by make fuzz)
    from mmgpt.serve.openai_schemas import ChatRequest

    nulls = {k: None for k in ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream_options",
                               "frequency_penalty", "presence_penalty", "logprobs", "user", "metadata", "store")}
    req = ChatRequest.model_validate({"messages": CONVERSATIONS[0], **nulls})
    assert req.stop is None and req.n is None
    assert ChatRequest.model_validate({"messages": CONVERSATIONS[0], "stop": "x"}).stop == ["x"]
