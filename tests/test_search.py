"""Search: an index of a folder of drawn images (the tiny model of test_api, trained on the spot) against
the brute-force similarity of the same model; incremental updates and a build killed half-way against
one clean build; bad files, another model, the command line."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_api import WORLD

from mmgpt import build_model
from mmgpt.api import load
from mmgpt.cli import main as cli
from mmgpt.search import SearchIndex, SearchIndexError, build, update
from mmgpt.search import index as index_module
from mmgpt.search.recall import recall_at
from mmgpt.search.store import Store
from train.metrics import retrieval_metrics

pytestmark = pytest.mark.usefixtures("single_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
VARIANTS = 6  # drawings of each WORLD kind: 24 images


def drawing(kind: int, variant: int) -> Image.Image:
    color, shape, _, _ = WORLD[kind]
    im = Image.new("RGB", (64, 64), (235, 235, 235))
    d = ImageDraw.Draw(im)
    x, y, side = 9 + variant, 12 + variant % 2, 40 - variant % 3  # near test_api's training drawing
    (d.ellipse if shape == "circle" else d.rectangle)((x, y, x + side, y + side), fill=color)
    return im


def write_collection(folder: Path) -> dict[str, int]:
    """24 PNGs, some in a sub-folder -> {relative path: WORLD kind}."""
    kinds = {}
    for k in range(len(WORLD)):
        for v in range(VARIANTS):
            rel = f"{'nested/deeper/' if v % 2 else ''}{k}-{v}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            drawing(k, v).save(folder / rel)
            kinds[rel] = k
    return kinds


@functools.lru_cache(maxsize=1)
def search_model_dir() -> Path:
    """The tiny preset with its two projection heads trained (on frozen random towers: a few hundred
    steps of ms each) to match the drawings with their captions; saved once per session.

    (From scratch the whole tiny model's contrastive loss stays flat for far longer than a test.)"""
    torch.manual_seed(0)
    model, proc = build_model("tiny", texts=[w[2] for w in WORLD])
    images = [drawing(k, v) for k in range(len(WORLD)) for v in range(VARIANTS)]
    kind = torch.arange(len(WORLD)).repeat_interleave(VARIANTS)  # (24,)
    texts = proc.batch_texts([w[2] for w in WORLD])
    with torch.no_grad():
        pooled = model.vision(proc.images(images)).pooled  # (24, Dv)
        hidden = model._image_free_hidden(texts["input_ids"], texts["attention_mask"])  # (4, T, Dt)
        eos = hidden[torch.arange(len(WORLD)), texts["attention_mask"].sum(-1) - 1]  # (4, Dt)
    opt = torch.optim.Adam([*model.image_proj.parameters(), *model.text_proj.parameters()], lr=1e-2)
    for _ in range(300):
        zi = torch.nn.functional.normalize(model.image_proj(pooled), dim=-1)  # (24, E)
        zt = torch.nn.functional.normalize(model.text_proj(eos), dim=-1)  # (4, E)
        loss = torch.nn.functional.cross_entropy(20 * zi @ zt.T, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = Path(tempfile.mkdtemp(prefix="mmgpt-search-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vl():
    return load(search_model_dir(), device="cpu")


@pytest.fixture()
def collection(tmp_path) -> tuple[Path, dict[str, int]]:
    folder = tmp_path / "photos"
    return folder, write_collection(folder)


def content(index_dir: Path) -> dict[str, tuple]:
    """path -> (sha256, size, mtime_ns, vector): what an index holds, ids aside."""
    store = Store(index_dir)
    try:
        rows = store.rows()
        ids, vecs = store.vectors(int(store.get("embed_dim")))
        by_id = dict(zip(ids.tolist(), vecs))
        return {p: (r.sha256, r.size, r.mtime_ns, by_id[r.id]) for p, r in rows.items()}
    finally:
        store.close()


def assert_same_content(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for p in a:
        assert a[p][:3] == b[p][:3], p
        np.testing.assert_allclose(a[p][3], b[p][3], atol=1e-5, err_msg=p)


def test_search_finds_the_right_images_as_brute_force_similarity_does(vl, collection, tmp_path):
    folder, kinds = collection
    summary = build(folder, vl, tmp_path / "idx", batch_size=8, workers=2, progress=False)
    assert (summary.files, summary.embedded, summary.bad) == (24, 24, [])
    index = SearchIndex(tmp_path / "idx")
    assert len(index) == 24 and not index.approximate and index.complete
    captions = [w[2] for w in WORLD]
    hits = index.search_text(vl, captions, k=10)

    # brute force: the pipeline's own cosine similarity of every image with every caption
    paths = sorted(kinds)
    sim = vl.similarity([folder / p for p in paths], captions)  # (24, 4)
    for q, row in enumerate(hits):
        order = torch.sort(sim[:, q], descending=True, stable=True).indices[:10]
        np.testing.assert_allclose([h.score for h in row], sim[order, q].numpy(), atol=1e-5)
        assert {h.path for h in row[:3]} == {paths[i] for i in order[:3]}  # scores far apart at the top

    # R@1 / R@10 of the index against train.metrics' recall on the brute-force similarity
    relevant = [{p for p, k in kinds.items() if k == q} for q in range(len(WORLD))]
    ours = recall_at([[h.path for h in row] for row in hits], relevant, ks=(1, 10))
    ref = retrieval_metrics(sim, image_to_texts=[[kinds[p]] for p in paths], ks=(1, 10))
    assert ours == {"t2i_r1": ref["retrieval_t2i_r1"], "t2i_r10": ref["retrieval_t2i_r10"]}
    assert ours == {"t2i_r1": 1.0, "t2i_r10": 1.0}  # every caption finds drawings of its kind first

    # an image query finds that very image first, with cosine 1
    top = index.search_image(vl, [folder / "2-2.png"], k=3)[0]
    assert top[0].path == "2-2.png" and top[0].score == pytest.approx(1.0, abs=1e-5)
    assert index.path_of(top[0].id) == index.root / "2-2.png" and index.path_of(10**9) is None


def test_approximate_index_above_the_threshold_agrees_with_exact(vl, collection, tmp_path, monkeypatch):
    folder, _ = collection
    monkeypatch.setattr(index_module, "APPROX_MIN_VECTORS", 10)
    build(folder, vl, tmp_path / "idx", workers=0, progress=False)
    index = SearchIndex(tmp_path / "idx")
    assert index.approximate
    import faiss

    assert faiss.downcast_index(index.faiss.index).hnsw.efSearch >= 64  # calibrated, kept in vectors.faiss
    q = vl.embed_texts([w[2] for w in WORLD])
    approx, exact = index.search(q, 10), index.search(q, 10, exact=True)
    for a, e in zip(approx, exact):  # 24 vectors: HNSW visits them all
        assert [h.path for h in a] == [h.path for h in e]


def test_update_and_a_killed_build_end_as_one_clean_build(vl, collection, tmp_path):
    folder, _ = collection
    # the final state: one image redrawn, one deleted, two added (one a copy of an indexed image)
    def final_state(f: Path) -> None:
        drawing(3, 0).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(f / "0-0.png")
        (f / "1-2.png").unlink()
        drawing(1, 5).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(f / "new.png")
        shutil.copy(f / "2-2.png", f / "nested" / "copy.png")

    # 1. the index of the first state, then update after the changes
    build(folder, vl, tmp_path / "inc", workers=0, progress=False)
    os.utime(folder / "3-2.png", ns=(1, 10**18))  # touched: same content, another mtime
    final_state(folder)
    s = update(tmp_path / "inc", vl, workers=0, progress=False)
    assert (s.embedded, s.reused, s.touched, s.removed, s.files) == (2, 1, 1, 1, 25)
    assert s.unchanged == 21

    # 2. one clean build of the final state
    build(folder, vl, tmp_path / "clean", batch_size=5, workers=0, progress=False)
    clean = content(tmp_path / "clean")
    assert_same_content(content(tmp_path / "inc"), clean)

    # 3. a build killed (SIGKILL, mid-transaction) after two committed batches, then run again
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from mmgpt.api import load
        from mmgpt.search import build
        def kill(done):
            if done > 8:  # the third batch is written but not committed
                os.kill(os.getpid(), signal.SIGKILL)
        build({str(folder)!r}, load({str(search_model_dir())!r}, device="cpu"), {str(tmp_path / "killed")!r},
              batch_size=4, workers=0, progress=False, on_commit=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(content(tmp_path / "killed")) == 8
    partial = SearchIndex(tmp_path / "killed")  # searchable, from what was committed
    assert len(partial) == 8 and not partial.complete
    s = build(folder, vl, tmp_path / "killed", workers=0, progress=False)
    assert (s.unchanged, s.embedded + s.reused) == (8, 17)
    assert_same_content(content(tmp_path / "killed"), clean)
    q = vl.embed_texts([w[2] for w in WORLD])
    done, ref = SearchIndex(tmp_path / "killed"), SearchIndex(tmp_path / "clean")
    assert done.complete
    for a, b in zip(done.search(q, 5), ref.search(q, 5)):
        assert [h.path for h in a] == [h.path for h in b]


def test_bad_files_are_skipped_and_named(vl, collection, tmp_path):
    folder, _ = collection
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "nested" / "notes.jpg").write_text("a text file with an image's name")
    (folder / "readme.txt").write_text("not an image suffix: not looked at")
    s = build(folder, vl, tmp_path / "idx", workers=2, progress=False)
    assert sorted(p for p, _ in s.bad) == ["broken.png", "nested/notes.jpg"]
    assert s.embedded == 24 and "2 bad" in s.lines()[0] and any("broken.png" in line for line in s.lines())
    # a file that was an image and is now broken leaves the index
    (folder / "0-2.png").write_bytes(b"garbage")
    s = update(tmp_path / "idx", vl, workers=0, progress=False)
    assert s.removed == 1 and "0-2.png" not in content(tmp_path / "idx")


def test_another_model_is_refused_in_one_line(vl, collection, tmp_path, capsys):
    folder, _ = collection
    build(folder, vl, tmp_path / "idx", workers=0, progress=False)
    torch.manual_seed(1)
    other_model, proc = build_model("tiny", texts=[w[2] for w in WORLD])
    other = tmp_path / "other"
    other_model.save_pretrained(other)
    proc.save_pretrained(other)
    with pytest.raises(SearchIndexError, match="built with model .* not with this one"):
        SearchIndex(tmp_path / "idx").check_model(load(other, device="cpu"))
    with pytest.raises(SearchIndexError, match="not with this one"):
        update(tmp_path / "idx", load(other, device="cpu"), workers=0, progress=False)
    capsys.readouterr()
    assert cli(["search", str(tmp_path / "idx"), "a red circle", "--model", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not with this one" in err
    with pytest.raises(SearchIndexError, match="already an index of"):
        build(tmp_path, vl, tmp_path / "idx", workers=0, progress=False)


def test_command_line_build_update_and_search(vl, collection, tmp_path, capsys):
    folder, kinds = collection
    idx = str(tmp_path / "idx")
    assert cli(["index", "build", str(folder), "--model", str(search_model_dir()), "--out", idx, "--quiet",
                "--workers", "0"]) == 0
    assert "24 image files: 24 embedded" in capsys.readouterr().err
    assert cli(["search", idx, "a blue square", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == {"text": "a blue square"} and len(out["results"]) == 3
    assert all(kinds[os.path.relpath(r["path"], folder)] == 1 for r in out["results"])
    assert cli(["search", idx, "--image", str(folder / "3-4.png"), "--top-k", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split("\t")
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-4) and first[2].endswith("3-4.png")
    drawing(0, 0).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "more.png")
    assert cli(["index", "update", idx, "--quiet"]) == 0
    assert "1 embedded" in capsys.readouterr().err
    # one-line refusals
    assert cli(["search", idx]) == 2
    assert cli(["search", str(tmp_path / "nope"), "a red circle"]) == 2
    assert cli(["search", idx, "--image", str(folder / "missing.png")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "not a search index" in errors[1] and "missing.png" in errors[2]


def test_plain_inference_does_not_import_faiss():
    code = "import sys, mmgpt, mmgpt.api, mmgpt.cli, mmgpt.commands.search; assert 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_benchmark_helpers_measure_recall_against_flat():
    from benchmarks.search import query_rows, recall_at_10

    assert recall_at_10(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)
    (row,) = query_rows(sizes=[2000], approx_max=2000, queries=20)
    assert row["approx"]["recall10"] >= 0.95 and row["flat_p50_ms"] > 0 and row["approx"]["p50_ms"] > 0


def test_server_search_routes_and_page(vl, collection, tmp_path):
    import base64

    from fastapi.testclient import TestClient

    from mmgpt.serve import create_app

    folder, _ = collection
    outside = tmp_path / "outside.png"
    drawing(0, 0).transpose(Image.Transpose.ROTATE_90).save(outside)
    (folder / "link.png").symlink_to(outside)  # indexed, but its file lies outside the folder
    build(folder, vl, tmp_path / "idx", workers=0, progress=False)
    index = SearchIndex(tmp_path / "idx")
    app = create_app(vl, search_index=index)
    with TestClient(app) as client:
        assert 'id="search-form"' in client.get("/").text
        r = client.post("/v1/search", json={"text": "a yellow square", "top_k": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        ref = index.search_text(vl, ["a yellow square"], k=4)[0]
        assert [h["path"] for h in body["results"]] == [h.path for h in ref] and body["images"] == 25
        assert [h["score"] for h in body["results"]] == pytest.approx([h.score for h in ref], abs=1e-5)
        # an image query, uploaded (multipart) and as base64 JSON
        data = (folder / "2-4.png").read_bytes()
        r = client.post("/v1/search", files={"image": ("q.png", data, "image/png")}, data={"top_k": "2"})
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert top["path"] == "2-4.png" and top["score"] == pytest.approx(1.0, abs=1e-4)
        r = client.post("/v1/search", json={"image": base64.b64encode(data).decode(), "top_k": 1})
        assert r.json()["results"][0]["path"] == "2-4.png"
        # the image file by id, and only by id
        img = client.get(top["url"])
        assert img.status_code == 200 and img.content == data and img.headers["content-type"] == "image/png"
        assert client.get("/v1/search/images/999999").status_code == 404
        assert client.get("/v1/search/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
        link_id = next(r.id for p, r in Store(tmp_path / "idx").rows().items() if p == "link.png")
        assert client.get(f"/v1/search/images/{link_id}").status_code == 404
        # refused queries
        assert client.post("/v1/search", json={"text": "a", "image": base64.b64encode(data).decode()}).status_code == 422
        assert client.post("/v1/search", json={}).status_code == 422
        r = client.post("/v1/search", json={"image_path": "/etc/passwd"})
        assert r.status_code == 422 and "never file-system paths" in r.text
    with TestClient(create_app(vl)) as client:  # no index: no search box, no route
        assert 'id="search-form"' not in client.get("/").text
        assert client.post("/v1/search", json={"text": "a red circle"}).status_code == 404


def test_serve_refuses_an_index_of_another_model(vl, collection, tmp_path, capsys):
    folder, _ = collection
    build(folder, vl, tmp_path / "idx", workers=0, progress=False)
    torch.manual_seed(2)
    other_model, proc = build_model("tiny", texts=[w[2] for w in WORLD])
    other_model.save_pretrained(tmp_path / "other")
    proc.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert cli(["serve", str(tmp_path / "other"), "--index", str(tmp_path / "idx"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--index" in err and "not with this one" in err


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_search_box_in_chromium(vl, collection, tmp_path, api_key):
    chromium = os.environ.get("MMGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on PATH (apt-get install chromium, or set MMGPT_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from mmgpt.serve import create_app
    from mmgpt.serve.server import background

    folder, _ = collection
    build(folder, vl, tmp_path / "idx", workers=0, progress=False)
    index = SearchIndex(tmp_path / "idx")
    ref = index.search_text(vl, ["a green circle"], k=12)[0]
    with background(create_app(vl, search_index=index, api_key=api_key)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            if api_key:  # the page's key field (in its "API key" box) serves the search box and its thumbnails too
                page.click("#key-box summary")
                page.fill("#key", api_key)
            page.fill("#search-text", "a green circle")
            page.click("#search-form button")
            page.wait_for_function("document.querySelectorAll('#search-results img').length === 12", timeout=30_000)
            alts = page.eval_on_selector_all("#search-results img", "els => els.map(e => e.alt)")
            scores = page.eval_on_selector_all("#search-results figcaption", "els => els.map(e => e.textContent)")
            assert alts == [h.path for h in ref] and scores == [f"{h.score:.3f}" for h in ref]
            page.wait_for_function("[...document.querySelectorAll('#search-results img')].every("
                                   "i => i.complete && i.naturalWidth === 64)", timeout=30_000)  # served by id
            page.set_input_files("#search-image", str(folder / "3-2.png"))
            page.click("#search-form button")
            page.wait_for_function("document.querySelector('#search-results img')?.alt === '3-2.png'",
                                   timeout=30_000)
        finally:
            browser.close()
