"""The HTTP app in-process: results equal the pipeline's own, concurrent requests share model calls,
and every limit answers with its status (413, 415, 422, 504).

Real-model tests serve an untrained tiny model (arbitrary but deterministic outputs) and compare
with the same pipeline called directly. Batching and timeouts use a stub pipeline that records
each call and can be made slow.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("multipart", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is needed by FastAPI's TestClient")

import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from mmgpt import build_model
from mmgpt.api import VisionLanguagePipeline, load
from mmgpt.serve import create_app

QUESTION = "what color is it?"
TEXTS = ["a red circle", "a blue square", "a green circle on grey", f"question: {QUESTION} answer: red"]
COLORS = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (225, 200, 30), (120, 40, 160), (20, 20, 20)]


def draw(color, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(im).ellipse((size // 5, size // 5, size - size // 5, size - size // 5), fill=color)
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build_tiny(folder: Path) -> Path:
    """Save an untrained tiny model whose caption and answer for draw(COLORS[0]) are not empty (an
    untrained decoder often ends at once; an empty string would make equality checks hollow)."""
    image = draw(COLORS[0])
    for seed in range(32):
        torch.manual_seed(seed)
        model, proc = build_model("tiny", texts=TEXTS)
        vl = VisionLanguagePipeline(model, proc, device="cpu")
        if vl.caption(image) and vl.ask(image, QUESTION):
            model.save_pretrained(folder)
            proc.save_pretrained(folder)
            return folder
    raise AssertionError("no seed in 0..31 gives a tiny model with a non-empty caption")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def vl(model_dir) -> VisionLanguagePipeline:
    return load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, device="cpu", max_wait_ms=20)) as c:
        yield c


class StubPipeline:
    """Records (task, batch size, options) per call; `delay` seconds per call; answers from the image."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[tuple[str, int, dict]] = []

    def _call(self, task, items, gen):
        assert all(isinstance(im, Image.Image) for im in items), "the server hands over decoded images only"
        self.calls.append((task, len(items), gen))
        time.sleep(self.delay)

    def caption(self, images, batch_size=16, **gen):
        self._call("caption", images, gen)
        return [f"{im.getpixel((32, 32))} {gen.get('max_new_tokens', 32)}" for im in images]

    def ask(self, images, questions, batch_size=16, **gen):
        self._call("ask", images, gen)
        return [f"{q} {im.getpixel((32, 32))}" for im, q in zip(images, questions)]

    def embed_images(self, images, batch_size=64):
        self._call("embed_images", images, {})
        return torch.nn.functional.normalize(torch.tensor([im.getpixel((32, 32)) for im in images]).float(), dim=-1)

    def embed_texts(self, texts, batch_size=256):
        self.calls.append(("embed_texts", len(texts), {}))
        return torch.nn.functional.normalize(torch.tensor([[len(t), 1.0, 2.0] for t in texts]), dim=-1)

    def stream_answer(self, image, question, **gen):
        self._call("stream", [image], gen)
        for word in ("it", " is", " red"):
            time.sleep(self.delay)
            yield word


def run_concurrently(app, requests: list[dict]) -> list:
    """POST all `requests` (httpx keyword dicts) at once, in-process, under the app's lifespan."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await asyncio.gather(*(c.post(**r) for r in requests))

    return asyncio.run(main())


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return events


# --- results ---------------------------------------------------------------------------------------


def test_health_docs_and_page(client, model_dir):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == model_dir.name and health["device"] == "cpu"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/caption", "/v1/ask", "/v1/ask/stream", "/v1/embed", "/v1/similarity", "/health"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/caption"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'id="caption"' in page.text


def test_caption_and_ask_equal_the_pipeline(client, vl):
    images = [draw(c) for c in COLORS[:3]]
    files = [("images", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]

    one = client.post("/v1/caption", files=files[:1])
    assert one.status_code == 200, one.text
    assert one.json() == {"captions": [vl.caption(images[0])]} and vl.caption(images[0])  # non-empty

    several = client.post("/v1/caption", files=files, data={"max_new_tokens": "5", "num_beams": "2"})
    assert several.json()["captions"] == vl.caption(images, max_new_tokens=5, num_beams=2)

    as_json = client.post("/v1/ask", json={
        "images": [b64(png(im)) for im in images[:2]] + ["data:image/png;base64," + b64(png(images[2]))],
        "question": QUESTION,
    })
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["answers"] == vl.ask(images, QUESTION)


def test_embed_and_similarity_equal_the_pipeline(client, vl):
    images, texts = [draw(c) for c in COLORS[:2]], ["a red circle", "a blue square", "grey"]
    encoded = [b64(png(im)) for im in images]
    emb = client.post("/v1/embed", json={"images": encoded, "texts": texts}).json()
    assert torch.allclose(torch.tensor(emb["image_embeddings"]), vl.embed_images(images), atol=1e-5)
    assert torch.allclose(torch.tensor(emb["text_embeddings"]), vl.embed_texts(texts), atol=1e-5)
    only_texts = client.post("/v1/embed", json={"texts": texts[:1]}).json()
    assert only_texts["image_embeddings"] == [] and len(only_texts["text_embeddings"]) == 1

    sim = client.post("/v1/similarity", files=[("images", png(im)) for im in images], data={"texts": texts})
    assert sim.status_code == 200, sim.text
    assert torch.allclose(torch.tensor(sim.json()["similarity"]), vl.similarity(images, texts), atol=1e-5)


def test_streamed_pieces_join_to_the_pipelines_answer(client, vl):
    image = draw(COLORS[0])
    r = client.post("/v1/ask/stream", files={"image": ("a.png", png(image))},
                    data={"question": QUESTION, "max_new_tokens": "12"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    expected = vl.ask(image, QUESTION, max_new_tokens=12)
    assert events[-1] == ("done", {"answer": expected}) and expected
    assert "".join(e["text"] for name, e in events[:-1] if name == "message") == expected


# --- batching --------------------------------------------------------------------------------------


def test_concurrent_requests_share_model_calls_and_get_their_own_results():
    stub = StubPipeline(delay=0.05)
    app = create_app(stub, max_batch_size=16, max_wait_ms=100)
    images = [draw(COLORS[i % len(COLORS)]) for i in range(12)]
    requests = [{"url": "/v1/caption", "files": {"images": png(im)},
                 "data": {"max_new_tokens": str(4 + i % 2)}} for i, im in enumerate(images)]
    responses = run_concurrently(app, requests)

    for i, (r, im) in enumerate(zip(responses, images)):  # each answer is about its own image and options
        assert r.json() == {"captions": [f"{im.getpixel((32, 32))} {4 + i % 2}"]}
    sizes = [n for _, n, _ in stub.calls]
    assert sum(sizes) == 12 and len(stub.calls) < 12, sizes  # fewer model calls than requests
    for _, n, gen in stub.calls:  # options never mix in one call: 6 requests each, 2 groups
        assert gen["max_new_tokens"] in (4, 5)
    assert max(sizes) > 1

    stub_off = StubPipeline()
    responses = run_concurrently(create_app(stub_off, max_batch_size=1), requests)
    assert all(r.status_code == 200 for r in responses)
    assert [n for _, n, _ in stub_off.calls] == [1] * 12  # batching off: one call per request


def test_a_request_the_model_refuses_is_422_and_fails_no_other_request_in_its_batch(model_dir, vl):
    """A question too long for the decoder's 64 positions, batched with good ones: it alone is refused."""
    app = create_app(model_dir, device="cpu", max_batch_size=8, max_wait_ms=300)
    long_q = "is there a red circle next to the blue square? " * 8  # > 64 byte-level tokens
    requests = [{"url": "/v1/ask", "json": {"images": [b64(png(draw(c)))], "question": long_q if i == 2 else "what color?"}}
                for i, c in enumerate(COLORS)]
    responses = run_concurrently(app, requests)
    assert responses[2].status_code == 422 and "shorten the question" in responses[2].json()["detail"]
    for i, (r, c) in enumerate(zip(responses, COLORS)):
        if i != 2:
            assert r.status_code == 200 and r.json()["answers"] == [vl.ask(draw(c), "what color?")]
    assert app.state.batcher.stats.batches < len(requests)  # they were batched (then run one by one)


def test_concurrent_requests_on_the_model_batch_and_equal_one_by_one(model_dir, vl):
    app = create_app(model_dir, device="cpu", max_wait_ms=200)
    images = [draw(c) for c in COLORS]
    responses = run_concurrently(app, [{"url": "/v1/caption", "json": {"images": [b64(png(im))]}} for im in images])
    assert [r.json()["captions"][0] for r in responses] == [vl.caption(im) for im in images]
    stats = app.state.batcher.stats
    assert stats.items == len(images) and stats.batches < len(images)


# --- limits ----------------------------------------------------------------------------------------


def noise_png(size: int) -> bytes:
    """A PNG that does not compress: size * size * 3 bytes and more."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=gen).numpy()
    return png(Image.fromarray(pixels))


def test_request_body_over_the_limit_is_413():
    stub = StubPipeline()
    app = create_app(stub, max_upload_bytes=20_000)
    big, small = noise_png(100), png(draw(COLORS[0]))
    assert len(big) > 20_000 > len(small)

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    with TestClient(app) as c:
        assert c.post("/v1/caption", files={"images": big}).status_code == 413
        r = c.post("/v1/caption", json={"images": [b64(big)]})
        assert r.status_code == 413 and "20000 bytes" in r.json()["detail"]
        no_length = c.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
        assert no_length.status_code == 413  # chunked: counted while it arrives
        assert c.post("/v1/caption", files={"images": small}).status_code == 200
    assert len(stub.calls) == 1


def test_image_over_the_pixel_limit_is_413():
    stub = StubPipeline()
    with TestClient(create_app(stub, max_pixels=48 * 48)) as c:
        r = c.post("/v1/caption", files={"images": png(draw(COLORS[0], size=64))})
        assert r.status_code == 413 and "64 x 64 = 4096 pixels > 2304" in r.json()["detail"]
        assert c.post("/v1/caption", files={"images": png(draw(COLORS[0], size=48))}).status_code == 200


def test_non_images_are_415_and_broken_images_422():
    stub = StubPipeline()
    with TestClient(create_app(stub)) as c:
        r = c.post("/v1/caption", files={"images": ("notes.txt", b"just some text", "text/plain")})
        assert r.status_code == 415 and r.json()["detail"] == "images[0]: not an image"
        r = c.post("/v1/ask", json={"images": [b64(png(draw(COLORS[0]))), b64(b"GIF89a not really")], "question": "?"})
        assert r.status_code == 415 and r.json()["detail"].startswith("images[1]:")
        truncated = png(draw(COLORS[0]))[:200]
        r = c.post("/v1/caption", files={"images": truncated})
        assert r.status_code == 422 and "truncated" in r.json()["detail"]
        r = c.post("/v1/caption", content=b"images=x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
    assert stub.calls == []


@pytest.mark.parametrize(("path", "fields", "message"), [
    ("/v1/caption", {"max_new_tokens": 65}, "less than or equal to 64"),
    ("/v1/caption", {"max_new_tokens": 0}, "greater than or equal to 1"),
    ("/v1/caption", {"num_beams": 6}, "less than or equal to 5"),
    ("/v1/caption", {"num_beams": 0}, "greater than or equal to 1"),
    ("/v1/caption", {"num_beams": True}, "expected an integer, got a boolean"),  # JSON true is not 1
    ("/v1/caption", {"do_sample": True}, "Extra inputs"),  # options beyond the bounded ones are refused
    ("/v1/caption", {"images": []}, "at least 1 item"),
    ("/v1/caption", {"images": [b64(png(draw(COLORS[0])))] * 17}, "at most 16 items"),
    ("/v1/ask", {"question": ""}, "at least 1 character"),
    ("/v1/ask/stream", {"num_beams": 2}, "less than or equal to 1"),
    ("/v1/embed", {"images": [], "texts": []}, "give images, texts or both"),
    ("/v1/similarity", {"texts": ["a" * 1001]}, "at most 1000 characters"),
])
def test_out_of_range_options_are_422(path, fields, message):
    stub = StubPipeline()
    image = b64(png(draw(COLORS[0])))
    body = {"image": image} if path.endswith("stream") else {"images": [image]}
    body |= {"question": QUESTION} if path.startswith("/v1/ask") else {}
    body |= {"texts": ["a"]} if path in ("/v1/embed", "/v1/similarity") else {}
    with TestClient(create_app(stub)) as c:
        r = c.post(path, json=body | fields)
    assert r.status_code == 422, r.text
    assert [message in e["msg"] for e in r.json()["detail"]] == [True]
    assert stub.calls == []


@pytest.mark.parametrize("request_kw", [
    {"json": {"path": "/etc/hostname"}},
    {"json": {"image_path": "/etc/hostname", "question": QUESTION}},
    {"json": {"images": ["/etc/hostname"], "question": QUESTION}},
    {"json": {"images": ["file:///etc/hostname"], "question": QUESTION}},
    {"json": {"images": ["../../etc/hostname"], "question": QUESTION}},
    {"data": {"images": "/etc/hostname", "question": QUESTION}, "files": {"images": png(draw(COLORS[0]))}},
    {"json": {"images": [b64(b"x")], "url": "http://127.0.0.1/a.png", "question": QUESTION}},
])
def test_paths_and_urls_are_refused(request_kw):
    stub = StubPipeline()
    with TestClient(create_app(stub)) as c:
        r = c.post("/v1/ask", **request_kw)
    assert r.status_code == 422, r.text
    assert "paths" in r.json()["detail"][0]["msg"]
    assert stub.calls == []


def test_base64_that_looks_like_a_path_is_only_ever_bytes():
    stub = StubPipeline()
    with TestClient(create_app(stub)) as c:  # "/tmp" is valid base64: decoded, it is 3 bytes, not a file name
        r = c.post("/v1/caption", json={"images": ["/tmp"]})
    assert r.status_code == 415 and r.json()["detail"] == "images[0]: not an image"


def test_slow_requests_are_504_and_the_server_goes_on():
    stub = StubPipeline(delay=0.5)
    with TestClient(create_app(stub, timeout_s=0.1)) as c:
        t0 = time.monotonic()
        r = c.post("/v1/caption", files={"images": png(draw(COLORS[0]))})
        assert r.status_code == 504 and "0.1 s" in r.json()["detail"]
        assert time.monotonic() - t0 < 0.45  # answered at the timeout, not when the model finished
        r = c.post("/v1/ask/stream", files={"image": png(draw(COLORS[0]))}, data={"question": QUESTION})
        assert r.status_code == 504  # the first piece came too late
        stub.delay = 0.0
        time.sleep(0.5)  # the slow call still running in the worker finishes
        assert c.post("/v1/caption", files={"images": png(draw(COLORS[0]))}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_stream_slots_are_given_back():
    stub = StubPipeline()
    with TestClient(create_app(stub, max_streams=1, timeout_s=5)) as c:
        for _ in range(3):  # with one slot, a slot kept by a finished stream would block the next: 504
            r = c.post("/v1/ask/stream", files={"image": png(draw(COLORS[0]))}, data={"question": QUESTION})
            assert r.status_code == 200
            assert sse_events(r.text)[-1] == ("done", {"answer": "it is red"})


# --- the command -----------------------------------------------------------------------------------


def serve_args(*argv) -> argparse.Namespace:
    from mmgpt.commands.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_serve_command_reports_user_errors(model_dir, tmp_path):
    from mmgpt.cli import UserError
    from mmgpt.commands.serve import run

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            run(serve_args(model_dir, "--port", port))
    with pytest.raises(UserError, match="no such model folder"):
        run(serve_args(tmp_path / "missing", "--port", 0))
    with pytest.raises(UserError, match="--max-batch-size must be >= 1"):
        run(serve_args(model_dir, "--max-batch-size", 0))
    with pytest.raises(UserError, match="--max-upload-mb must be > 0, got -1"):
        run(serve_args(model_dir, "--max-upload-mb", -1))
    assert serve_args(model_dir).host == "127.0.0.1"  # loopback unless told otherwise


def test_a_stream_that_runs_out_of_time_ends_with_an_error_event():
    stub = StubPipeline(delay=0.4)  # the call, then each piece, takes 0.4 s: pieces at 0.8, 1.2, 1.6 s
    with TestClient(create_app(stub, timeout_s=1.0)) as c:
        r = c.post("/v1/ask/stream", files={"image": png(draw(COLORS[0]))}, data={"question": QUESTION})
    assert r.status_code == 200  # the first piece was in time
    assert sse_events(r.text) == [("message", {"text": "it"}), ("error", {"detail": "no full answer within 1 s"})]


def test_setting_the_cancel_event_stops_generation(vl):
    import threading

    from transformers import StoppingCriteriaList

    from mmgpt.serve.streaming import Cancel

    image, stop = draw(COLORS[0]), threading.Event()
    full = vl.ask(image, QUESTION, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([Cancel(stop)]))
    stop.set()
    cut = vl.ask(image, QUESTION, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([Cancel(stop)]))
    assert full == vl.ask(image, QUESTION, max_new_tokens=20)  # unset: no effect
    assert len(vl.processor.tokenizer(cut)["input_ids"]) <= 1 < len(vl.processor.tokenizer(full)["input_ids"])


def test_health_is_503_outside_the_lifespan():
    r = TestClient(create_app(StubPipeline())).get("/health")  # no `with`: the batch worker never started
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
