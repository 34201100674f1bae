"""Retrieval quality: recall@k through a memory, pure cross-modal recall@k, and cross-style recall (numpy over (D, I))."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from racm3.documents import Document
from racm3.evaluation.recall import recall_from_ranks
from racm3.retrieval.encoder import Encoder
from racm3.retrieval.memory import Memory

KS = (1, 5, 10)


def _first_hit(rows: np.ndarray, ok) -> int | None:
    for rank, r in enumerate(rows):
        if r >= 0 and ok(int(r)):
            return rank
    return None


def memory_recall(memory: Memory, encoder: Encoder, docs: Sequence[Document], ks: Sequence[int] = KS) -> dict:
    """Through the memory: a caption must find a document with that caption; an image must find its own document."""
    memory.require_encoder(encoder.name)
    kmax = max(ks)
    docs_t = [d for d in docs if d.text is not None]
    docs_i = [d for d in docs if d.image is not None]
    out = {}
    if docs_t:
        hits = memory.search(encoder.embed_text([d.text for d in docs_t]), kmax)
        ranks = [next((h.rank for h in hs if h.document.text == d.text), None) for d, hs in zip(docs_t, hits)]
        out["text_to_image"] = recall_from_ranks(ranks, ks)
    if docs_i:
        hits = memory.search(encoder.embed_image([d.image for d in docs_i]), kmax)
        ranks = [next((h.rank for h in hs if h.id == d.id), None) for d, hs in zip(docs_i, hits)]
        out["image_to_text"] = recall_from_ranks(ranks, ks)
        # Some emoji share a pixel-identical drawing (a flag and its territory's): no image query can tell
        # them apart, so also count a hit whose image equals the query's.
        same = [next((h.rank for h in hs if h.id == d.id or _same_pixels(h.document.image, d.image)), None)
                for d, hs in zip(docs_i, hits)]
        out["image_to_text_identical_images_equal"] = recall_from_ranks(same, ks)
        out["image_to_text_ceiling_recall@1"] = distinct_picture_share([d.image for d in docs_i])
    return out


def distinct_picture_share(images: Sequence) -> float | None:
    """The best image -> own document recall@1 any encoder can reach: pixel-identical drawings give one query, so
    at most one of each such group can come first. (Drawings that differ only by rasterisation noise are not
    merged: a tower can, and the instance-trained ones partly do, tell them apart.)"""
    if not images:
        return None
    return len({_pixels(im) for im in images}) / len(images)


def _pixels(image) -> tuple:
    """What makes two drawings pixel-identical: size, mode and raw bytes (hashable)."""
    return image.size, image.mode, image.tobytes()


def _same_pixels(a, b) -> bool:
    return a is not None and b is not None and _pixels(a) == _pixels(b)


def cross_modal_recall(encoder: Encoder, docs: Sequence[Document], ks: Sequence[int] = KS) -> dict:
    """Without a memory: captions against the documents' images alone, and images against the captions alone.

    text->image: each distinct caption ranks all images; correct if an image of that caption is in the top k.
    image->text: each image ranks all distinct captions; correct if its own caption is in the top k.
    """
    docs = [d for d in docs if d.text is not None and d.image is not None]
    if not docs:
        return {}
    captions = sorted({d.text for d in docs})
    cap_idx = {c: i for i, c in enumerate(captions)}
    doc_cap = np.array([cap_idx[d.text] for d in docs])
    t = encoder.embed_text(captions)  # (C, D)
    im = encoder.embed_image([d.image for d in docs])  # (N, D)
    sims = t @ im.T  # (C, N)
    kmax = max(ks)
    top_i = np.argsort(-sims, axis=1)[:, :kmax]  # (C, kmax) image indices
    t2i = [_first_hit(row, lambda j, c=c: doc_cap[j] == c) for c, row in enumerate(top_i)]
    top_t = np.argsort(-sims.T, axis=1)[:, :kmax]  # (N, kmax) caption indices
    i2t = [_first_hit(row, lambda c, n=n: c == doc_cap[n]) for n, row in enumerate(top_t)]
    return {"text_to_image": recall_from_ranks(t2i, ks), "image_to_text": recall_from_ranks(i2t, ks),
            "captions": len(captions), "images": len(docs)}


def cross_style_recall(memory: Memory, encoder: Encoder, docs: Sequence[Document], k: int = 5) -> dict:
    """Ask with a document's image, with every document of its concept in its style removed from the memory;
    correct if a document with the same caption in another style is in the top k."""
    memory.require_encoder(encoder.name)
    ids, meta, vecs = memory.scan()
    texts = np.array([m.get("_text") or "" for m in meta], dtype=object)
    concepts = np.array([m.get("concept") or "" for m in meta], dtype=object)
    styles = np.array([m.get("style") or "" for m in meta], dtype=object)
    queries = [d for d in docs if d.image is not None and d.meta.get("style") and d.meta.get("concept")]
    if not queries:
        return {f"recall@{k}": None, "queries": 0}
    q = encoder.embed_image([d.image for d in queries])  # (Q, D)
    sims = q @ vecs.T  # (Q, M)
    ranks, answerable = [], 0
    for n, d in enumerate(queries):
        removed = (concepts == d.meta["concept"]) & (styles == d.meta["style"])
        target = (texts == d.text) & (styles != d.meta["style"])
        if not target.any():
            continue  # no other-style drawing of this emoji in the memory
        answerable += 1
        s = np.where(removed, -np.inf, sims[n])
        top = np.argsort(-s)[:k]
        ranks.append(next((r for r, j in enumerate(top) if target[j]), None))
    return {**recall_from_ranks(ranks, (1, k)), "queries": answerable}


def text_query_latency(memory: Memory, encoder: Encoder, texts: Sequence[str], k: int = 2) -> float:
    """Median milliseconds of one text query end to end (embedding + search), one query at a time."""
    times = []
    for t in texts:
        t0 = time.perf_counter()
        memory.search(encoder.embed_text([t]), k)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def evaluate_retrieval(memory_dir, dataset, split: str | None = "heldout", encoder_dir=None) -> dict:
    """`racm3 eval retrieval`: recall through the memory, cross-modal recall within the split, the other style's
    drawing in the top 5, and one text query's latency, for the documents of one split (None or "all": every one)."""
    from racm3.retrieval.encoder import load_encoder
    from racm3.retrieval.train_encoder import read_dataset

    mem = Memory.open(memory_dir)
    enc = load_encoder(encoder_dir)
    mem.require_encoder(enc.name)
    docs = read_dataset(dataset, split)
    if not docs:
        raise ValueError(f"{dataset}: no documents in split {split!r}")
    return {
        "split": split, "queries": len(docs), "memory": mem.info(),
        "through_memory": memory_recall(mem, enc, docs),
        "cross_modal": cross_modal_recall(enc, docs),
        "cross_style": cross_style_recall(mem, enc, docs, k=5),
        "text_query_ms_median": round(text_query_latency(mem, enc, [d.text for d in docs[:100] if d.text]), 2),
    }
