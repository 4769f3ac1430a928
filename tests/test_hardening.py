"""Issue 27, what a reliability and security probe found, one test (or a few) per point:

1. deeply nested JSON is a 422, not a 500;   2. a model folder is checked completely at load;
3. decoded pixels are bounded per request and in flight, large images decoded reduced;
4. weights the config does not use, and weights that are not finite, are load errors;
5. Host and Origin checks;   6. a full disk during training is one line, leaves no partial checkpoint
   and a log no further than the model;   7. one line instead of tracebacks;   8. an honest OpenAPI schema.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("multipart", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")

import torch
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from mmgpt import build_model
from mmgpt.api import ModelLoadError, load
from mmgpt.cli import main as cli_main
from mmgpt.serve import create_app
from train.main import main as train_main

ROOT = Path(__file__).resolve().parent.parent
POST_ROUTES = ["/v1/caption", "/v1/ask", "/v1/ask/stream", "/v1/embed", "/v1/similarity"]
SMALL = [
    str(ROOT / "configs/train/shapes-tiny.yaml"),
    "data.train=[{format: shapes, split: train, size: 32, task_mix: {caption: 1, vqa: 1}}]",
    "data.num_workers=0", "batch_size=4", "progress=false", "model.tokenizer_texts=200", "time_schedule=false",
    "max_minutes=null", "data.validation=null",
]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def picture(side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), (235, 235, 235))
    ImageDraw.Draw(im).ellipse((side // 5, side // 5, side - side // 5, side - side // 5), fill=(220, 40, 40))
    return im


class Stub:
    """A pipeline that records the images it is handed; `processor.image_size` is the model's input side."""

    def __init__(self, image_size: int | None = None):
        self.seen: list[tuple[int, int]] = []
        if image_size:
            self.processor = argparse.Namespace(image_size=image_size)

    def caption(self, images, batch_size=16, **gen):
        self.seen += [im.size for im in images]
        return ["a caption"] * len(images)

    def ask(self, images, questions, batch_size=16, **gen):
        self.seen += [im.size for im in images]
        return ["an answer"] * len(images)

    def embed_images(self, images, batch_size=64):
        self.seen += [im.size for im in images]
        return torch.nn.functional.normalize(torch.ones(len(images), 3), dim=-1)

    def embed_texts(self, texts, batch_size=256):
        return torch.nn.functional.normalize(torch.ones(len(texts), 3), dim=-1)

    def stream_answer(self, image, question, **gen):
        self.seen.append(image.size)
        return iter(["an", " answer"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardening") / "tiny"
    torch.manual_seed(0)
    model, proc = build_model("tiny", texts=["a red circle", "a blue square", "question: what color? answer: red"])
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def broken(tiny_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny model folder with `edit(folder)` applied."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    edit(folder)
    return folder


def edit_json(name: str, change):
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(change(data)))
    return edit


def one_line_error(capsys, argv) -> str:
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --- 1. nested JSON ---------------------------------------------------------------------------------


def test_json_depth_counts_nesting_outside_strings():
    from mmgpt.serve.guards import json_depth

    rng = random.Random(0)

    def nest(depth: int):
        if depth == 0:
            return rng.choice([1, "x[{", "]}\"", None, 2.5])
        inner = [nest(depth - 1) for _ in range(rng.randint(1, 3))]
        return inner if rng.random() < 0.5 else {f"k{i}]": v for i, v in enumerate(inner)}

    def reference(x) -> int:  # the nesting json itself sees
        if isinstance(x, list):
            return 1 + max(map(reference, x), default=0)
        if isinstance(x, dict):
            return 1 + max(map(reference, x.values()), default=0)
        return 0

    for depth in range(12):
        value = nest(depth)
        assert json_depth(json.dumps(value).encode()) == reference(value) == depth


@pytest.mark.parametrize("route", POST_ROUTES)
def test_deeply_nested_json_is_a_422_on_every_post_route(route):
    with TestClient(create_app(Stub())) as client:
        for body in (b"[" * 1000 + b"]" * 1000, b'{"images": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
            r = client.post(route, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text
            assert "nested" in json.dumps(r.json()["detail"])
        # the server goes on, and a body that nests a little is read as before
        r = client.post("/v1/caption", json={"images": [base64.b64encode(png(picture(64))).decode()]})
        assert r.status_code == 200 and r.json() == {"captions": ["a caption"]}


# --- 2. 4. 7. model folders ---------------------------------------------------------------------------


def test_a_folder_without_tokenizer_config_fails_at_load_in_one_line(tiny_dir, tmp_path, capsys):
    folder = broken(tiny_dir, tmp_path, lambda f: (f / "tokenizer_config.json").unlink())
    with pytest.raises(ModelLoadError, match="no tokenizer_config.json"):
        load(folder, device="cpu")
    with pytest.raises(ModelLoadError, match="no tokenizer_config.json"):  # the server never starts "healthy"
        create_app(folder, device="cpu")
    image = tmp_path / "red.png"
    picture(64).save(image)
    assert "no tokenizer_config.json" in one_line_error(capsys, ["caption", str(folder), str(image)])


def test_a_tokenizer_without_an_end_token_fails_at_load(tiny_dir, tmp_path):
    def no_specials(cfg: dict) -> dict:
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            cfg.pop(key, None)
        return cfg

    folder = broken(tiny_dir, tmp_path, edit_json("tokenizer_config.json", no_specials))
    with pytest.raises(ModelLoadError, match="no end-of-text token"):
        load(folder, device="cpu")


def test_saved_weights_the_config_does_not_use_are_an_error(tiny_dir, tmp_path, capsys):
    def one_layer(cfg: dict) -> dict:
        cfg["text"]["n_layer"] = 1
        return cfg

    folder = broken(tiny_dir, tmp_path, edit_json("config.json", one_layer))
    with pytest.raises(ModelLoadError, match=r"saved tensors are not used by it, e\.g\. decoder\.transformer\.h\.1\."):
        load(folder, device="cpu")


def test_weights_that_are_not_finite_are_an_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    def nan(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ModelLoadError, match="the weights are not finite"):
        load(broken(tiny_dir, tmp_path, nan), device="cpu")


def test_config_json_that_is_a_list_is_one_line(tiny_dir, tmp_path, capsys):
    folder = broken(tiny_dir, tmp_path, lambda f: (f / "config.json").write_text("[1, 2]"))
    err = one_line_error(capsys, ["caption", str(folder), str(tmp_path / "x.png")])
    assert "config.json holds a JSON list" in err


def test_a_bad_processor_image_size_fails_at_load_not_at_the_first_image(tiny_dir, tmp_path):
    folder = broken(tiny_dir, tmp_path, edit_json("mmgpt_processor.json", lambda c: {**c, "image_size": -3}))
    with pytest.raises(ModelLoadError, match="mmgpt_processor.json: image_size must be a whole number >= 1, got -3"):
        load(folder, device="cpu")


@pytest.mark.parametrize("n_positions, message", [
    (1e9, "Field 'n_positions' expected int, got float"),  # the validator's own reason, not its heading only
    (10**9, r"decoder\.transformer\.wpe\.weight \(saved \[64, 128\], config\.json makes \[1000000000, 128\]\)"),
])
def test_n_positions_that_do_not_fit_the_weights_say_why(tiny_dir, tmp_path, n_positions, message):
    def edit(cfg: dict) -> dict:
        cfg["text"]["n_positions"] = n_positions
        return cfg

    folder = broken(tiny_dir, tmp_path, edit_json("config.json", edit))
    with pytest.raises(ModelLoadError, match=message) as caught:
        load(folder, device="cpu")
    assert "above report" not in str(caught.value)


# --- 3. pixels ------------------------------------------------------------------------------------


def test_large_images_are_decoded_reduced_and_small_ones_untouched():
    stub = Stub(image_size=64)
    blobs = [png(picture(1024)), png(picture(2048), "JPEG"), png(picture(100)), png(picture(64))]
    with TestClient(create_app(stub)) as client:
        r = client.post("/v1/caption", files=[("images", (f"{i}", b)) for i, b in enumerate(blobs)])
    assert r.status_code == 200
    # 2 x 64 = 128 is the least a side keeps: 1024 / 8 (reduce); 2048 -> 256 (JPEG draft at 1/8) -> 128 (reduce)
    assert stub.seen == [(128, 128), (128, 128), (100, 100), (64, 64)]


def test_the_pixels_of_one_request_are_bounded():
    stub = Stub()
    app = create_app(stub, max_pixels=300 * 300, max_request_pixels=2 * 300 * 300, max_inflight_pixels=4 * 300 * 300)
    three = [("images", (f"{i}", png(picture(300)))) for i in range(3)]
    with TestClient(app) as client:
        r = client.post("/v1/caption", files=three)
        assert r.status_code == 413 and "270000 pixels in all" in r.json()["detail"]
        assert client.post("/v1/caption", files=three[:2]).status_code == 200
        assert client.get("/health").json()["config"]["max_request_pixels"] == 180000
    assert len(stub.seen) == 2  # the refused request decoded nothing
    with pytest.raises(ValueError, match=r"max_request_pixels \(10\) must be >= max_pixels"):
        create_app(Stub(), max_pixels=100, max_request_pixels=10)


def test_a_route_added_later_gets_the_same_image_budgets():
    """A route another module adds (the OpenAI-compatible ones, search) passes only its max_pixels to
    decode_images; the app's request budget and reduced decoding still apply (ImageLimitsScope)."""
    from mmgpt.serve.inputs import decode_images

    app = create_app(Stub(image_size=64), max_pixels=300 * 300, max_request_pixels=2 * 300 * 300)

    @app.post("/later")
    async def later(request: Request) -> dict:
        form = await request.form()
        images = await decode_images([await f.read() for f in form.getlist("f")], "f", 300 * 300)
        return {"sizes": [list(im.size) for im in images]}

    with TestClient(app) as client:
        r = client.post("/later", files=[("f", png(picture(300))) for _ in range(3)])
        assert r.status_code == 413 and "at most 180000 pixels" in r.json()["detail"]
        r = client.post("/later", files=[("f", png(picture(300))) for _ in range(2)])
        assert r.json() == {"sizes": [[150, 150], [150, 150]]}  # 300 // 128 = 2: reduced by 2


def test_pixels_in_flight_wait_for_their_turn():
    from mmgpt.serve.inputs import PixelBudget

    async def scenario() -> list[str]:
        budget, order = PixelBudget(100), []

        async def decode(name: str, pixels: int, hold: float):
            got = await budget.acquire(pixels)
            order.append(f"{name}+")
            await asyncio.sleep(hold)
            order.append(f"{name}-")
            budget.release(got)

        await asyncio.gather(decode("a", 60, 0.05), decode("b", 60, 0.01), decode("c", 30, 0.01))
        assert budget.used == 0
        return order

    order = asyncio.run(scenario())
    assert order.index("b+") > order.index("a-")  # 60 + 60 > 100: b waited for a
    assert order.index("c+") < order.index("a-")  # 60 + 30 fit at once


# --- 5. Host and Origin ------------------------------------------------------------------------------


def serve_app(monkeypatch, model_dir: Path, *argv) -> object:
    """The app `mmgpt serve` would run with these flags (its serve loop replaced by a capture)."""
    from mmgpt.commands.serve import add_arguments, run
    from mmgpt.serve import server

    captured = {}
    monkeypatch.setattr(server, "serve", lambda app, sock: captured.setdefault("app", app))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(model_dir), "--port", "0", *argv])) == 0
    return captured["app"]


def test_a_loopback_server_answers_only_to_loopback_host_names(monkeypatch, tiny_dir):
    app = serve_app(monkeypatch, tiny_dir)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST", "app.localhost:8000"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        for host in ("attacker.example:8000", "127.0.0.1.attacker.example", "10.0.0.1:8000"):
            r = client.get("/health", headers={"host": host})
            assert r.status_code == 400 and "Host" in r.json()["detail"], host
            assert client.post("/v1/embed", json={"texts": ["a"]}, headers={"host": host}).status_code == 400


def test_cross_origin_requests_are_refused_unless_allowed(monkeypatch, tiny_dir):
    app = serve_app(monkeypatch, tiny_dir, "--allow-origin", "http://localhost:3000")
    form = {"texts": (None, "a red circle")}  # multipart/form-data: what <form enctype=...> posts
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        # a form POST from a page elsewhere: the model does not run
        r = client.post("/v1/embed", files=form, headers={"origin": "http://attacker.example"})
        assert r.status_code == 403 and "--allow-origin" in r.json()["detail"]
        r = client.post("/v1/embed", files=form, headers={"sec-fetch-site": "cross-site"})
        assert r.status_code == 403
        assert client.post("/v1/embed", files=form, headers={"origin": "null"}).status_code == 403
        # the server's own page, clients without an Origin, and the allowed origin
        assert client.post("/v1/embed", files=form, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
        assert client.post("/v1/embed", files=form).status_code == 200
        r = client.post("/v1/embed", files=form, headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert app.state.batcher.stats.items == 3  # only the three accepted requests reached the model


# --- 6. a full disk in training --------------------------------------------------------------------


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    import accelerate.checkpointing

    out = tmp_path / "run"
    real_save = accelerate.checkpointing.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-step-4" in str(f):
            Path(f).write_bytes(b"partial")
            raise no_space(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    common = [*SMALL, f"output_dir={out}", "checkpoint_every=2"]
    assert train_main([*common, "max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "no space left on " in err and ".tmp-step-4" in err and "resume=latest (from step-2)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # no .tmp-step-4
    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)
    assert train_main([*common, "max_steps=6", "resume=latest"]) == 0  # space again: resume goes on
    assert (out / "model" / "model.safetensors").is_file()


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import train.checkpoint as ckpt

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    assert train_main([*SMALL, f"output_dir={tmp_path}", "checkpoint_every=2", "max_steps=2"]) == 0
    names = {Path(p).name for p in synced if ".tmp-step-2" in p}
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json", "random_states_0.pkl"} <= names


def test_a_full_disk_at_export_keeps_log_and_model_consistent(tmp_path, monkeypatch, capsys):
    import train.run_outputs

    def export(model, processor, path, lora):
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        raise no_space(Path(path) / "model.safetensors")

    monkeypatch.setattr(train.run_outputs, "export_model", export)
    out = tmp_path / "run"
    assert train_main([*SMALL, f"output_dir={out}", "checkpoint_every=4", "max_steps=6", "log_every=1"]) == 2
    err = capsys.readouterr().err
    assert "no space left on " in err and "metrics.jsonl now ends at step-4" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "model").exists() and not list(out.glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 4  # the log ends where resume=latest starts again


# --- 7. resume from a damaged checkpoint -----------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path) -> tuple[Path, list[str]]:
    out = tmp_path / "run"
    common = [*SMALL, f"output_dir={out}", "checkpoint_every=2"]
    assert train_main([*common, "max_steps=4"]) == 0
    return out, common


def test_a_corrupt_checkpoint_on_resume_names_the_file_and_the_previous_checkpoint(two_checkpoints, capsys):
    out, common = two_checkpoints
    weights = out / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert train_main([*common, "max_steps=6", "resume=latest"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is unreadable" in err and f"resume={out / 'checkpoints' / 'step-2'}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unreadable_random_states_on_resume_are_reported(two_checkpoints, capsys):
    out, common = two_checkpoints
    (out / "checkpoints" / "step-4" / "random_states_0.pkl").write_bytes(b"not a pickle")
    capsys.readouterr()
    assert train_main([*common, "max_steps=5", "resume=latest"]) == 0
    printed = capsys.readouterr().out
    assert "random_states_0.pkl is unreadable" in printed and "fresh random states" in printed


# --- 8. the OpenAPI schema --------------------------------------------------------------------------


def keys_in(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | set().union(*map(keys_in, tree.values()))
    if isinstance(tree, list):
        return set().union(*map(keys_in, tree))
    return set()


def test_the_schema_writes_limits_as_json_schema_and_documents_every_error(tiny_dir):
    schema = create_app(tiny_dir, device="cpu").openapi()
    for route in POST_ROUTES:
        op = schema["paths"][route]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert not keys_in(body) & {"ge", "le", "gt", "lt"}, route
        assert {"413", "415", "422", "504"} <= set(op["responses"]), route
    tokens = schema["paths"]["/v1/ask"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"type": "integer", "minimum": 1, "maximum": 64} in tokens["properties"]["max_new_tokens"]["anyOf"]
    question = tokens["properties"]["question"]["description"]
    assert "decoder reads 64 positions" in question and "422" in question
