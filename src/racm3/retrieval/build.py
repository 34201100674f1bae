"""Building a memory from a data set of any size: streamed in batches, resumable, embedded by several processes,
and split into shards that separate machines build and `racm3 memory merge` joins.

Each batch is one write (one SQLite transaction, or one Milvus insert), so a build killed at any point leaves a
memory holding the batches written before, consistent; the same command run again skips the documents already
in the memory and goes on. An id already in the memory is taken to be that document (what resuming needs): a
build never replaces a document, and `racm3 memory add` is the way to be told of a clash. Memory stays bounded:
at most 2 x workers batches are read ahead, and the ids seen so far are kept (to refuse one given twice: some
100 bytes per document). With workers > 1,
embedding runs in that many processes (each loads the encoder once and uses one torch thread) while this process
reads the next batches and writes the embedded ones in data set order, so rows come out as one process would
write them.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from racm3.documents import Document


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count`: the documents whose id hashes there (a stable hash: any machine agrees)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: give I/N, e.g. 0/4 for the first of four parts") from None
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"--shard {text!r}: N must be >= 1 and I in 0..N-1")
        return cls(i, n)

    def holds(self, doc_id: str) -> bool:
        digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index


@dataclass
class BuildResult:
    added: int = 0
    skipped: int = 0  # already in the memory (a resumed build) or in another shard


def batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


# The worker processes' encoder and precision, set once per process by _init_worker.
_ENCODER, _AUTOCAST = None, None


def _init_worker(encoder_path: str | None, threads: int, precision: str) -> None:
    global _ENCODER, _AUTOCAST
    import torch

    from racm3.retrieval import load_encoder

    torch.set_num_threads(threads)
    _ENCODER = load_encoder(encoder_path)
    _AUTOCAST = _autocast(precision)


def _embed(docs: list[Document]) -> np.ndarray:
    return _embed_with(_ENCODER, docs, _AUTOCAST)


def _autocast(precision: str):
    """The runtime's autocast for the encoders on the CPU: fp32 (the default: vectors as the memory's other
    writers make them) or bf16 (about twice as fast on AVX512-BF16, cosine >= 0.9999 to fp32's vectors)."""
    import torch

    from racm3.runtime import resolve_precision

    return resolve_precision(precision, torch.device("cpu")).autocast


def _embed_with(encoder, docs: list[Document], autocast) -> np.ndarray:
    with autocast():
        return np.asarray(encoder.embed_documents(docs), dtype=np.float32)


def build_memory(memory, docs: Iterable[Document], encoder, batch_size: int = 512, workers: int = 1,
                 encoder_path: str | os.PathLike | None = None, shard: Shard | None = None,
                 progress: Callable[[int], None] | None = None, precision: str = "fp32") -> BuildResult:
    """Add every document of `docs` (an iterator: read as it goes) not yet in `memory`, batch by batch.

    encoder embeds in this process (workers=1); with workers > 1, encoder_path is what each worker loads (it
    must be the same encoder). precision: "fp32" or "bf16" (_autocast). A document id given twice in `docs` is
    refused (KeyError) before its second batch is written; progress(n) is called with the documents each batch
    handled, written or skipped.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")
    memory.require_encoder(encoder.name)
    autocast = _autocast(precision)  # a bad --precision fails here, before anything is read
    result, seen = BuildResult(), set()

    def new_in(chunk: list[Document]) -> list[Document]:
        mine = [d for d in chunk if shard is None or shard.holds(d.id)]
        repeated = [d.id for d in mine if d.id in seen]
        if repeated or len({d.id for d in mine}) < len(mine):
            raise _Repeated(repeated[0] if repeated else _first_repeat(mine))
        seen.update(d.id for d in mine)
        present = set(memory.present([d.id for d in mine]))
        result.skipped += len(chunk) - len(mine) + len(present)
        return [d for d in mine if d.id not in present]

    def write(chunk: list[Document], vecs: np.ndarray, handled: int) -> None:
        if chunk:
            memory.add(chunk, vecs)
            result.added += len(chunk)
        if progress is not None:
            progress(handled)

    if workers == 1:
        try:
            for chunk in batches(docs, batch_size):
                todo = new_in(chunk)
                write(todo, _embed_with(encoder, todo, autocast) if todo else None, len(chunk))
        except _Repeated as repeat:
            raise repeat.error(result.added) from None
        return result
    import multiprocessing

    path = None if encoder_path is None else str(encoder_path)
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: torch and FAISS hold threads a forked child would inherit broken
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(path, threads, precision)) as pool:
        pending: deque[tuple[list[Document], int, Future | None]] = deque()
        repeat = None
        try:
            for chunk in batches(docs, batch_size):
                todo = new_in(chunk)
                pending.append((todo, len(chunk), pool.submit(_embed, todo) if todo else None))
                while len(pending) >= 2 * workers:  # bounded read-ahead: constant memory
                    _write_next(pending, write)
        except _Repeated as found:
            repeat = found
        finally:  # a bad record or a repeated id later on: what was read before it is still written, in order
            while pending:
                _write_next(pending, write)
    if repeat is not None:
        raise repeat.error(result.added) from None
    return result


class _Repeated(Exception):
    def __init__(self, doc_id: str) -> None:
        super().__init__(doc_id)
        self.doc_id = doc_id

    def error(self, written: int) -> KeyError:
        return KeyError(f"document id {self.doc_id!r} appears twice in the data set (ids must be unique); the "
                        f"{written} documents before its batch are in the memory: fix the data set and run the "
                        "same build again to go on")


def _write_next(pending: deque, write: Callable) -> None:
    todo, handled, future = pending.popleft()
    write(todo, future.result() if future is not None else None, handled)


def _first_repeat(docs: Sequence[Document]) -> str:
    ids = set()
    for d in docs:
        if d.id in ids:
            return d.id
        ids.add(d.id)
    return ""


def merge_memories(out, parts: Sequence, batch_size: int = 512,
                   progress: Callable[[int], None] | None = None) -> BuildResult:
    """Copy every document of each part memory (with its stored vector: nothing is embedded again) into `out`,
    batch by batch, skipping ids `out` already holds (a resumed merge); every part must share out's encoder."""
    result = BuildResult()
    for part in parts:
        out.require_encoder(part.encoder_name)
        if part.dim != out.dim:
            raise ValueError(f"{part.path}: vectors of dimension {part.dim}, {out.path} holds {out.dim}")
    for part in parts:
        for ids in batches(part.ids(), batch_size):
            present = set(out.present(ids))
            todo = [i for i in ids if i not in present]
            result.skipped += len(present)
            if todo:
                out.add(part.get(todo), part.vectors(todo))
                result.added += len(todo)
            if progress is not None:
                progress(len(ids))
    return result
