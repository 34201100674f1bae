"""The retrieval memory in Milvus (pymilvus): Memory's interface (memory.MemoryBase) over one Milvus collection.

`racm3 memory build DATA milvus://host:19530/collection` fills a Milvus server or cluster, and the same command
with `milvus:///path/to/memory.db` fills Milvus Lite, embedded in this process (what the tests use). backends.py
picks the backend from the location; the folder memory (SQLite + FAISS) stays the default.

Where the documents live: in the collection, beside their vectors; there is no SQLite store. A milvus: URI is then
the whole memory, readable from any machine that reaches the server, and a write changes one system, so a crash
leaves no second copy to bring back in step. (A store beside the collection would keep SQLite as the source of
truth, but on one machine: every reader elsewhere would need its file, and a write killed between the two systems
would leave the collection to be repaired from the store, which readers, who never write, cannot do.)

One entity per document: row (the primary key, given by racm3 and never reused), doc_id, vector, multimodal,
segments and meta (JSON text, as in the store), images (PNG in base64, in chunks of one VARCHAR each). The
collection's properties hold the encoder, dimension and index type, checked as the store's are, and the commit.

Writes, each all or nothing:
- add: the documents are inserted above the committed row (the property racm3.rows_through), in requests of at most
  BATCH_BYTES, then committed by raising rows_through in one change of the properties. Every read filters on
  row <= rows_through, so a killed add's entities are never seen; the next write deletes them.
- remove: one delete request; update: one upsert request (the rows kept). Milvus Lite writes a request as one WAL
  record, kept through a SIGKILL (tested); on a server the collection has one shard, so a request goes to one log
  (not tested here: no server).

One writer at a time: within a process, a lock per memory (`wait` seconds, then MemoryBusy). Across processes,
Milvus Lite lets one process open its folder at a time (another gets MemoryBusy); a Milvus server does not lock
for racm3: there, run one writer at a time (one `racm3 memory build` or `add`), readers as many as you like.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import unquote, urlparse

import numpy as np

from racm3.documents import Document, image_to_png, load_image
from racm3.retrieval.memory import (DEFAULT_WAIT, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NPROBE,
                                    Candidates, EncoderMismatch, MemoryBase, MemoryBusy, MemoryFolderError,
                                    _check_new_memory, _short)

FORMAT = "racm3-memory-1"  # the property that says a collection is a racm3 memory, and in which layout
LITE_COLLECTION = "racm3_memory"  # a Milvus Lite folder holds one memory
MAX_VARCHAR = 65535  # Milvus's longest VARCHAR, in bytes
CHUNK = 65532  # base64 characters of an image per VARCHAR: a multiple of 4, so chunks join without padding
MAX_CHUNKS = 4096  # Milvus's largest ARRAY: images of up to ~190 MB of PNG per document
BATCH_BYTES = 16 << 20  # one insert request at most: well under a Milvus server's 64 MB gRPC message
PAGE = 10_000  # rows per query when reading every document: Milvus returns at most 16,384 entities a query
MAX_TOPK = 16_384  # Milvus's largest search limit
IVF_NLIST = 1024  # Milvus builds an IVF index per sealed segment (~1 GB of vectors): lists sized for a segment
PAYLOAD = ["row", "doc_id", "segments", "meta", "images"]

_registry = threading.Lock()
_lite_users: Counter = Counter()  # this process's Milvus Lite servers by folder: stopped when their last user closes
_write_locks: dict[str, threading.Lock] = {}


@dataclass(frozen=True)
class MilvusTarget:
    """A parsed milvus: URI. name: what messages say (never a password); server: what pymilvus connects to."""

    name: str
    server: str
    collection: str
    lite: bool
    token: str = ""


def parse_uri(uri: str | os.PathLike) -> MilvusTarget:
    """milvus:///abs/path.db or milvus:rel/path.db (Milvus Lite), milvus://[user:password@]host[:port]/collection."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme != "milvus":
        raise MemoryFolderError(f"{text}: not a milvus: URI")
    if not parsed.netloc:
        if not parsed.path.endswith(".db"):  # pymilvus starts Milvus Lite only for a path ending in .db
            raise MemoryFolderError(f"{text}: a Milvus Lite memory is a path ending in .db (milvus:///path/to/"
                                    f"memory.db); a Milvus server is milvus://host:19530/collection")
        path = os.path.abspath(parsed.path)
        return MilvusTarget(f"milvus://{path}", path, LITE_COLLECTION, lite=True)
    collection = parsed.path.strip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection):
        raise MemoryFolderError(f"{text}: name the collection after the server, milvus://host:19530/COLLECTION "
                                f"(letters, digits and underscores, not starting with a digit)")
    host = f"{parsed.hostname}:{parsed.port or 19530}"
    token = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}" if parsed.username else ""
    return MilvusTarget(f"milvus://{host}/{collection}", f"http://{host}", collection, lite=False, token=token)


class MilvusMemory(MemoryBase):
    """A racm3 memory in one Milvus collection; opened and created like Memory, from a milvus: URI."""

    def __init__(self, target: MilvusTarget, client, properties: dict, wait: float = DEFAULT_WAIT):
        self.path = target.name  # what messages name, as a folder memory's path
        self._target, self._client, self.collection = target, client, target.collection
        self.encoder_name = properties["racm3.encoder"]
        self.dim = int(properties["racm3.dim"])
        self.index_type = properties["racm3.index"]
        self.wait = wait
        self._lock = _ProcessLock(target.name)

    # -- creation and opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, uri: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat",
               wait: float = DEFAULT_WAIT) -> "MilvusMemory":
        _check_new_memory(encoder_name, dim, index)
        target = parse_uri(uri)
        if index == "ivfpq" and (target.lite or dim % 8):
            raise ValueError(f"{target.name}: an ivfpq index needs a Milvus server (Milvus Lite has none) and a "
                             f"dimension divisible by 8 (got {dim}); use --index flat or hnsw")
        if target.lite:
            Path(target.server).parent.mkdir(parents=True, exist_ok=True)
        client = _connect(target)
        try:
            if client.has_collection(target.collection):
                raise MemoryFolderError(f"{target.name}: a memory already exists here; open it, or pick another "
                                        f"{'path' if target.lite else 'collection'}")
            properties = {"racm3.encoder": encoder_name, "racm3.dim": str(dim), "racm3.index": index,
                          "racm3.generation": "0", "racm3.rows_through": "0"}
            client.create_collection(target.collection, schema=_schema(dim), num_shards=1,
                                     consistency_level="Strong", properties=properties)
            # sync=False: an empty collection's index is only its definition (pymilvus would poll 0.5 s per field)
            client.create_index(target.collection, _index_params(client, index), sync=False)
            client.load_collection(target.collection)
            # the format last: a collection whose creation was killed is never taken for a memory
            client.alter_collection_properties(target.collection, properties={"racm3.format": FORMAT})
        except BaseException:
            _disconnect(target, client)
            raise
        return cls(target, client, {**properties, "racm3.format": FORMAT}, wait)

    @classmethod
    def open(cls, uri: str | os.PathLike, wait: float = DEFAULT_WAIT) -> "MilvusMemory":
        """Open a memory to read it (and to write it: writes take the lock themselves). racm3 changes nothing by
        opening (Milvus Lite keeps its own lock and files in its folder)."""
        target = parse_uri(uri)
        if target.lite and not Path(target.server).exists():  # connecting would create the folder
            raise _NoMemory(target)
        client = _connect(target)
        try:
            if not client.has_collection(target.collection):
                raise _NoMemory(target)
            properties = client.describe_collection(target.collection).get("properties", {})
            if properties.get("racm3.format") != FORMAT:
                raise MemoryFolderError(f"{target.name}: the collection {target.collection!r} is not a racm3 memory "
                                        f"(no racm3.format property: made by something else, or its creation was "
                                        f"killed); pick another, or drop it (Milvus Lite: delete the folder)")
            client.load_collection(target.collection)
        except BaseException:
            _disconnect(target, client)
            raise
        return cls(target, client, properties, wait)

    @classmethod
    def open_or_create(cls, uri: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat",
                       wait: float = DEFAULT_WAIT) -> "MilvusMemory":
        try:
            mem = cls.open(uri, wait)
        except _NoMemory:
            return cls.create(uri, encoder_name, dim, index, wait)
        try:
            mem.require_encoder(encoder_name)
        except EncoderMismatch:
            mem.close()  # not handed back: its Milvus Lite server stops here
            raise
        return mem

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            _disconnect(self._target, client)

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._query(f"row <= {self._state()[1]}", ["count(*)"])[0]["count(*)"])

    def __contains__(self, doc_id: str) -> bool:
        return bool(self.present([doc_id]))

    def ids(self) -> list[str]:
        return [e["doc_id"] for e in self._every(["doc_id"])]

    @property
    def generation(self) -> int:
        return self._state()[0]

    def get(self, ids: Sequence[str]) -> list[Document]:
        """Documents by id, in the order asked; an unknown id raises KeyError naming it."""
        found = self._by_id(ids, PAYLOAD)
        return [self._document(found[i]) for i in ids]

    def documents(self, rows: Sequence[int]) -> dict[int, Document]:
        """The documents at these rows (as Candidates name them), decoded, by row; a removed row is absent."""
        wanted = sorted(set(int(r) for r in rows))
        through = self._state()[1]
        out = {}
        for s in range(0, len(wanted), 500):
            rows_in = ",".join(map(str, wanted[s:s + 500]))
            out.update({e["row"]: self._document(e) for e in self._query(f"row in [{rows_in}] and row <= {through}",
                                                                         PAYLOAD)})
        return out

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings (n, dim) of the given ids, in order."""
        found = self._by_id(ids, ["vector"])
        return np.array([found[i]["vector"] for i in ids], np.float32).reshape(len(ids), self.dim)

    def scan(self) -> tuple[list[str], list[dict], np.ndarray]:
        """Every document's id, meta (with its joined text under "_text") and vector (n, dim), images not decoded."""
        ids, metas, vecs = [], [], []
        for e in self._every(["doc_id", "segments", "meta", "vector"]):
            texts = [seg["text"] for seg in json.loads(e["segments"]) if "text" in seg]
            ids.append(e["doc_id"])
            metas.append({**json.loads(e["meta"]), "_text": " ".join(texts) if texts else None})
            vecs.append(e["vector"])
        return ids, metas, np.array(vecs, np.float32).reshape(len(ids), self.dim)

    def candidates(self, queries: np.ndarray, k: int, exclude_ids: Sequence[Iterable[str]] | None = None,
                   encoder_name: str | None = None) -> list[Candidates]:
        """Each query row's k nearest documents, leaving out its exclude_ids, before any is decoded: one search
        that returns ids, vectors and modality (no payload); scores are exact cosines from those vectors."""
        queries, excludes = self._query_args(queries, exclude_ids, encoder_name)
        through = self._state()[1]
        fetch = min(k + max((len(e) for e in excludes), default=0), MAX_TOPK)
        if k <= 0 or through == 0:
            return [_no_candidates(self.dim) for _ in queries]
        found = self._client.search(self.collection, data=[q.tolist() for q in queries], limit=fetch,
                                    filter=f"row <= {through}", output_fields=["doc_id", "vector", "multimodal"],
                                    search_params=self._search_params(fetch))
        out = []
        for q, hits, exclude in zip(queries, found, excludes):
            kept = [h for h in hits if h["entity"]["doc_id"] not in exclude]
            vectors = np.array([h["entity"]["vector"] for h in kept], np.float32).reshape(len(kept), self.dim)
            scores = vectors @ q
            order = np.argsort(-scores, kind="stable")[:k]
            out.append(Candidates([kept[i]["entity"]["doc_id"] for i in order], [int(kept[i]["row"]) for i in order],
                                  scores[order], vectors[order],
                                  np.array([bool(kept[i]["entity"]["multimodal"]) for i in order], bool)))
        return out

    # -- writing (each under the write lock) ----------------------------------------------------

    def add(self, docs: Sequence[Document], embeddings: np.ndarray) -> None:
        """Add documents with their embeddings (n, dim); an id already present raises and nothing is added."""
        emb = self._check_additions(docs, embeddings)
        if not docs:
            return
        ids = [d.id for d in docs]
        with self._writing() as (generation, through):
            self._refuse_present(ids)
            batch, size = [], 0
            for row, doc, vec in zip(range(through + 1, through + 1 + len(docs)), docs, emb):
                batch.append(_entity(row, doc, vec))
                size += _entity_bytes(batch[-1])
                if size >= BATCH_BYTES:
                    self._client.insert(self.collection, batch)
                    batch, size = [], 0
            if batch:
                self._client.insert(self.collection, batch)
            self._commit(generation, through + len(docs))

    def remove(self, ids: Iterable[str]) -> None:
        """Remove documents; an unknown id raises KeyError naming it and removes nothing."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return
        with self._writing() as (generation, through):
            rows = [e["row"] for e in self._by_id(ids, ["row"]).values()]
            self._client.delete(self.collection, filter=f"row in [{','.join(map(str, rows))}]")
            self._commit(generation, through)

    def update(self, docs: Sequence[Document], embeddings: np.ndarray) -> None:
        """Replace documents that exist (same ids) with new content and embeddings, in one upsert request."""
        emb = self._check_embeddings(docs, embeddings)
        with self._writing() as (generation, through):
            found = self._by_id([d.id for d in docs], ["row"])
            self._client.upsert(self.collection, [_entity(found[d.id]["row"], d, v) for d, v in zip(docs, emb)])
            self._commit(generation, through)

    # -- internals --------------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[tuple[int, int]]:
        """Hold the write lock for a whole write, giving the committed (generation, rows_through); first delete
        what a killed add left above the committed row (never seen, and its rows are about to be given again)."""
        self._lock.acquire(self.wait)
        try:
            generation, through = self._state()
            self._client.delete(self.collection, filter=f"row > {through}")
            yield generation, through
        finally:
            self._lock.release()

    def _commit(self, generation: int, rows_through: int) -> None:
        """The write's commit: one change of the collection's properties."""
        self._client.alter_collection_properties(self.collection, properties={
            "racm3.generation": str(generation + 1), "racm3.rows_through": str(rows_through)})

    def _state(self) -> tuple[int, int]:
        """(generation, rows_through) as last committed, read from the collection on every call: other writers'."""
        properties = self._client.describe_collection(self.collection)["properties"]
        return int(properties["racm3.generation"]), int(properties["racm3.rows_through"])

    def _query(self, expression: str, fields: list[str]) -> list[dict]:
        return list(self._client.query(self.collection, filter=expression, output_fields=fields))

    def _every(self, fields: list[str]) -> Iterator[dict]:
        """Every committed entity, in row order, PAGE rows per query."""
        through = self._state()[1]
        for low in range(0, through, PAGE):
            yield from sorted(self._query(f"row > {low} and row <= {min(low + PAGE, through)}", ["row", *fields]),
                              key=lambda e: e["row"])

    def _by_id(self, ids: Sequence[str], fields: list[str], strict: bool = True) -> dict[str, dict]:
        """id -> entity (these fields and row) for the committed documents among ids; strict: an unknown id raises
        KeyError naming it."""
        through = self._state()[1]
        found: dict[str, dict] = {}
        for s in range(0, len(ids), 500):
            quoted = ",".join(_quote(i) for i in ids[s:s + 500])
            found.update({e["doc_id"]: e for e in self._query(f"doc_id in [{quoted}] and row <= {through}",
                                                               ["row", "doc_id", *fields])})
        missing = [i for i in ids if i not in found]
        if strict and missing:
            raise KeyError(f"{self.path}: no document with id {_short(missing[0])!r} in the memory"
                           + (f" ({len(missing)} unknown ids)" if len(missing) > 1 else ""))
        return found

    def present(self, ids: Sequence[str]) -> list[str]:
        found = self._by_id(ids, [], strict=False)
        return [i for i in ids if i in found]

    def _document(self, entity: dict) -> Document:
        segments = []
        for seg in json.loads(entity["segments"]):
            if "text" in seg:
                segments.append(seg["text"])
            else:
                first, end = seg["image"]
                png = base64.b64decode("".join(entity["images"][first:end]))
                segments.append(load_image(png, name=f"{self.path}: {_short(entity['doc_id'])}"))
        return Document(entity["doc_id"], tuple(segments), json.loads(entity["meta"]))

    def _search_params(self, fetch: int) -> dict:
        if self.index_type == "hnsw":  # Milvus wants ef >= the number of results
            return {"metric_type": "IP", "params": {"ef": max(HNSW_EF_SEARCH, fetch)}}
        if self.index_type == "ivfpq":
            return {"metric_type": "IP", "params": {"nprobe": IVF_NPROBE}}
        return {"metric_type": "IP"}


class _NoMemory(MemoryFolderError):
    def __init__(self, target: MilvusTarget):
        super().__init__(f"{target.name}: no memory here; build one with `racm3 memory build DATASET_DIR "
                         f"{target.name}`")


class _ProcessLock:
    """The write lock of one memory within this process (a thread lock per URI), re-entrant per MilvusMemory, with
    memory._WriteLock's interface. Milvus Lite's own folder lock keeps other processes out."""

    def __init__(self, key: str):
        with _registry:
            self._lock = _write_locks.setdefault(key, threading.Lock())
        self.key, self._depth = key, 0

    held = property(lambda self: self._depth > 0)

    def acquire(self, wait: float) -> None:
        if not self._depth and not self._lock.acquire(timeout=max(wait, 0)):
            gave_up = "and --wait 0 says not to wait" if wait <= 0 else f"and did not finish within {wait:g} s"
            raise MemoryBusy(f"{self.key}: another thread of this process is writing this memory {gave_up}; "
                             f"try again when it has finished, or wait longer with --wait SECONDS")
        self._depth += 1

    def release(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._lock.release()


def _connect(target: MilvusTarget):
    """A MilvusClient for the target; for Milvus Lite, the first in this process starts its server (in a thread)."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        if target.lite:
            import milvus_lite  # noqa: F401
    except ImportError as exc:
        raise MemoryFolderError(f"{target.name}: a milvus: memory needs {exc.name} (the optional extra: "
                                f"pip install -e \".[milvus]\"); a memory folder needs nothing more") from None

    if not target.lite:
        try:
            return MilvusClient(uri=target.server, token=target.token)
        except MilvusException as exc:
            raise MemoryFolderError(f"{target.name}: cannot reach a Milvus server there ({exc.message}); start it, "
                                    f"or check the host, the port and the user") from None
    with _registry:
        if not _lite_users[target.server]:
            _refuse_if_lite_busy(target)
        try:
            client = MilvusClient(target.server)
        except MilvusException:
            _refuse_if_lite_busy(target)  # lost the race for its lock to another process
            raise
        _lite_users[target.server] += 1
    return client


def _refuse_if_lite_busy(target: MilvusTarget) -> None:
    """MemoryBusy when another process holds the Milvus Lite folder's lock (it serves one process at a time)."""
    try:
        fd = os.open(Path(target.server) / "LOCK", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe: released when fd closes below
    except BlockingIOError:
        raise MemoryBusy(f"{target.name}: another process has this Milvus Lite memory open (Milvus Lite serves one "
                         f"process at a time); try again when it has finished, or put the memory on a Milvus "
                         f"server (milvus://host:19530/collection) for several processes") from None
    finally:
        os.close(fd)


def _disconnect(target: MilvusTarget, client) -> None:
    client.close()
    if target.lite:
        with _registry:
            _lite_users[target.server] -= 1
            if _lite_users[target.server] > 0:
                return
            del _lite_users[target.server]
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(target.server)  # its threads end and its folder lock is released


def _schema(dim: int):
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("multimodal", DataType.BOOL)  # holds text and an image: the multimodal-first rule
    schema.add_field("segments", DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field("meta", DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field("images", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_CHUNKS,
                     max_length=MAX_VARCHAR)
    return schema


def _index_params(client, index: str):
    """The vector index for the memory's index type (as the folder memory's), and doc_id's for lookups by id."""
    params = client.prepare_index_params()
    kind, build = {"flat": ("FLAT", {}), "hnsw": ("HNSW", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}),
                   "ivfpq": ("IVF_PQ", {"nlist": IVF_NLIST, "nbits": 8})}[index]
    params.add_index("vector", index_type=kind, metric_type="IP", params=build)
    params.add_index("doc_id", index_type="INVERTED")
    return params


def _entity(row: int, doc: Document, vec: np.ndarray) -> dict:
    """The document as one entity; a field longer than Milvus holds raises ValueError naming the document."""
    segs, chunks = [], []
    for seg in doc.segments:
        if isinstance(seg, str):
            segs.append({"text": seg})
        else:
            encoded = base64.b64encode(image_to_png(seg)).decode("ascii")
            first = len(chunks)
            chunks += [encoded[i:i + CHUNK] for i in range(0, len(encoded), CHUNK)]
            segs.append({"image": [first, len(chunks)]})
    entity = {"row": row, "doc_id": doc.id, "vector": vec.tolist(), "multimodal": doc.is_multimodal,
              "segments": json.dumps(segs, ensure_ascii=False),
              "meta": json.dumps(doc.meta, ensure_ascii=False, default=str), "images": chunks}
    for field in ("doc_id", "segments", "meta"):
        size = len(entity[field].encode())
        if size > MAX_VARCHAR:
            raise ValueError(f"document {_short(doc.id)!r}: its {field} takes {size:,} bytes, more than a Milvus "
                             f"field holds ({MAX_VARCHAR:,}); shorten it, or use a folder memory")
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"document {_short(doc.id)!r}: its images take more than a Milvus memory holds "
                         f"({MAX_CHUNKS} chunks of {CHUNK:,} base64 characters); make them smaller")
    return entity


def _entity_bytes(entity: dict) -> int:
    return 4 * len(entity["vector"]) + sum(len(entity[f]) for f in ("doc_id", "segments", "meta")) \
        + sum(map(len, entity["images"]))


def _quote(text: str) -> str:
    """A string literal for a Milvus filter expression (pymilvus' own get/delete by id do not escape)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _no_candidates(dim: int) -> Candidates:
    return Candidates([], [], np.zeros(0, np.float32), np.zeros((0, dim), np.float32), np.zeros(0, bool))
