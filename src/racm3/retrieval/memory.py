"""The retrieval memory: a SQLite store (source of truth) plus a FAISS inner-product index rebuilt from it at need."""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from racm3.documents import Document, image_to_png, load_image

if TYPE_CHECKING:
    import faiss

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
STORE, INDEX, INFO = "store.sqlite", "index.faiss", "memory.json"
HNSW_M = 32  # graph degree: FAISS's usual default for recall above 0.95
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16
PQ_MIN_TRAIN = 256 * 39  # FAISS wants ~39 points per centroid, 256 centroids per PQ sub-quantizer


class MemoryFolderError(RuntimeError):
    """A memory folder that cannot be used as asked; the message names the folder and the fix."""


class EncoderMismatch(MemoryFolderError):
    """The memory was filled by one encoder and is being queried or filled by another."""


@dataclass(frozen=True)
class Hit:
    """One retrieved document: its id, the document, its cosine score with the query, its rank (0 = best)."""

    id: str
    document: Document
    score: float
    rank: int


def _new_index(kind: str, dim: int, n_train: int = 0) -> "faiss.Index":
    """An empty inner-product index keyed by store row; ivfpq's shape depends on how many vectors it will be trained on."""
    import faiss

    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivfpq":
        # nlist ~ 4 sqrt(n) with >= 39 training points per list (FAISS guidelines). PQ codes of dim/8 bytes
        # need 256 centroids per sub-quantizer, so below PQ_MIN_TRAIN vectors the lists hold exact vectors
        # (IVF-Flat); rebuild_index() retrains once the memory has grown.
        nlist = max(1, min(65536, int(4 * math.sqrt(max(n_train, 1))), n_train // 39))
        quantizer = faiss.IndexFlatIP(dim)
        if n_train >= PQ_MIN_TRAIN and dim % 8 == 0:
            base = faiss.IndexIVFPQ(quantizer, dim, nlist, dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
        else:
            base = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.nprobe = min(nlist, IVF_NPROBE)
        return base  # IVF lists store ids themselves (IndexIDMap's removal assumes a compacting index)
    else:
        raise ValueError(f"index type {kind!r} is not one of {INDEX_TYPES}")
    return faiss.IndexIDMap2(base)


class Memory:
    """A folder holding store.sqlite (documents + embeddings + the encoder's name), index.faiss and memory.json.

    Writes are atomic: the store changes in one SQLite transaction that also bumps a generation counter;
    the index is then written to a temporary file and renamed, and memory.json records the generation the
    index reflects. Opening a memory whose index is missing or from another generation rebuilds the index
    from the store, so a process killed at any point leaves a memory that opens and answers consistently.
    One writer at a time.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, encoder: str, dim: int, index_type: str):
        self.path = path
        self._conn = conn
        self.encoder_name = encoder
        self.dim = dim
        self.index_type = index_type
        self.index: "faiss.Index" = None  # type: ignore[assignment]
        self._trained_on = 0  # vectors the ivfpq index was last trained on (set when it is built or loaded)

    # -- creation and opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat") -> "Memory":
        if index not in INDEX_TYPES:
            raise ValueError(f"index type {index!r} is not one of {INDEX_TYPES}")
        if dim <= 0 or not encoder_name:
            raise ValueError(f"a memory needs an encoder name and a positive dimension (got {encoder_name!r}, {dim})")
        path = Path(path)
        if (path / STORE).exists():
            raise MemoryFolderError(f"{path}: a memory already exists here; open it with Memory.open() or pick another folder")
        path.mkdir(parents=True, exist_ok=True)
        conn = _connect(path / STORE)
        with conn:
            conn.executescript(_SCHEMA)
            conn.executemany("INSERT INTO info(key, value) VALUES (?, ?)",
                             [("encoder", encoder_name), ("dim", str(dim)), ("index", index), ("generation", "0")])
        mem = cls(path, conn, encoder_name, dim, index)
        mem.index = _new_index(index, dim)
        mem._write_index()
        return mem

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Memory":
        path = Path(path)
        if not (path / STORE).exists():
            raise MemoryFolderError(f"{path}: no memory here ({STORE} missing); build one with "
                               f"`racm3 memory build DATASET_DIR {path}`")
        conn = _connect(path / STORE)
        info = dict(conn.execute("SELECT key, value FROM info").fetchall())
        mem = cls(path, conn, info["encoder"], int(info["dim"]), info["index"])
        if not mem._load_index():
            mem.rebuild_index()
        return mem

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat") -> "Memory":
        if (Path(path) / STORE).exists():
            mem = cls.open(path)
            mem.require_encoder(encoder_name)
            return mem
        return cls.create(path, encoder_name, dim, index)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def __contains__(self, doc_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    def ids(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT id FROM documents ORDER BY row")]

    @property
    def generation(self) -> int:
        return int(self._conn.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()[0])

    def info(self) -> dict:
        return {"count": len(self), "encoder": self.encoder_name, "dim": self.dim, "index": self.index_type}

    def get(self, ids: Sequence[str]) -> list[Document]:
        """Documents by id, in the order asked; an unknown id raises KeyError naming it."""
        rows = self._rows_by_id(ids)
        return [self._document(rows[i]) for i in ids]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings (n, dim) of the given ids, in order."""
        rows = self._rows_by_id(ids)
        return np.stack([np.frombuffer(rows[i][3], dtype=np.float32) for i in ids]) if ids else \
            np.zeros((0, self.dim), np.float32)

    def scan(self) -> tuple[list[str], list[dict], np.ndarray]:
        """Every document's id, meta (with its joined text under "_text") and vector (n, dim), images not decoded."""
        ids, metas, vecs = [], [], []
        for doc_id, text, meta, blob in self._conn.execute("SELECT id, text, meta, embedding FROM documents ORDER BY row"):
            ids.append(doc_id)
            metas.append({**json.loads(meta), "_text": text})
            vecs.append(np.frombuffer(blob, dtype=np.float32))
        return ids, metas, np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)

    def require_encoder(self, name: str) -> None:
        if name != self.encoder_name:
            raise EncoderMismatch(f"{self.path}: this memory was built with encoder {self.encoder_name!r} but is used "
                                  f"with encoder {name!r}; use the encoder that built it (--encoder) or rebuild the "
                                  f"memory with `racm3 memory build`")

    def search(self, queries: np.ndarray, k: int, encoder_name: str | None = None) -> list[list[Hit]]:
        """Top-k documents by inner product for each query row (n, dim); rows should be L2-normalised."""
        if encoder_name is not None:
            self.require_encoder(encoder_name)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {queries.shape[1]}, the memory {self.dim}")
        if k <= 0 or len(queries) == 0 or self.index.ntotal == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = _search(self.index, queries, min(k, self.index.ntotal))
        wanted = sorted({int(r) for r in rows.ravel() if r >= 0})
        by_row = self._rows_by_row(wanted)
        out = []
        for qs, qr in zip(scores, rows):
            hits = []
            for s, r in zip(qs, qr):
                rec = by_row.get(int(r))
                if rec is None:  # -1 padding, or a row removed since (never returned)
                    continue
                hits.append(Hit(rec[1], self._document(rec), float(s), len(hits)))
            out.append(hits)
        return out

    # -- writing ----------------------------------------------------------------------------------

    def add(self, docs: Sequence[Document], embeddings: np.ndarray) -> None:
        """Add documents with their embeddings (n, dim); an id already present raises and nothing is added."""
        emb = self._check_embeddings(docs, embeddings)
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            raise ValueError("the documents to add repeat an id")
        present = [i for i in ids if i in self]
        if present:
            raise KeyError(f"{self.path}: document id {present[0]!r} is already in the memory "
                           f"({len(present)} ids in all); use update() to replace it")
        with self._conn:  # one transaction: all documents or none
            rows = [self._insert(doc, vec) for doc, vec in zip(docs, emb)]
            self._bump_generation()
        if self.index_type == "ivfpq" and (not self.index.is_trained or len(self) >= 4 * max(self._trained_on, 1)):
            # IVF-PQ trains on the stored vectors: first when there are some, again each time the memory has
            # grown 4x since (lists and PQ codebooks sized for a tenth of the data serve it badly)
            self.rebuild_index()
            return
        self.index.add_with_ids(emb, np.asarray(rows, dtype=np.int64))
        self._write_index()

    def add_documents(self, docs: Sequence[Document], encoder, batch_size: int = 512, progress=None) -> int:
        """Embed documents with `encoder` (which must be the memory's) and add them, batch by batch.

        Ids are checked for repeats and presence before anything is written, so a bad list adds nothing.
        """
        self.require_encoder(encoder.name)
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            repeated = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"the documents to add repeat the id {repeated!r}")
        present = [i for i in ids if i in self]
        if present:
            raise KeyError(f"{self.path}: document id {present[0]!r} is already in the memory "
                           f"({len(present)} ids in all); use update() to replace it")
        added = 0
        for s in range(0, len(docs), batch_size):
            chunk = docs[s:s + batch_size]
            self.add(chunk, encoder.embed_documents(chunk))
            added += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return added

    def remove(self, ids: Iterable[str]) -> None:
        """Remove documents; an unknown id raises KeyError naming it and removes nothing."""
        ids = list(dict.fromkeys(ids))
        rows = self._rows_by_id(ids)
        with self._conn:
            self._conn.executemany("DELETE FROM images WHERE row = ?", [(rows[i][0],) for i in ids])
            self._conn.executemany("DELETE FROM documents WHERE row = ?", [(rows[i][0],) for i in ids])
            self._bump_generation()
        self._index_remove([rows[i][0] for i in ids])
        self._write_index()

    def update(self, docs: Sequence[Document], embeddings: np.ndarray) -> None:
        """Replace documents that exist (same ids) with new content and embeddings, in one transaction."""
        emb = self._check_embeddings(docs, embeddings)
        rows = self._rows_by_id([d.id for d in docs])
        old = [rows[d.id][0] for d in docs]
        with self._conn:
            self._conn.executemany("DELETE FROM images WHERE row = ?", [(r,) for r in old])
            self._conn.executemany("DELETE FROM documents WHERE row = ?", [(r,) for r in old])
            new = [self._insert(doc, vec) for doc, vec in zip(docs, emb)]
            self._bump_generation()
        if self.index_type == "hnsw":  # HNSW cannot delete: one rebuild from the store covers old and new rows
            self.rebuild_index()
            return
        self._index_remove(old)
        self.index.add_with_ids(emb, np.asarray(new, dtype=np.int64))
        self._write_index()

    def rebuild_index(self) -> None:
        """Rebuild index.faiss from the store's embeddings (after a crash, or to change nothing but the index)."""
        rows, vecs = [], []
        for row, blob in self._conn.execute("SELECT row, embedding FROM documents ORDER BY row"):
            rows.append(row)
            vecs.append(np.frombuffer(blob, dtype=np.float32))
        emb = np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        index = _new_index(self.index_type, self.dim, n_train=len(rows))
        self._trained_on = len(rows)
        if self.index_type == "ivfpq":
            if len(rows) == 0:
                self.index = index
                self._write_index()
                return
            index.train(emb)
        if rows:
            index.add_with_ids(emb, np.asarray(rows, dtype=np.int64))
        self.index = index
        self._write_index()

    # -- internals --------------------------------------------------------------------------------

    def _check_embeddings(self, docs: Sequence[Document], embeddings: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape != (len(docs), self.dim):
            raise ValueError(f"expected embeddings of shape ({len(docs)}, {self.dim}), got {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings hold NaN or infinite values")
        return emb

    def _insert(self, doc: Document, vec: np.ndarray) -> int:
        segs, images = [], []
        for seg in doc.segments:
            if isinstance(seg, str):
                segs.append({"text": seg})
            else:
                segs.append({"image": len(images)})
                images.append(image_to_png(seg))
        cur = self._conn.execute(
            "INSERT INTO documents(id, text, segments, meta, embedding) VALUES (?, ?, ?, ?, ?)",
            (doc.id, doc.text, json.dumps(segs), json.dumps(doc.meta, ensure_ascii=False, default=str),
             vec.astype(np.float32).tobytes()))
        row = cur.lastrowid
        self._conn.executemany("INSERT INTO images(row, idx, png) VALUES (?, ?, ?)",
                               [(row, i, png) for i, png in enumerate(images)])
        return row

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _rows_by_id(self, ids: Sequence[str]) -> dict[str, tuple]:
        rows: dict[str, tuple] = {}
        for s in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
            chunk = list(ids[s:s + 500])
            q = f"SELECT row, id, segments, embedding, meta FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
            rows.update({r[1]: (r[0], r[1], r[2], r[3], r[4]) for r in self._conn.execute(q, chunk)})
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"{self.path}: no document with id {missing[0]!r} in the memory"
                           + (f" ({len(missing)} unknown ids)" if len(missing) > 1 else ""))
        return rows

    def _rows_by_row(self, rows: Sequence[int]) -> dict[int, tuple]:
        out: dict[int, tuple] = {}
        for s in range(0, len(rows), 500):
            chunk = list(rows[s:s + 500])
            q = f"SELECT row, id, segments, embedding, meta FROM documents WHERE row IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: tuple(r) for r in self._conn.execute(q, chunk)})
        return out

    def _document(self, rec: tuple) -> Document:
        row, doc_id, segs_json, _, meta_json = rec
        pngs = dict(self._conn.execute("SELECT idx, png FROM images WHERE row = ?", (row,)).fetchall())
        segments = []
        for seg in json.loads(segs_json):
            if "text" in seg:
                segments.append(seg["text"])
            else:
                segments.append(load_image(pngs[seg["image"]], name=f"{self.path / STORE}: {doc_id}"))
        return Document(doc_id, tuple(segments), json.loads(meta_json))

    def _index_remove(self, rows: list[int]) -> None:
        if not rows:
            return
        if self.index_type == "hnsw":  # HNSW graphs cannot delete: rebuild from the store
            self.rebuild_index()
        else:
            self.index.remove_ids(np.asarray(rows, dtype=np.int64))

    def _write_index(self) -> None:
        import faiss

        tmp = self.path / (INDEX + ".tmp")
        faiss.write_index(self.index, str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, self.path / INDEX)
        info = {**self.info(), "generation": self.generation}
        _atomic_write(self.path / INFO, json.dumps(info, indent=2) + "\n")

    def _load_index(self) -> bool:
        """Load index.faiss if it matches the store's generation and count; False means rebuild."""
        import faiss

        try:
            info = json.loads((self.path / INFO).read_text())
            if int(info.get("generation", -1)) != self.generation or not (self.path / INDEX).exists():
                return False
            index = faiss.read_index(str(self.path / INDEX))
        except (OSError, ValueError, RuntimeError):
            return False
        if index.ntotal != len(self):
            return False
        self.index = index
        if self.index_type == "hnsw":  # search-time settings are not saved in the file
            faiss.downcast_index(index.index).hnsw.efSearch = HNSW_EF_SEARCH
        elif self.index_type == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(ivf.nlist, IVF_NPROBE)
            self._trained_on = index.ntotal  # at least what it holds; a 4x growth from here retrains it
        return True


_SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- AUTOINCREMENT: a removed document's row number is never reused, so a stale index entry can never
-- point at another document.
CREATE TABLE documents (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT,
    segments TEXT NOT NULL,   -- JSON list: {"text": ...} or {"image": n} (n indexes this row's images)
    meta TEXT NOT NULL,       -- JSON object
    embedding BLOB NOT NULL   -- float32 x dim
);
CREATE TABLE images (row INTEGER NOT NULL, idx INTEGER NOT NULL, png BLOB NOT NULL, PRIMARY KEY (row, idx));
"""


def _search(index: "faiss.Index", queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search, on one thread for a few queries (OpenMP threads cost more than they save there)."""
    import faiss

    if len(queries) > 4:
        return index.search(queries, k)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(previous)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode=WAL")  # a killed writer's half transaction is rolled back on open
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
