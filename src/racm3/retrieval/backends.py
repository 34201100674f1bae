"""Which memory backend a location names: a folder is the SQLite + FAISS memory (the default), a milvus: URI the
Milvus one (milvus_memory.py; needs the optional extra `pip install -e ".[milvus]"`).

    runs/memory                          a folder: store.sqlite + index.faiss (retrieval/memory.py)
    milvus:///abs/path/memory.db         Milvus Lite, embedded in this process, its data in that folder
    milvus:memory.db                     the same, relative to the working directory
    milvus://host:19530/collection       a Milvus server or cluster (milvus://user:password@host:19530/collection)
"""

from __future__ import annotations

import os

from racm3.retrieval.memory import DEFAULT_WAIT, Memory, MemoryBase


def is_milvus_uri(location: str | os.PathLike) -> bool:
    return str(location).startswith("milvus:")


def _backend(location: str | os.PathLike):
    if not is_milvus_uri(location):
        return Memory
    from racm3.retrieval.milvus_memory import MilvusMemory  # imports pymilvus: only for a milvus: URI

    return MilvusMemory


def open_memory(location: str | os.PathLike, wait: float = DEFAULT_WAIT) -> MemoryBase:
    """Open the memory at a folder or a milvus: URI, to read it (and to write it)."""
    return _backend(location).open(location, wait=wait)


def open_or_create_memory(location: str | os.PathLike, encoder_name: str, dim: int, index: str = "flat",
                          wait: float = DEFAULT_WAIT) -> MemoryBase:
    """Open the memory at a folder or a milvus: URI, creating it empty (for this encoder) if there is none."""
    return _backend(location).open_or_create(location, encoder_name, dim, index=index, wait=wait)
