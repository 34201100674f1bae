"""The work behind the HTTP API: the model and memory loaded once, jobs run in bounded pools with a timeout.

A Memory holds one SQLite connection, which Python lets only its own thread use, so each worker thread opens its
own Memory of the same folder: writes go through Memory's own write path (the OS lock on write.lock), and every
reader's next search sees a committed write (Memory.search reloads the index when the store's generation moved).
The encoder is shared and called under one lock (a Hugging Face fast tokenizer must not be used by two threads).
"""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from racm3.retrieval.memory import Hit, Memory
from racm3.serving.limits import BoundedPool, Limits


class RequestTimeout(Exception):
    """A job did not finish within the server's timeout (a queued one was cancelled, a running one finishes alone)."""


class LockedEncoder:
    """An encoder whose embedding calls take one lock; everything else (name, dim, to) passes through."""

    def __init__(self, encoder):
        self._encoder = encoder
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def embed_text(self, texts):
        with self._lock:
            return self._encoder.embed_text(texts)

    def embed_image(self, images):
        with self._lock:
            return self._encoder.embed_image(images)

    def embed_documents(self, docs):
        with self._lock:
            return self._encoder.embed_documents(docs)


class OutputStore:
    """The last `size` generated PNGs by name, in RAM (served under /v1/outputs/NAME.png); older ones are dropped."""

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        name = uuid.uuid4().hex
        with self._lock:
            self._items[name] = png
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            return self._items.get(name)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def document_url(doc_id: str) -> str:
    return f"/v1/documents/{quote(doc_id, safe='')}"


def document_json(doc, score: float | None = None, rank: int | None = None) -> dict:
    """A document as the API shows it: id, caption, the URL of its first image (None without one)."""
    out = {"id": doc.id, "text": doc.text,
           "image_url": f"{document_url(doc.id)}/image" if doc.image is not None else None}
    if rank is not None:
        out = {**out, "score": None if score is None else round(float(score), 4), "rank": rank}
    return out


def hit_json(hit: Hit) -> dict:
    return document_json(hit.document, hit.score, hit.rank)


class Engine:
    """A model, a memory folder, two bounded pools (generations; reads and writes), one Memory per worker thread."""

    def __init__(self, model, memory_path: str | Path, limits: Limits | None = None, token: str | None = None):
        self.limits = limits or Limits()
        self.memory_path = Path(memory_path)
        if not isinstance(model.encoder, LockedEncoder):
            model.encoder = LockedEncoder(model.encoder)
        self.model = model
        self.token = token or None
        with Memory.open(self.memory_path, wait=self.limits.write_wait_s) as memory:  # fail now, not per request
            memory.require_encoder(model.encoder.name)
        self.reads = BoundedPool("read", self.limits.read_workers, self.limits.read_queue)
        self.generations = BoundedPool("generation", self.limits.generation_workers, self.limits.generation_queue)
        self.outputs = OutputStore()
        self._local = threading.local()
        self._opened: list[Memory] = []
        self._opened_lock = threading.Lock()

    def memory(self) -> Memory:
        """This thread's Memory of the folder (opened on first use)."""
        memory = getattr(self._local, "memory", None)
        if memory is None:
            memory = self._local.memory = Memory.open(self.memory_path, wait=self.limits.write_wait_s)
            with self._opened_lock:
                self._opened.append(memory)
        return memory

    async def read(self, fn: Callable, *args):
        """fn(memory, *args) in the read pool (searches, documents, writes)."""
        return await self._run(self.reads, fn, args)

    async def generate(self, fn: Callable, *args):
        """fn(memory, *args) in the generation pool."""
        return await self._run(self.generations, fn, args)

    async def _run(self, pool: BoundedPool, fn: Callable, args: tuple):
        fut = pool.submit(lambda: fn(self.memory(), *args))  # QueueFull when the pool is full
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.limits.timeout_s)
        except TimeoutError:
            fut.cancel()  # a job that has not started never runs
            raise RequestTimeout(f"the {pool.what} did not finish within the server's {self.limits.timeout_s:g} s "
                                 f"timeout; try fewer samples, or restart with a longer --timeout") from None

    def close(self) -> None:
        self.reads.shutdown()
        self.generations.shutdown()
        with self._opened_lock:
            for memory in self._opened:
                try:
                    memory.close()
                except Exception:  # noqa: BLE001 - a connection of another thread: the process ends anyway
                    pass
            self._opened.clear()
