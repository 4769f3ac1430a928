"""A persistent image index: build it from a folder, bring it up to date, search it by text or image.

An index is a folder: ``index.sqlite`` (see `mmgpt.search.store`: the model's identity, and per image
its path, hash, size, mtime and embedding, committed batch by batch) and ``vectors.faiss`` (the same
embeddings as a FAISS index, written at the end of a build or update; rebuilt from the database when
it is missing or behind). Search is exact (flat inner product = cosine of L2-normed embeddings) below
`APPROX_MIN_VECTORS` and approximate (HNSW) from there on; `benchmarks/search.py` measures both.

faiss is imported inside the functions that need it: plain inference never loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmgpt.search.scan import ImageFiles, collate, stack, walk
from mmgpt.search.store import SearchIndexError, Store

FAISS_FILE = "vectors.faiss"
# Measured with benchmarks/search.py (2 shared cores, E=256, one query at a time): flat costs ~0.1-0.3 ms
# per 1k vectors, so it stays in tens of ms up to ~200k vectors; there approximate search starts. On random
# unit vectors (the hardest case: neighbours barely nearer than anything else) HNSW needs a wide search to
# find 95% of the true top 10, so efSearch is calibrated on the index's own data when it is built.
APPROX_MIN_VECTORS = 200_000
APPROX_M = 32
APPROX_EF_CONSTRUCTION = 80
APPROX_RECALL = 0.95  # recall@10 against exact search that the calibration aims for
APPROX_EF_SEARCH = (64, 8192)  # efSearch tried: doubling from the first up to the last

def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("search needs FAISS: pip install faiss-cpu") from None
    return faiss


# --- the model's identity --------------------------------------------------------------------------


def model_identity(pipeline) -> dict:
    """``{"name", "id", "embed_dim"}``: ``id`` hashes what decides the embeddings (the weights and
    the image preprocessing), so the same model moved elsewhere keeps its id and any retrained one
    gets another."""
    model = pipeline.model
    h = hashlib.sha256()
    folder = Path(getattr(model, "name_or_path", "") or "")
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin")) if folder.is_dir() else []
    if files:  # the saved weights: cheaper than the tensors, and independent of the dtype loaded in
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    else:  # a model built in memory: its tensors
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    proc = pipeline.processor
    pre = {k: getattr(proc, k, None) for k in ("image_size", "image_mean", "image_std")}
    h.update(json.dumps(pre, sort_keys=True, default=list).encode())
    name = os.fspath(folder.resolve()) if folder.is_dir() else (os.fspath(folder) if str(folder) else "in-memory")
    return {"name": name, "id": h.hexdigest()[:16], "embed_dim": int(model.config.projection_dim)}


# --- FAISS -----------------------------------------------------------------------------------------


def make_faiss(ids: np.ndarray, vectors: np.ndarray, approximate: bool | None = None):
    """A FAISS index of ``vectors`` (N, E) under ``ids`` (N,): flat inner product, or HNSW when
    ``approximate`` (default: from ``APPROX_MIN_VECTORS`` on), its efSearch set by `calibrate`."""
    faiss = _faiss()
    dim = vectors.shape[1]
    if approximate is None:
        approximate = len(ids) >= APPROX_MIN_VECTORS
    if approximate:
        inner = faiss.IndexHNSWFlat(dim, APPROX_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = APPROX_EF_CONSTRUCTION
    else:
        inner = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(inner)
    if len(ids):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index.add_with_ids(vectors, ids)
        if approximate:
            calibrate(index, ids, vectors)
    return index


def calibrate(index, ids: np.ndarray, vectors: np.ndarray, queries: int = 200, k: int = 10, seed: int = 0) -> dict:
    """Set the HNSW index's efSearch to the smallest of `APPROX_EF_SEARCH` whose recall@k against exact
    search reaches `APPROX_RECALL`, on queries near stored vectors (each one plus noise of its own size
    over all dimensions, re-normed: about 45 degrees away). -> ``{"ef_search", "recall"}``."""
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    noise = rng.standard_normal((len(pick), vectors.shape[1])).astype(np.float32) / np.sqrt(vectors.shape[1])
    q = vectors[pick] + noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)  # (Q, E)
    k = min(k, len(vectors))
    _, exact = faiss.knn(q, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, k) row numbers
    truth = ids[exact]
    inner = faiss.downcast_index(index.index)
    ef, last = APPROX_EF_SEARCH
    while True:
        inner.hnsw.efSearch = ef
        _, got = index.search(q, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
        if recall >= APPROX_RECALL or ef >= last:
            return {"ef_search": ef, "recall": recall}
        ef *= 2


def is_approximate(index) -> bool:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return not isinstance(inner, faiss.IndexFlat)


# --- building and updating -------------------------------------------------------------------------


@dataclass
class Summary:
    """What a build or update did."""

    files: int = 0  # image files found
    embedded: int = 0  # new or changed, run through the model
    reused: int = 0  # new or changed, but with content already indexed: its embedding copied
    touched: int = 0  # mtime changed, content the same
    unchanged: int = 0
    removed: int = 0  # gone from the folder (or now unreadable)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def lines(self, limit: int = 20) -> list[str]:
        head = (f"{self.files} image files: {self.embedded} embedded, {self.reused} copied from identical files, "
                f"{self.touched} touched, {self.unchanged} unchanged, {self.removed} removed, {len(self.bad)} bad")
        out = [head]
        out += [f"  bad: {p}: {why}" for p, why in self.bad[:limit]]
        if len(self.bad) > limit:
            out.append(f"  ... and {len(self.bad) - limit} more bad files")
        return out


def build(root, pipeline, out, **kw) -> Summary:
    """Index every image under ``root`` into the folder ``out`` (created). An ``out`` that a build of
    the same folder with the same model left unfinished is continued; one of another folder or model
    is refused. Keywords as `sync`."""
    root = Path(root)
    if not root.is_dir():
        raise SearchIndexError(f"{root}: no such folder")
    ident = model_identity(pipeline)
    store = Store(Path(out), create=True)
    try:
        if store.get("root") is None:
            store.set("root", os.fspath(root.resolve()))
            store.set("model", ident["name"])
            store.set("model_id", ident["id"])
            store.set("embed_dim", ident["embed_dim"])
            store.commit()
        elif Path(store.get("root")) != root.resolve():
            raise SearchIndexError(f"{out}: already an index of {store.get('root')}, not of {root}; "
                                   f"use another --out, or `mmgpt index update {out}`")
        _check_identity(store, ident, out)
        return sync(store, pipeline, **kw)
    finally:
        store.close()


def update(folder, pipeline, **kw) -> Summary:
    """Bring the index in ``folder`` up to date with its image folder: add new and changed files, drop
    deleted ones. Keywords as `sync`."""
    store = Store(Path(folder))
    try:
        _check_identity(store, model_identity(pipeline), folder)
        root = Path(store.get("root"))
        if not root.is_dir():
            raise SearchIndexError(f"{folder}: the indexed folder {root} is not there any more")
        return sync(store, pipeline, **kw)
    finally:
        store.close()


def _check_identity(store: Store, ident: dict, where) -> None:
    if store.get("model_id") != ident["id"]:
        raise SearchIndexError(
            f"{where}: built with model {store.get('model')} (id {store.get('model_id')}), not with this one "
            f"({ident['name']}, id {ident['id']}); use that model, or build a new index with this one")


def sync(
    store: Store,
    pipeline,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
) -> Summary:
    """Make the index hold exactly the readable images under its root. Files whose size and mtime are
    as indexed are not read; the others are hashed and (unless their content is already indexed)
    embedded, ``batch_size`` at a time, read by ``workers`` data-loader processes. Every batch is
    committed: a run killed at any point keeps what it committed and the next run goes on from there.
    ``on_commit(done)`` is called before each commit (tests use it to kill a run half-way)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    root = Path(store.get("root"))
    dim = int(store.get("embed_dim"))
    store.set("complete", False)
    store.bump_generation()
    store.commit()

    found = walk(root, skip=store.folder)
    known = store.rows()
    summary = Summary(files=len(found))
    todo = []
    for f in found:
        row = known.get(f.path)
        if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns:
            summary.unchanged += 1
        else:
            todo.append(f.path)
    gone = sorted(set(known) - {f.path for f in found})
    store.delete(gone)
    summary.removed += len(gone)
    store.commit()

    if todo:
        ds = ImageFiles(root, todo, pipeline.processor)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        device, dtype = pipeline.device, pipeline.dtype
        done = 0
        with tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress, file=sys.stderr) as bar:
            for items in loader:
                new = []
                for it in items:
                    old = known.get(it["path"])
                    if it["error"] is not None:
                        summary.bad.append((it["path"], it["error"]))
                        if old is not None:  # it was an image once; it is not now
                            store.delete([it["path"]])
                            summary.removed += 1
                    elif old is not None and old.sha256 == it["sha256"]:
                        store.touch(it["path"], it["size"], it["mtime_ns"])
                        summary.touched += 1
                    else:
                        new.append(it)
                embed = []
                for it in new:
                    vec = store.vector_of_hash(it["sha256"])  # the same bytes indexed under another path
                    if vec is None:
                        embed.append(it)
                    else:
                        store.put(it["path"], it["sha256"], it["size"], it["mtime_ns"], vec)
                        summary.reused += 1
                if embed:
                    with torch.inference_mode():
                        z = pipeline.model.embed_image(stack(embed).to(device, dtype)).float().cpu().numpy()  # (B, E)
                    for it, v in zip(embed, z):
                        store.put(it["path"], it["sha256"], it["size"], it["mtime_ns"], v.astype(np.float32).tobytes())
                    summary.embedded += len(embed)
                done += len(items)
                if on_commit is not None:
                    on_commit(done)
                store.commit()
                bar.update(len(items))
    write_faiss(store, dim)
    store.set("complete", True)
    store.commit()
    return summary


def write_faiss(store: Store, dim: int) -> None:
    """Write ``vectors.faiss`` from the database (atomically) and mark it current."""
    faiss = _faiss()
    ids, vecs = store.vectors(dim)
    index = make_faiss(ids, vecs)
    tmp = store.folder / (FAISS_FILE + ".tmp")
    faiss.write_index(index, os.fspath(tmp))
    os.replace(tmp, store.folder / FAISS_FILE)
    store.set("faiss_generation", store.get("generation"))


# --- searching -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    id: int
    path: str  # relative to the index's root
    score: float  # cosine similarity

    def to_dict(self, root: Path | None = None) -> dict:
        path = os.fspath(root / self.path) if root is not None else self.path
        return {"id": self.id, "path": path, "score": round(self.score, 6)}


class SearchIndex:
    """An index opened for searching (read-only; safe to share between threads)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.store = Store(self.folder)
        s = self.store
        if s.get("model_id") is None:
            raise SearchIndexError(f"{folder}: an index that was never built; run `mmgpt index build`")
        self.root = Path(s.get("root"))
        self.model, self.model_id, self.embed_dim = s.get("model"), s.get("model_id"), int(s.get("embed_dim"))
        self.complete = bool(s.get("complete", False))
        faiss = _faiss()
        path = self.folder / FAISS_FILE
        if path.is_file() and s.get("faiss_generation") == s.get("generation"):
            self.faiss = faiss.read_index(os.fspath(path))
        else:  # killed mid-build or file lost: what the database committed
            self.faiss = make_faiss(*s.vectors(self.embed_dim))
        self._exact = None
        self._lock = threading.Lock()  # one SQLite connection, shared by the server's threads

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def approximate(self) -> bool:
        return is_approximate(self.faiss)

    def check_model(self, pipeline) -> None:
        """SearchIndexError (one line) unless ``pipeline`` holds the model this index was built with."""
        _check_identity(self.store, model_identity(pipeline), self.folder)

    def search(self, queries, k: int = 10, exact: bool = False) -> list[list[Hit]]:
        """``queries`` (Q, E) L2-normed embeddings -> per query the k best images, best first."""
        q = np.ascontiguousarray(torch.as_tensor(queries, dtype=torch.float32).reshape(-1, self.embed_dim).numpy())
        index = self.faiss
        if exact and self.approximate:
            with self._lock:
                if self._exact is None:
                    self._exact = make_faiss(*self.store.vectors(self.embed_dim), approximate=False)
            index = self._exact
        k = max(0, min(int(k), len(self)))
        if k == 0:
            return [[] for _ in range(len(q))]
        scores, ids = index.search(q, k)  # (Q, k), (Q, k)
        with self._lock:
            paths = self.store.paths_of(sorted({int(i) for i in ids.ravel() if i >= 0}))
        return [[Hit(int(i), paths[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def search_text(self, pipeline, texts, k: int = 10, exact: bool = False) -> list[list[Hit]]:
        return self.search(pipeline.embed_texts(texts), k, exact)

    def search_image(self, pipeline, images, k: int = 10, exact: bool = False) -> list[list[Hit]]:
        return self.search(pipeline.embed_images(images), k, exact)

    def path_of(self, image_id: int) -> Path | None:
        """The file of an indexed image, or None for an id the index does not hold."""
        with self._lock:
            rel = self.store.paths_of([int(image_id)]).get(int(image_id))
        return self.root / rel if rel is not None else None

    def close(self) -> None:
        self.store.close()
