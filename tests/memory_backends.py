"""The memory backends that the shared memory tests run on: the folder memory (SQLite + FAISS) always, Milvus Lite
when pymilvus and milvus-lite are installed (the optional extra [milvus]; otherwise those cases skip)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from racm3.retrieval.backends import open_memory
from racm3.retrieval.memory import Memory

HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
MILVUS = pytest.param("milvus", marks=pytest.mark.skipif(
    not HAVE_MILVUS, reason='needs pymilvus and milvus-lite: pip install -e ".[milvus]"'))
BACKENDS = ["folder", MILVUS]
LITE_INDEXES = ("flat", "hnsw")  # Milvus Lite has no IVF-PQ index (a Milvus server has; ivf-ondisk is a folder's)


def backends_and_indexes(indexes=("flat", "hnsw", "ivfpq", "ivf-ondisk")) -> list:
    """(backend, index) cases: every index on the folder memory, those Milvus Lite has on it."""
    cases = [("folder", i) for i in indexes]
    return cases + [pytest.param("milvus", i, marks=MILVUS.marks) for i in indexes if i in LITE_INDEXES]


def location(backend: str, tmp_path, name: str = "m") -> str:
    return str(tmp_path / name) if backend == "folder" else f"milvus://{tmp_path / name}.db"


def memory_class(backend: str):
    if backend == "folder":
        return Memory
    from racm3.retrieval.milvus_memory import MilvusMemory

    return MilvusMemory


def loads_images(memory):
    """The module whose load_image decodes this memory's images (for tests that count decodes)."""
    return sys.modules[type(memory).__module__]


@pytest.fixture()
def memories():
    """new(backend, tmp_path, encoder, dim, index) creates a memory, reopen(memory) opens another handle on it;
    every one is closed after the test, so each Milvus Lite server stops with the test that started it."""
    opened = []

    class Factory:
        @staticmethod
        def new(backend, tmp_path, encoder="enc-a", dim=8, index="flat", name="m"):
            opened.append(memory_class(backend).create(location(backend, tmp_path, name), encoder, dim, index=index))
            return opened[-1]

        @staticmethod
        def reopen(memory, wait=None):
            opened.append(open_memory(memory.path, **({} if wait is None else {"wait": wait})))
            return opened[-1]

    yield Factory
    for memory in reversed(opened):
        memory.close()


def write_cli_set(root) -> tuple:
    """(encoder folder, dataset folder) under root: an untrained 16-px emoji tower and five one-colour captioned
    documents, what the memory CLI tests build memories of."""
    from PIL import Image

    from racm3.documents import Document, write_jsonl_dataset
    from racm3.retrieval.encoder import EmojiEncoder, ImageTowerConfig

    EmojiEncoder.untrained(ImageTowerConfig(image_size=16, widths=(8, 16))).save_pretrained(root / "enc")
    captions = ["flag: France", "pizza", "thumbs up", "red apple", "sun with face"]
    docs = [Document(f"e{i}", (Image.new("RGB", (16, 16), (40 * i, 80, 200)), c), {"split": "train"})
            for i, c in enumerate(captions)]
    write_jsonl_dataset(docs, root / "data")
    return root / "enc", root / "data"
