"""Retriever rules on hand-placed vectors: top-k, near-duplicate cut, diversity, multimodal first, exclusion, dropout;
on every memory backend (memory_backends.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from racm3.documents import Document
from racm3.retrieval.encoder import embed_documents, l2_normalize
from racm3.retrieval.memory import EncoderMismatch
from racm3.retrieval.retriever import Retriever, RetrieverConfig, drop_patches, drop_words
from tests.memory_backends import BACKENDS, loads_images

DIM = 4


class FakeEncoder:
    """Texts map to fixed vectors; an image's vector is its mean colour (r, g, b, 0.1), normalised."""

    name = "fake"
    dim = DIM

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.seen: list[str] = []

    def embed_text(self, texts):
        self.seen.extend(texts)
        return l2_normalize(np.stack([self.table.get(t, np.array([0, 0, 0, 1.0])) for t in texts]))

    def embed_image(self, images):
        return l2_normalize(np.stack([np.r_[np.asarray(im, np.float32).mean((0, 1)) / 255, 0.1] for im in images]))

    def embed_documents(self, docs):
        return embed_documents(self, docs)


def vec(*xs: float) -> np.ndarray:
    return l2_normalize(np.array(xs, np.float32))


def img(rgb) -> Image.Image:
    return Image.new("RGB", (16, 16), rgb)


# Documents around the query direction x = (1, 0, 0, 0): cosines chosen by hand.
VECS = {
    "same": vec(1, 0, 0, 0),            # 1.00: the query itself
    "close": vec(1, 0.2, 0, 0),         # 0.98
    "close-twin": vec(1, 0.21, 0, 0),   # 0.98, a near copy of "close"
    "mid": vec(1, 0, 0.6, 0),           # 0.86
    "far": vec(0.3, 0, 1, 0),           # 0.29
    "text-only": vec(1, 0.1, 0, 0),     # 0.995, but holds no image
}


@pytest.fixture(params=BACKENDS)
def memory(tmp_path, memories, request):
    mem = memories.new(request.param, tmp_path, "fake", DIM)
    docs = [Document(i, (f"doc {i}",) if i == "text-only" else (img((10, 20, 30)), f"doc {i}")) for i in VECS]
    mem.add(docs, np.stack([VECS[d.id] for d in docs]))
    return mem


def ids(hits) -> list[str]:
    return [h.id for h in hits]


def test_plain_top_k_by_cosine(memory):
    r = Retriever(memory, FakeEncoder({"q": vec(1, 0, 0, 0)}),
                  RetrieverConfig(k=3, diversity=None, prefer_multimodal=False))
    hits = r.retrieve("q")
    assert ids(hits) == ["same", "text-only", "close"]
    assert [h.rank for h in hits] == [0, 1, 2] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].document.text == "doc same"


def test_max_similarity_skips_near_duplicates_of_the_query(memory):
    r = Retriever(memory, FakeEncoder({"q": vec(1, 0, 0, 0)}),
                  RetrieverConfig(k=2, max_similarity=0.9, diversity=None, prefer_multimodal=False))
    assert ids(r.retrieve("q")) == ["mid", "far"]  # everything above 0.9 is skipped


def test_diversity_skips_a_copy_of_a_picked_document(memory):
    enc = FakeEncoder({"q": vec(1, 0.2, 0, 0)})
    loose = Retriever(memory, enc, RetrieverConfig(k=2, diversity=None))
    strict = Retriever(memory, enc, RetrieverConfig(k=2, diversity=0.95))
    assert ids(loose.retrieve("q")) == ["close-twin", "close"] or ids(loose.retrieve("q")) == ["close", "close-twin"]
    picked = ids(strict.retrieve("q"))
    assert picked[0] in ("close", "close-twin") and picked[1] not in ("close", "close-twin")
    # every pair of picked documents is below the diversity threshold
    v = memory.vectors(picked)
    assert float(v[0] @ v[1]) <= 0.95


def test_multimodal_documents_come_first(memory):
    enc = FakeEncoder({"q": vec(1, 0.1, 0, 0)})
    prefer = Retriever(memory, enc, RetrieverConfig(k=1, diversity=None, prefer_multimodal=True))
    plain = Retriever(memory, enc, RetrieverConfig(k=1, diversity=None, prefer_multimodal=False))
    assert ids(plain.retrieve("q")) == ["text-only"]
    assert ids(prefer.retrieve("q")) != ["text-only"] and prefer.retrieve("q")[0].document.is_multimodal


def test_exclude_ids_and_batch_equals_single(memory):
    enc = FakeEncoder({"a": vec(1, 0, 0, 0), "b": vec(0.3, 0, 1, 0)})
    r = Retriever(memory, enc, RetrieverConfig(k=2, diversity=None, prefer_multimodal=False))
    assert "same" not in ids(r.retrieve("a", exclude_ids={"same"}))
    batch = r.retrieve_batch(["a", "b", img((10, 20, 30))], exclude_ids=[{"same"}, (), ()])
    assert ids(batch[0]) == ids(r.retrieve("a", exclude_ids=["same"]))
    assert ids(batch[1]) == ids(r.retrieve("b")) and ids(batch[1])[0] == "far"
    assert ids(batch[2]) == ids(r.retrieve(img((10, 20, 30))))
    assert r.retrieve("a", k=0) == []


def test_excluding_more_than_the_candidates_fetches_further(memory):
    r = Retriever(memory, FakeEncoder({"q": vec(1, 0, 0, 0)}),
                  RetrieverConfig(k=1, candidates=1, diversity=None, prefer_multimodal=False))
    assert ids(r.retrieve("q", exclude_ids=["same", "text-only", "close", "close-twin", "mid"])) == ["far"]


def test_only_the_picked_documents_are_decoded(memory, monkeypatch):
    """The rules run on the candidates' vectors; the k documents they keep are the only images decoded."""
    M = loads_images(memory)
    decoded = []
    real = M.load_image
    monkeypatch.setattr(M, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    r = Retriever(memory, FakeEncoder({"a": vec(1, 0, 0, 0), "b": vec(0.3, 0, 1, 0)}), RetrieverConfig(k=2))
    hits = r.retrieve_batch(["a", "b"])
    picked = {h.id for hs in hits for h in hs}
    assert [len(h) for h in hits] == [2, 2] and len(decoded) == len(picked)  # of six candidates each, once a batch
    assert all(h.document.image is not None for hs in hits for h in hs)


def test_other_encoder_refused(memory):
    enc = FakeEncoder({})
    enc.name = "other"
    with pytest.raises(EncoderMismatch, match="'fake'.*'other'"):
        Retriever(memory, enc)


def test_query_dropout_words_and_patches():
    rng = random.Random(0)
    words = "one two three four five six seven eight nine ten".split()
    out = drop_words(" ".join(words), 0.2, rng).split()
    assert len(out) == 8 and all(w in words for w in out)
    assert drop_words("pizza", 0.2, rng) == "pizza"  # never drops the only word
    black = Image.new("RGB", (64, 64), (0, 0, 0))
    dropped = np.asarray(drop_patches(black, 0.2, rng))
    assert (dropped == 255).all(axis=2).sum() == round(0.2 * 64) * 64  # 13 whitened 8x8 patches
    assert np.asarray(black).max() == 0  # the query image itself is untouched


def test_retriever_applies_dropout_to_text_queries(memory):
    enc = FakeEncoder({})
    r = Retriever(memory, enc, RetrieverConfig(query_dropout=0.5))
    r.retrieve("a b c d", rng=random.Random(1))
    assert len(enc.seen[-1].split()) == 2
    with pytest.raises(ValueError):
        RetrieverConfig(query_dropout=1.0)
