"""The retrieval memory: a SQLite store (source of truth) plus a FAISS inner-product index rebuilt from it at need.

Vectors first: a search asks the index for store rows and scores, reads only those rows' ids, vectors and
modality (no image), lets the caller's rules choose among them, and decodes the chosen documents alone.

Writes touch what changed: a write changes the store in one transaction and the index in RAM by its rows;
index.faiss is a saved base that a reader brings up to date from the store (new documents have higher rows;
the removed table logs removals), rewritten only once the changes since it pass COMPACT of it.

One writer at a time, enforced: every write holds an OS lock (flock) on write.lock in the memory folder from
before it reads the store's state until it is done (memory.json written, when the index file was). Readers
never write: a reader that finds the index on disk unusable builds one in its own RAM.

ivf-ondisk, a folder memory's only index type that need not fit in RAM (IVF whose lists live in a file beside
index.faiss, memory-mapped read-only), is in ondisk.py, with its design; Memory calls it where the types differ.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import random
import sqlite3
import sys
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from racm3.documents import Document, image_to_png, load_image
from racm3.retrieval import ondisk

if TYPE_CHECKING:
    import faiss

INDEX_TYPES = ("flat", "hnsw", "ivfpq")  # every backend's (a Milvus collection's too)
ONDISK = "ivf-ondisk"  # a folder memory's: IVF whose lists live in a file beside index.faiss, memory-mapped
FOLDER_INDEX_TYPES = INDEX_TYPES + (ONDISK,)
STORE, INDEX, INFO, LOCK = "store.sqlite", "index.faiss", "memory.json", "write.lock"
HNSW_M = 32  # graph degree: FAISS's usual default for recall above 0.95
# build-time breadth: FAISS's default 40 left recall@10 at 0.889 at 1M (0.946 at efSearch 1,024); 200 gives 0.999
# at efSearch 128 for 3.5x the build time (benchmarks/results/retrieval_speed_ef_sweep_efc200.json)
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16
PQ_MIN_TRAIN = 256 * 39  # FAISS wants ~39 points per centroid, 256 centroids per PQ sub-quantizer
ONDISK_RESCORE = 4  # ivf-ondisk is asked for this many candidates per result, re-scored from the stored vectors
STREAM_ROWS = 8192  # rows read from the store per batch when streaming its vectors
DEFAULT_WAIT = 300.0  # seconds a writer waits for another writer of the same memory before giving up
WAIT_NOTICE = 0.5  # a waiting writer says so once it has waited this long
READER_WAIT = 5.0  # seconds a reader waits for a live writer to save its index before building one in RAM
# index.faiss is rewritten once the documents added and removed since it was saved pass this share of the
# documents it holds: a reader replays at most that much from the store, a writer rewrites the file at most
# once per that many changes (a rewrite costs the whole index; replaying a change, one row)
COMPACT = 0.1


class MemoryFolderError(RuntimeError):
    """A memory folder that cannot be used as asked; the message names the folder and the fix."""


class EncoderMismatch(MemoryFolderError):
    """The memory was filled by one encoder and is being queried or filled by another."""


class MemoryBusy(MemoryFolderError):
    """Another process is writing the memory and did not finish within the wait."""


class CorruptStore(MemoryFolderError):
    """store.sqlite is empty, truncated or not a memory store."""


@dataclass(frozen=True)
class Hit:
    """One retrieved document: its id, the document, its cosine score with the query, its rank (0 = best)."""

    id: str
    document: Document
    score: float
    rank: int


@dataclass(frozen=True)
class Candidates:
    """One query's nearest documents before any is decoded, best first: ids, store rows, exact cosines with the
    query (from the stored vectors: IVF-PQ's and ivf-ondisk's own scores are approximate), the vectors (n, dim),
    and which hold both text and an image. Memory.documents(rows) decodes the ones a caller keeps."""

    ids: list[str]
    rows: list[int]
    scores: np.ndarray
    vectors: np.ndarray
    multimodal: np.ndarray


def _nlist(n_train: int) -> int:
    """IVF lists for n_train training vectors: ~4 sqrt(n) with >= 39 training points per list (FAISS guidelines)."""
    return max(1, min(65536, int(4 * math.sqrt(max(n_train, 1))), n_train // 39))


def _new_index(kind: str, dim: int, n_train: int = 0) -> "faiss.Index":
    """An empty inner-product index keyed by store row; ivfpq's and ivf-ondisk's shapes depend on how many vectors
    they will be trained on. (ivf-ondisk's is the IVF the memory keeps on disk, its lists here in RAM: see
    ondisk.new_index.)"""
    import faiss

    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivfpq":
        # PQ codes of dim/8 bytes need 256 centroids per sub-quantizer, so below PQ_MIN_TRAIN vectors the lists
        # hold exact vectors (IVF-Flat); rebuild_index() retrains once the memory has grown.
        nlist = _nlist(n_train)
        quantizer = faiss.IndexFlatIP(dim)
        if n_train >= PQ_MIN_TRAIN and dim % 8 == 0:
            base = faiss.IndexIVFPQ(quantizer, dim, nlist, dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
        else:
            base = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.nprobe = min(nlist, IVF_NPROBE)
        return base  # IVF lists store ids themselves (IndexIDMap's removal assumes a compacting index)
    elif kind == ONDISK:
        return ondisk.new_index(dim, _nlist(n_train), IVF_NPROBE, HNSW_M)
    else:
        raise ValueError(f"index type {kind!r} is not one of {FOLDER_INDEX_TYPES}")
    return faiss.IndexIDMap2(base)


def _store_errors(method):
    """SQLite's errors on an unreadable store.sqlite become one CorruptStore line naming the file and the fix."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise _corrupt(self.path, str(exc)) from None

    return wrapper


class MemoryBase:
    """What every memory backend shares, on top of what each provides: __len__, __contains__, ids, get, documents,
    vectors, scan, generation, candidates, add, remove, update and close (and present, where it can beat one
    __contains__ per id), with these attributes: path (the folder
    or URI that messages name), encoder_name, dim, index_type, wait and _lock (a write lock: acquire(wait),
    release(), held). Memory keeps documents in SQLite with a FAISS index; milvus_memory.MilvusMemory in Milvus.
    backends.open_memory() opens either from its location."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        return {"count": len(self), "encoder": self.encoder_name, "dim": self.dim, "index": self.index_type}

    def require_encoder(self, name: str) -> None:
        if name != self.encoder_name:
            raise EncoderMismatch(f"{self.path}: this memory was built with encoder {self.encoder_name!r} but is used "
                                  f"with encoder {name!r}; use the encoder that built it (--encoder) or rebuild the "
                                  f"memory with `racm3 memory build`")

    def search(self, queries: np.ndarray, k: int, encoder_name: str | None = None,
               exclude_ids: Sequence[Iterable[str]] | None = None) -> list[list[Hit]]:
        """Top-k documents by cosine for each query row (n, dim; L2-normalised), decoded."""
        found = self.candidates(queries, k, exclude_ids, encoder_name)
        return self.hits(found, [range(len(c.ids)) for c in found])

    def hits(self, found: Sequence[Candidates], picks: Sequence[Iterable[int]]) -> list[list[Hit]]:
        """The picked candidates (indices into each query's Candidates) as ranked Hits, every query's documents
        decoded in one documents() call; a document removed since its candidates were read is left out."""
        picks = [list(p) for p in picks]
        docs = self.documents([c.rows[i] for c, p in zip(found, picks) for i in p])
        out = []
        for c, p in zip(found, picks):
            kept = [i for i in p if c.rows[i] in docs]
            out.append([Hit(c.ids[i], docs[c.rows[i]], float(c.scores[i]), rank) for rank, i in enumerate(kept)])
        return out

    def add_documents(self, docs: Sequence[Document], encoder, batch_size: int = 512, progress=None) -> int:
        """Embed documents with `encoder` (which must be the memory's), batch by batch, and add them in one write.

        Ids are checked for repeats and presence before any embedding, and again under the write lock; another
        writer is waited for (or refused, as `wait` says) before embedding too, and the ids checked again after
        that wait (the other writer may have added them). A bad list adds nothing, and a process killed at any
        point leaves all of the documents in the memory or none.
        """
        self.require_encoder(encoder.name)
        ids = [d.id for d in docs]
        _refuse_repeats(ids)
        self._refuse_present(ids)
        if ids and not self._lock.held:
            # a writer that would not get the lock gives up (or waits) before embedding, not after; the lock is
            # not held while embedding, so a long embedding never keeps other writers waiting
            self._lock.acquire(self.wait)
            self._lock.release()
            self._refuse_present(ids)
        vecs = []
        for s in range(0, len(docs), batch_size):
            chunk = docs[s:s + batch_size]
            vecs.append(np.asarray(encoder.embed_documents(chunk), dtype=np.float32))
            if progress is not None:
                progress(len(chunk))
        if vecs:
            self.add(docs, np.concatenate(vecs))
        return len(docs)

    def _query_args(self, queries: np.ndarray, exclude_ids: Sequence[Iterable[str]] | None,
                    encoder_name: str | None) -> tuple[np.ndarray, list[set[str]]]:
        """candidates()' arguments checked: (n, dim) float32 queries and one set of ids to leave out per query."""
        if encoder_name is not None:
            self.require_encoder(encoder_name)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {queries.shape[1]}, the memory {self.dim}")
        excludes = [set(e) for e in exclude_ids] if exclude_ids is not None else [set()] * len(queries)
        if len(excludes) != len(queries):
            raise ValueError(f"exclude_ids has {len(excludes)} entries for {len(queries)} queries")
        return queries, excludes

    def _refuse_present(self, ids: Sequence[str]) -> None:
        present = self.present(ids)
        if present:
            raise KeyError(f"{self.path}: document id {_short(present[0])!r} is already in the memory "
                           f"({len(present)} of the ids to add are); to replace a document, remove it first "
                           f"(`racm3 memory remove {self.path} ID`, or Memory.remove) and add it again")

    def _check_embeddings(self, docs: Sequence[Document], embeddings: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape != (len(docs), self.dim):
            raise ValueError(f"expected embeddings of shape ({len(docs)}, {self.dim}), got {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings hold NaN or infinite values")
        return emb

    def _check_additions(self, docs: Sequence[Document], embeddings: np.ndarray) -> np.ndarray:
        """add()'s arguments checked: the embeddings as _check_embeddings gives them, no id given twice."""
        emb = self._check_embeddings(docs, embeddings)
        _refuse_repeats([d.id for d in docs])
        return emb

    def present(self, ids: Sequence[str]) -> list[str]:
        """The ids that are already in the memory (a backend may answer in fewer queries)."""
        return [i for i in ids if i in self]


class Memory(MemoryBase):
    """A folder holding store.sqlite (documents + embeddings + the encoder's name), index.faiss and memory.json.

    Writes are atomic: the store changes in one SQLite transaction that also bumps a generation counter (and
    logs removed rows); the index in RAM then changes by the same rows. index.faiss is written (a temporary file,
    renamed) when the changes since it pass COMPACT of it, and memory.json records the generation and rows it
    holds and its checksum. A process killed at any point leaves a memory that opens and answers consistently:
    an index from an earlier generation replays the store's changes since, a missing or damaged one is rebuilt.

    One writer at a time, enforced: add, remove, update and rebuild_index hold write.lock (flock) for the whole
    write, re-read the store's current state after taking it (never trusting what was loaded at open time),
    and wait up to `wait` seconds for another writer (0: fail at once) before raising MemoryBusy. Any number
    of readers: opening and searching never write; a search notices other writers' changes and replays them
    into its index in RAM (or loads the saved one, or builds one).
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, encoder: str, dim: int, index_type: str,
                 wait: float = DEFAULT_WAIT, lock: "_WriteLock | None" = None):
        self.path = path
        self._conn = conn
        self.encoder_name = encoder
        self.dim = dim
        self.index_type = index_type
        self.wait = wait  # seconds a write waits for another writer (0: fail at once)
        self.index: "faiss.Index" = None  # type: ignore[assignment]
        self._index_generation = -1  # the store generation self.index reflects (-1: none yet)
        self._rows_through = 0  # self.index holds every document of that generation with a row up to this one
        self._trained_on = 0  # vectors the ivfpq index was last trained on (set when it is built or loaded)
        self._base_unusable = False  # this process found index.faiss unusable: its next write saves a new one
        self._lock = lock or _WriteLock(path)

    # -- creation and opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat",
               wait: float = DEFAULT_WAIT) -> "Memory":
        _check_new_memory(encoder_name, dim, index, FOLDER_INDEX_TYPES)
        path = Path(path)
        if (path / STORE).exists():
            raise _exists(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = _WriteLock(path)
        lock.acquire(wait)
        try:
            if (path / STORE).exists():  # another process created it while this one waited
                raise _exists(path)
            _create_store(path / STORE, [("encoder", encoder_name), ("dim", str(dim)), ("index", index),
                                         ("generation", "0")])
            mem = cls(path, _connect(path / STORE), encoder_name, dim, index, wait, lock)
            empty = _new_index(index, dim)
            mem.index = ondisk.OnDiskIVF(empty, 0, IVF_NPROBE) if index == ONDISK else empty
            mem._index_generation = 0
            mem._write_index()
        finally:
            lock.release()
        return mem

    @classmethod
    def open(cls, path: str | os.PathLike, wait: float = DEFAULT_WAIT) -> "Memory":
        """Open a memory to read it (and to write it: writes take the lock themselves). Writes nothing."""
        path = Path(path)
        if not (path / STORE).exists():
            raise MemoryFolderError(f"{path}: no memory here ({STORE} missing); build one with "
                                    f"`racm3 memory build DATASET_DIR {path}`")
        if (path / STORE).stat().st_size == 0:
            raise _corrupt(path, "the file is empty")
        conn = sqlite3.connect(str(path / STORE), timeout=30)
        try:
            _configure(conn)
            info = dict(conn.execute("SELECT key, value FROM info").fetchall())
            missing = [k for k in ("encoder", "dim", "index", "generation") if k not in info]
            if missing or info["index"] not in FOLDER_INDEX_TYPES or not info["dim"].isdigit():
                raise _corrupt(path, f"its info table lacks or garbles {missing or 'dim or index'}")
            mem = cls(path, conn, info["encoder"], int(info["dim"]), info["index"], wait)
            mem._refresh()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _corrupt(path, str(exc)) from None
        except BaseException:
            conn.close()
            raise
        return mem

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat",
                       wait: float = DEFAULT_WAIT) -> "Memory":
        if not (Path(path) / STORE).exists():
            try:
                return cls.create(path, encoder_name, dim, index, wait)
            except MemoryFolderError:
                if not (Path(path) / STORE).exists():
                    raise  # not the race with another creator: a real failure
        mem = cls.open(path, wait)
        mem.require_encoder(encoder_name)
        return mem

    def close(self) -> None:
        self._conn.close()

    # -- reading ----------------------------------------------------------------------------------

    @_store_errors
    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    @_store_errors
    def __contains__(self, doc_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    @_store_errors
    def ids(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT id FROM documents ORDER BY row")]

    @property
    @_store_errors
    def generation(self) -> int:
        return int(self._conn.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()[0])

    @_store_errors
    def get(self, ids: Sequence[str]) -> list[Document]:
        """Documents by id, in the order asked; an unknown id raises KeyError naming it."""
        rows = self._rows_by_id(ids)
        docs = self.documents([rows[i][0] for i in ids])
        return [docs[rows[i][0]] for i in ids]

    @_store_errors
    def documents(self, rows: Sequence[int]) -> dict[int, Document]:
        """The documents at these store rows (as Candidates name them), decoded, by row: one SELECT of them and
        their images per 500 rows. A row removed since it was found is absent."""
        wanted = sorted(set(int(r) for r in rows))
        found: dict[int, tuple] = {}
        pngs: dict[int, dict[int, bytes]] = {}
        for s in range(0, len(wanted), 500):  # SQLite caps the number of bound parameters
            chunk = wanted[s:s + 500]
            q = (f"SELECT d.row, d.id, d.segments, d.meta, i.idx, i.png FROM documents d LEFT JOIN images i "
                 f"ON i.row = d.row WHERE d.row IN ({','.join('?' * len(chunk))})")
            for row, doc_id, segs, meta, idx, png in self._conn.execute(q, chunk):
                found[row] = (doc_id, segs, meta)
                if png is not None:
                    pngs.setdefault(row, {})[idx] = png
        return {row: self._document(*rec, pngs.get(row, {})) for row, rec in found.items()}

    @_store_errors
    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings (n, dim) of the given ids, in order."""
        rows = self._rows_by_id(ids)
        return np.stack([np.frombuffer(rows[i][1], dtype=np.float32) for i in ids]) if ids else \
            np.zeros((0, self.dim), np.float32)

    @_store_errors
    def scan(self) -> tuple[list[str], list[dict], np.ndarray]:
        """Every document's id, meta (with its joined text under "_text") and vector (n, dim), images not decoded."""
        ids, metas, vecs = [], [], []
        for doc_id, text, meta, blob in self._conn.execute("SELECT id, text, meta, embedding FROM documents ORDER BY row"):
            ids.append(doc_id)
            metas.append({**json.loads(meta), "_text": text})
            vecs.append(np.frombuffer(blob, dtype=np.float32))
        return ids, metas, np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)

    @_store_errors
    def candidates(self, queries: np.ndarray, k: int, exclude_ids: Sequence[Iterable[str]] | None = None,
                   encoder_name: str | None = None) -> list[Candidates]:
        """Each query row's (n, dim; L2-normalised) k nearest documents by exact cosine, leaving out that query's
        exclude_ids, before any document is decoded: fewer than k only when the memory holds no more.

        The index is asked for k plus the query's exclusions (ivf-ondisk: ONDISK_RESCORE x k, its 8-bit scores
        being approximate); their rows, vectors and modality come from the store in one SELECT per 500 rows, and
        the k best by the stored vectors' cosine are kept. Sees every write committed before the call, from any
        process.
        """
        queries, excludes = self._query_args(queries, exclude_ids, encoder_name)
        self._refresh()
        wanted = k * ONDISK_RESCORE if self.index_type == ONDISK else k
        fetch = min(wanted + max((len(e) for e in excludes), default=0), self.index.ntotal)
        if k <= 0 or fetch == 0:
            return [Candidates([], [], np.zeros(0, np.float32), np.zeros((0, self.dim), np.float32),
                               np.zeros(0, bool)) for _ in queries]
        _, found = _search(self.index, queries, fetch)
        stored = self._candidate_rows([int(r) for r in np.unique(found) if r >= 0])
        out = []
        for q, rows, exclude in zip(queries, found, excludes):
            # -1 pads a short answer; a row missing from the store was removed since the index was read
            keep = [int(r) for r in rows if r >= 0 and r in stored and stored[r][0] not in exclude]
            vectors = np.stack([stored[r][1] for r in keep]) if keep else np.zeros((0, self.dim), np.float32)
            scores = vectors @ q
            order = np.argsort(-scores, kind="stable")[:k]
            keep = [keep[i] for i in order]
            out.append(Candidates([stored[r][0] for r in keep], keep, scores[order], vectors[order],
                                  np.array([stored[r][2] for r in keep], bool)))
        return out

    # -- writing (each under the write lock, from reading the store's state to writing memory.json) ----------

    @_store_errors
    def add(self, docs: Sequence[Document], embeddings: np.ndarray) -> None:
        """Add documents with their embeddings (n, dim); an id already present raises and nothing is added."""
        emb = self._check_additions(docs, embeddings)
        if not docs:
            return
        ids = [d.id for d in docs]
        with self._writing():
            self._refuse_present(ids)
            with self._conn:  # one transaction: all documents or none
                rows = [self._insert(doc, vec) for doc, vec in zip(docs, emb)]
                self._bump_generation()
            if self.index_type in ("ivfpq", ONDISK) and \
                    (not self.index.is_trained or len(self) >= 4 * max(self._trained_on, 1)):
                # IVF trains on the stored vectors: first when there are some, again each time the memory has
                # grown 4x since (lists and PQ codebooks sized for a tenth of the data serve it badly)
                self._build_index()
                self._write_index()
            else:
                self.index.add_with_ids(emb, np.asarray(rows, dtype=np.int64))
                self._saved_if_due()

    @_store_errors
    def remove(self, ids: Iterable[str]) -> None:
        """Remove documents; an unknown id raises KeyError naming it and removes nothing."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return
        with self._writing():
            rows = self._rows_by_id(ids)
            with self._conn:
                self._delete([rows[i][0] for i in ids])
                self._bump_generation()
            self._index_remove([rows[i][0] for i in ids])

    @_store_errors
    def update(self, docs: Sequence[Document], embeddings: np.ndarray) -> None:
        """Replace documents that exist (same ids) with new content and embeddings, in one transaction."""
        emb = self._check_embeddings(docs, embeddings)
        with self._writing():
            rows = self._rows_by_id([d.id for d in docs])
            old = [rows[d.id][0] for d in docs]
            with self._conn:
                self._delete(old)
                new = [self._insert(doc, vec) for doc, vec in zip(docs, emb)]
                self._bump_generation()
            if self.index_type == "hnsw":  # HNSW cannot delete: one rebuild from the store covers old and new rows
                self._build_index()
                self._write_index()
            else:
                self.index.remove_ids(np.asarray(old, dtype=np.int64))
                self.index.add_with_ids(emb, np.asarray(new, dtype=np.int64))
                self._saved_if_due()

    @_store_errors
    def rebuild_index(self) -> None:
        """Rebuild index.faiss from the store's embeddings and save it (a write: it takes the lock)."""
        with self._writing():
            self._build_index()
            self._write_index()

    # -- internals --------------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the write lock for a whole write. On taking it, catch up with the store as other writers left it:
        an index loaded at open time may lack their documents, and saving it would lose them."""
        first = not self._lock.held
        self._lock.acquire(self.wait)
        try:
            if first:
                self._conn.execute(_REMOVED_TABLE)  # a store from before the removal log gets its table (no-op after)
                if self.index_type == ONDISK:
                    self._tidy_lists()
                self._refresh()
            yield
        finally:
            self._lock.release()

    def _refresh(self) -> None:
        """Make self.index reflect the store's current generation, if it does not yet. Writes nothing.

        Inside one read transaction (so vectors, log and generation agree): an index in RAM replays the store's
        changes since it; else index.faiss is loaded and replays the changes since it was saved (when memory.json
        describes that very file: its checksum); else, after waiting a little for a writer still saving it, the
        index is built in RAM from the store. (An ivf-ondisk index whose changes in RAM have passed COMPACT of its
        lists loads the saved one first, where it can: a long-lived reader follows the writer's lists files.)
        """
        if self.index is not None and self._index_generation == self.generation:
            return
        deadline = time.monotonic() + READER_WAIT
        while True:
            self._conn.execute("BEGIN")
            try:
                generation = self.generation
                if self.index is not None and self._index_generation <= generation:
                    if isinstance(self.index, ondisk.OnDiskIVF) and self.index.changes > COMPACT * max(
                            self.index.base.ntotal, 1) and self._load_index(generation):
                        return  # its changes in RAM passed COMPACT: a writer has saved a newer lists file since
                    if self._replay(self.index, self._index_generation, self._rows_through):
                        self._index_generation, self._rows_through = generation, self._max_row()
                        return
                    self.index = None  # partly replayed or not at all: load or build one instead
                if self._load_index(generation):
                    return
                if self._lock.held or time.monotonic() >= deadline or not _writer_active(self.path):
                    self._build_index()
                    self._base_unusable = True
                    return
            finally:
                self._conn.rollback()
            time.sleep(0.02)

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

    def _delete(self, rows: Sequence[int]) -> None:
        """Delete rows (inside the write's transaction, before its generation bump), logging each in the removed
        table under the generation this write commits, from which readers replay the removal."""
        generation = self.generation + 1
        self._conn.executemany("DELETE FROM images WHERE row = ?", [(r,) for r in rows])
        self._conn.executemany("DELETE FROM documents WHERE row = ?", [(r,) for r in rows])
        self._conn.executemany("INSERT INTO removed(generation, row) VALUES (?, ?)", [(generation, r) for r in rows])

    def _max_row(self) -> int:
        return self._conn.execute("SELECT COALESCE(MAX(row), 0) FROM documents").fetchone()[0]

    def _rows_by_id(self, ids: Sequence[str]) -> dict[str, tuple]:
        """id -> (row, embedding bytes); an unknown id raises KeyError naming it."""
        rows: dict[str, tuple] = {}
        for s in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
            chunk = list(ids[s:s + 500])
            q = f"SELECT id, row, embedding FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
            rows.update({r[0]: (r[1], r[2]) for r in self._conn.execute(q, chunk)})
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"{self.path}: no document with id {_short(missing[0])!r} in the memory"
                           + (f" ({len(missing)} unknown ids)" if len(missing) > 1 else ""))
        return rows

    def _candidate_rows(self, rows: Sequence[int]) -> dict[int, tuple[str, np.ndarray, bool]]:
        """row -> (id, vector, holds text and an image) for rows still in the store: the row alone, no image read."""
        out: dict[int, tuple[str, np.ndarray, bool]] = {}
        for s in range(0, len(rows), 500):
            chunk = list(rows[s:s + 500])
            q = (f"SELECT row, id, embedding, text IS NOT NULL AND EXISTS (SELECT 1 FROM images i WHERE i.row = "
                 f"d.row) FROM documents d WHERE row IN ({','.join('?' * len(chunk))})")
            out.update({r: (i, np.frombuffer(e, np.float32), bool(m)) for r, i, e, m in self._conn.execute(q, chunk)})
        return out

    def _document(self, doc_id: str, segs_json: str, meta_json: str, pngs: dict[int, bytes]) -> Document:
        segments = []
        for seg in json.loads(segs_json):
            if "text" in seg:
                segments.append(seg["text"])
            else:
                segments.append(load_image(pngs[seg["image"]], name=f"{self.path / STORE}: {_short(doc_id)}"))
        return Document(doc_id, tuple(segments), json.loads(meta_json))

    def _index_remove(self, rows: list[int]) -> None:
        """Drop removed rows from self.index and save it as a write does (HNSW cannot delete: rebuilt, saved)."""
        if self.index_type == "hnsw":
            self._build_index()
            self._write_index()
        else:
            self.index.remove_ids(np.asarray(rows, dtype=np.int64))
            self._saved_if_due()

    def _build_index(self) -> None:
        """self.index built from the store's embeddings, in RAM, for the store's generation (a writer then saves
        it with _write_index). ivf-ondisk's is streamed, its lists written to a new lists file under the lock."""
        if self.index_type == ONDISK:
            n = len(self)
            self.index = ondisk.build(_new_index(ONDISK, self.dim, n_train=n), self._sample_vectors,
                                      self._stream_vectors(), self.path, self.generation, self._lock.held, IVF_NPROBE)
            self._trained_on, self._index_generation, self._rows_through = n, self.generation, self._max_row()
            return
        rows, vecs = [], []
        for row, blob in self._conn.execute("SELECT row, embedding FROM documents ORDER BY row"):
            rows.append(row)
            vecs.append(np.frombuffer(blob, dtype=np.float32))
        emb = np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        index = _new_index(self.index_type, self.dim, n_train=len(rows))
        if self.index_type == "ivfpq" and rows:
            index.train(emb)
        if rows:
            index.add_with_ids(emb, np.asarray(rows, dtype=np.int64))
        self.index, self._trained_on = index, len(rows)
        self._index_generation, self._rows_through = self.generation, max(rows, default=0)

    def _replay(self, index: "faiss.Index", generation: int, rows_through: int) -> bool:
        """Bring `index`, which held the store of `generation` up to row `rows_through`, to the store being read:
        add the rows above rows_through (rows only grow), remove the rows the log says were removed since.

        False, with the index untouched, where that cannot give the store's documents: a store from before the
        removal log, removals in an index that cannot delete (HNSW), additions to an IVF index never trained (its
        writer was killed before training it), or a count that does not add up (a writer from before the log
        removed documents).
        """
        logged = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'removed'")
        if logged.fetchone() is None:
            return False
        removed = [r for (r,) in self._conn.execute(
            "SELECT row FROM removed WHERE generation > ? AND row <= ?", (generation, rows_through))]
        added = self._conn.execute("SELECT row, embedding FROM documents WHERE row > ? ORDER BY row",
                                   (rows_through,)).fetchall()
        if (removed and self.index_type == "hnsw") or (added and not index.is_trained) \
                or index.ntotal + len(added) - len(removed) != len(self):
            return False
        if removed:
            index.remove_ids(np.asarray(removed, dtype=np.int64))
        if added:
            index.add_with_ids(np.stack([np.frombuffer(e, np.float32) for _, e in added]),
                               np.asarray([r for r, _ in added], dtype=np.int64))
        return True

    def _saved_if_due(self) -> None:
        """After a write applied to self.index: it now holds the store's generation. index.faiss is left as it
        is (readers replay the change from the store) until the changes since it was saved pass COMPACT of it,
        or this process found it unusable, or memory.json does not say which rows it holds (an older format)."""
        self._index_generation, self._rows_through = self.generation, self._max_row()
        try:
            base = json.loads((self.path / INFO).read_text())
            changes = self._conn.execute("SELECT COUNT(*) FROM documents WHERE row > ?", (base["rows_through"],)) \
                .fetchone()[0] + self._conn.execute("SELECT COUNT(*) FROM removed WHERE generation > ?",
                                                    (base["generation"],)).fetchone()[0]
            due = self._base_unusable or changes > COMPACT * base["count"]
        except (OSError, ValueError, KeyError, TypeError):
            due = True
        if due:
            self._write_index()

    def _write_index(self) -> None:
        """Save self.index (temporary file, fsync, rename), then memory.json with the generation and rows it holds
        and the file's size and CRC-32, so a reader can tell this file from one another writer saved since."""
        import faiss

        if not self._lock.held:
            raise RuntimeError("the index is only written under the write lock")
        index, lists = self.index, {}
        if self.index_type == ONDISK:
            # the lists file first, complete and fsynced, under a new name; index.faiss names it by its base name
            self.index = index = ondisk.consolidated(index, self.path, self.generation, self._rows_through)
            mapped = index.lists
            lists = {"lists": Path(mapped.filename).name if mapped else None,
                     "lists_bytes": int(mapped.totsize) if mapped else 0}
            index = index.base
        tmp = self.path / (INDEX + ".tmp")
        with open(tmp, "wb") as f:
            sink = _Checksummed(f)
            with ondisk.lists_named(index, lists.get("lists")):
                faiss.write_index(index, faiss.PyCallbackIOWriter(sink.write))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / INDEX)
        info = {**self.info(), "count": self.index.ntotal, "generation": self._index_generation,
                "rows_through": self._rows_through, "index_bytes": sink.size, "index_crc32": sink.crc, **lists}
        _atomic_write(self.path / INFO, json.dumps(info, indent=2) + "\n")
        self._base_unusable = False
        if self.index_type == ONDISK:
            ondisk.remove_stale_lists(self.path, keep=lists["lists"])

    def _load_index(self, generation: int) -> bool:
        """Load index.faiss if memory.json describes this very file (its checksum) for this store generation or,
        naming the rows it holds, for an earlier one whose changes since replay from the store; False means build
        one. (A memory.json without a checksum, from before they were written, is trusted.)"""
        import faiss

        try:
            info = json.loads((self.path / INFO).read_text())
            saved = int(info.get("generation", -1))
            if saved > generation or (saved < generation and "rows_through" not in info):
                return False
            with open(self.path / INDEX, "rb") as f:
                source = _Checksummed(f)
                if self.index_type == ONDISK:  # its header alone (centroids, list offsets): checked before parsed
                    header = source.read(-1)
                else:
                    index = faiss.read_index(faiss.PyCallbackIOReader(source.read))
            if "index_crc32" in info and (source.crc, source.size) != (info["index_crc32"], info.get("index_bytes")):
                return False  # another writer's file replaced the one memory.json describes
            if self.index_type == ONDISK:  # the lists file is mapped from this folder by ondisk, not by FAISS
                index = ondisk.mapped(header, self.path, info.get("lists"), info.get("lists_bytes"),
                                      int(info.get("rows_through", 0)), IVF_NPROBE)
        except (OSError, ValueError, RuntimeError, TypeError):
            return False
        if "rows_through" in info:
            if not self._replay(index, saved, int(info["rows_through"])):
                return False
        elif index.ntotal != len(self):
            return False
        self.index = index
        self._index_generation, self._rows_through = generation, self._max_row()
        self._base_unusable = False
        if self.index_type == "hnsw":  # search-time settings are not saved in the file
            faiss.downcast_index(index.index).hnsw.efSearch = HNSW_EF_SEARCH
        elif self.index_type == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(ivf.nlist, IVF_NPROBE)
            self._trained_on = index.ntotal  # at least what it holds; a 4x growth from here retrains it
        elif self.index_type == ONDISK:
            self._trained_on = index.ntotal
        return True

    # -- ivf-ondisk: what it needs of the folder and the store -------------------------------------

    def _tidy_lists(self) -> None:
        """At the start of a write: remove the lists files that memory.json does not name (a writer killed before
        it removed the old one, or before it saved its new one), unless memory.json cannot be read."""
        try:
            keep = json.loads((self.path / INFO).read_text())["lists"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        ondisk.remove_stale_lists(self.path, keep)

    def _sample_vectors(self, m: int) -> np.ndarray:
        """m stored vectors drawn at random (a fixed seed), all of them where there are no more; (m, dim)."""
        rows = np.fromiter((r for (r,) in self._conn.execute("SELECT row FROM documents")), np.int64)
        if len(rows) > m:
            rows = np.sort(np.random.default_rng(0).choice(rows, m, replace=False))
        out, n = np.empty((len(rows), self.dim), np.float32), 0
        for s in range(0, len(rows), 500):
            chunk = [int(r) for r in rows[s:s + 500]]
            for (e,) in self._conn.execute(
                    f"SELECT embedding FROM documents WHERE row IN ({','.join('?' * len(chunk))})", chunk):
                out[n], n = np.frombuffer(e, np.float32), n + 1
        return out[:n]

    def _stream_vectors(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The store's (rows, vectors) in row order, STREAM_ROWS at a time."""
        cursor = self._conn.execute("SELECT row, embedding FROM documents ORDER BY row")
        while True:
            batch = cursor.fetchmany(STREAM_ROWS)
            if not batch:
                return
            yield (np.array([r for r, _ in batch], np.int64),
                   np.frombuffer(b"".join(e for _, e in batch), np.float32).reshape(-1, self.dim))


class _WriteLock:
    """An exclusive flock on FOLDER/write.lock, re-entrant within one Memory; the OS drops it when the process dies.

    The holder writes its pid into the file, so a waiting writer can say whom it waits for.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self, wait: float) -> None:
        if self._depth:
            self._depth += 1
            return
        try:
            fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MemoryFolderError(f"{self.folder / LOCK}: cannot open the write lock ({exc.strerror}); a memory is "
                                    f"written only where the user may write files: check the folder's permissions") \
                from None
        try:
            _flock_within(fd, wait, self.folder)
            # fixed width, so it covers any pid written before without a truncate (which costs milliseconds here)
            os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing the descriptor releases the lock
            raise
        self._fd, self._depth = fd, 1

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _flock_within(fd: int, wait: float, folder: Path) -> None:
    """Take the exclusive lock on fd, polling for up to `wait` seconds; MemoryBusy names the folder and the fix."""
    start = time.monotonic()
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if waited >= wait:
            gave_up = "and --wait 0 says not to wait" if wait <= 0 else f"and did not finish within {wait:g} s"
            raise MemoryBusy(f"{folder}: another process{_holder(fd)} is writing this memory ({LOCK} is held) "
                             f"{gave_up}; try again when it has finished, or wait longer with --wait SECONDS")
        if not told and waited >= WAIT_NOTICE:
            print(f"{folder}: another process{_holder(fd)} is writing this memory; waiting up to {wait:g} s "
                  f"for it to finish", file=sys.stderr, flush=True)
            told = True
        time.sleep(min(random.uniform(0.005, 0.03), max(wait - waited, 0.0)))


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().partition("\n")[0].strip()  # the first line: a pid, padded
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _writer_active(folder: Path) -> bool:
    """Whether some process holds the memory's write lock (a shared probe of the lock; creates nothing)."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class _Checksummed:
    """A file seen through FAISS's callback IO, keeping the CRC-32 and size of the bytes that pass."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def _count(self, data: bytes) -> bytes:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return data

    def read(self, n: int) -> bytes:
        return self._count(self.f.read(n))

    def write(self, data: bytes) -> int:
        self.f.write(self._count(data))
        return len(data)


def _short(doc_id: str, limit: int = 80) -> str:
    """An id as messages quote it: whole up to `limit` characters, else its start and its length."""
    return doc_id if len(doc_id) <= limit else f"{doc_id[:limit]}... ({len(doc_id)} characters)"


def _refuse_repeats(ids: Sequence[str]) -> None:
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(f"the documents to add repeat the id {_short(repeated[0])!r}; give each document its own id")


def _check_new_memory(encoder_name: str, dim: int, index: str, kinds: tuple[str, ...] = INDEX_TYPES) -> None:
    """What creating any memory asks of its arguments (kinds: the index types its backend has)."""
    if index in FOLDER_INDEX_TYPES and index not in kinds:
        raise ValueError(f"index type {index!r} is a folder memory's only (its lists in a file beside index.faiss); "
                         f"this memory takes one of {kinds}")
    if index not in kinds:
        raise ValueError(f"index type {index!r} is not one of {kinds}")
    if dim <= 0 or not encoder_name:
        raise ValueError(f"a memory needs an encoder name and a positive dimension (got {encoder_name!r}, {dim})")


def _exists(path: Path) -> MemoryFolderError:
    return MemoryFolderError(f"{path}: a memory already exists here; open it with Memory.open() or pick another folder")


def _corrupt(path: Path, reason: str) -> CorruptStore:
    return CorruptStore(f"{path / STORE}: not a readable memory store ({reason}); restore it from a backup, or "
                        f"delete {path} and build it again with `racm3 memory build DATASET_DIR {path}`")


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
# Every removed row, with the generation that removed it: with rows that only grow, the store's change log, from
# which an index saved (or loaded) at an earlier generation catches up. Kept: ~20 bytes per removed document.
_REMOVED_TABLE = """CREATE TABLE IF NOT EXISTS removed (generation INTEGER NOT NULL, row INTEGER NOT NULL,
    PRIMARY KEY (generation, row)) WITHOUT ROWID"""


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
    """A connection that changes nothing on disk by opening (the store was put in WAL mode when it was created)."""
    conn = sqlite3.connect(str(path), timeout=30)
    _configure(conn)
    return conn


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA synchronous=NORMAL")  # per connection: a commit is durable at the next checkpoint


def _create_store(store: Path, info: list[tuple[str, str]]) -> None:
    """Write an empty store under a temporary name and rename it into place: a store.sqlite, once there, holds
    the schema and the encoder's identity, so a process killed while creating leaves no half store."""
    tmp = store.with_name(store.name + ".tmp")
    for leftover in ("", "-journal", "-wal", "-shm"):
        Path(f"{tmp}{leftover}").unlink(missing_ok=True)
    conn = sqlite3.connect(str(tmp))
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # recorded in the file; a killed writer's half transaction is
        with conn:  # rolled back on the next open, and readers never block the writer
            conn.executescript(_SCHEMA)
            conn.execute(_REMOVED_TABLE)
            conn.executemany("INSERT INTO info(key, value) VALUES (?, ?)", info)
    finally:
        conn.close()  # the last connection checkpoints and removes the -wal file
    _fsync_path(tmp)
    os.replace(tmp, store)


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
