"""The index's database: one SQLite file with the model's identity and, per image, its path (relative
to the indexed folder), content hash, size, mtime and embedding.

The embeddings are kept here too (a float32 blob per row), committed together with their rows: a build
killed at any moment leaves a consistent database, and the FAISS file is rebuilt from it whenever its
generation is behind (see `mmgpt.search.index`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
DB_FILE = "index.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a deleted image's id stays unknown
    path TEXT UNIQUE NOT NULL,             -- relative to meta.root, '/'-separated
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    vector BLOB NOT NULL                   -- float32, meta.embed_dim values, L2-normed
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
"""


class SearchIndexError(ValueError):
    """An index that is missing, of another model or folder, or damaged: one readable line."""


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    sha256: str
    size: int
    mtime_ns: int


class Store:
    """The SQLite database of an index folder."""

    def __init__(self, folder: Path, create: bool = False):
        self.folder = Path(folder)
        path = self.folder / DB_FILE
        if not path.is_file() and not create:
            raise SearchIndexError(f"{folder}: not a search index (no {DB_FILE}); build one with `mmgpt index build`")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise SearchIndexError(f"{path}: unreadable index database ({err})") from None
        fmt = self.get("format")
        if fmt is None:
            self.set("format", FORMAT)
            self.db.commit()
        elif int(fmt) != FORMAT:
            raise SearchIndexError(f"{folder}: index format {fmt}, this mmgpt reads {FORMAT}; build the index again")

    # --- meta ------------------------------------------------------------------------------------

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def bump_generation(self) -> int:
        """A new generation: the FAISS file written for an older one is stale."""
        gen = int(self.get("generation", 0)) + 1
        self.set("generation", gen)
        return gen

    # --- rows ------------------------------------------------------------------------------------

    def rows(self) -> dict[str, Row]:
        """path -> Row, for every image in the index."""
        cur = self.db.execute("SELECT id, path, sha256, size, mtime_ns FROM images")
        return {r[1]: Row(*r) for r in cur}

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def vector_of_hash(self, sha256: str) -> bytes | None:
        row = self.db.execute("SELECT vector FROM images WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        return row[0] if row else None

    def put(self, path: str, sha256: str, size: int, mtime_ns: int, vector: bytes) -> None:
        """Insert an image, or replace what a path held (keeping its id)."""
        self.db.execute(
            "INSERT INTO images (path, sha256, size, mtime_ns, vector) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, vector = excluded.vector",
            (path, sha256, size, mtime_ns, vector),
        )

    def touch(self, path: str, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE path = ?", (size, mtime_ns, path))

    def delete(self, paths: list[str]) -> None:
        self.db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in paths])

    def vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (N,) int64, vectors (N, dim) float32), in id order."""
        ids, blobs = [], []
        for i, blob in self.db.execute("SELECT id, vector FROM images ORDER BY id"):
            ids.append(i)
            blobs.append(blob)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)  # (N, dim)
        return np.asarray(ids, dtype=np.int64), vecs

    def paths_of(self, ids: list[int]) -> dict[int, str]:
        marks = ",".join("?" * len(ids))
        return dict(self.db.execute(f"SELECT id, path FROM images WHERE id IN ({marks})", ids).fetchall())

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.close()
