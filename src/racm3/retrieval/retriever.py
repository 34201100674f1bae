"""RA-CM3's retrieval rules over a memory: top-k by cosine, near-duplicate cut, diversity, multimodal first, query dropout."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from racm3.documents import Document
from racm3.retrieval.encoder import Encoder, l2_normalize
from racm3.retrieval.memory import Candidates, Hit, Memory

Query = str | Image.Image | Document
PATCH = 8  # image query dropout hides square patches of this many pixels


@dataclass(frozen=True)
class RetrieverConfig:
    """The paper's selection rules (RA-CM3 sec. 3.2), thresholds configurable.

    k: documents returned; max_similarity: skip a candidate whose cosine with the query is above this
    (0.9 when building training sequences; None at inference, so a query found in memory is answered by it);
    diversity: skip a candidate whose cosine with an already-picked document is above this (None = off);
    prefer_multimodal: among the fetched candidates, documents holding both text and image come first
    (a stable partition, so order by score is kept within each group); query_dropout: fraction of the
    query's words, or of its 8x8 image patches, dropped before embedding (0.2 in training);
    candidates: how many nearest neighbours are fetched from the index before the rules apply.
    """

    k: int = 2
    max_similarity: float | None = None
    diversity: float | None = 0.95
    prefer_multimodal: bool = True
    query_dropout: float = 0.0
    candidates: int = 32

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {self.query_dropout}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        for name in ("max_similarity", "diversity"):
            v = getattr(self, name)
            if v is not None and not -1.0 <= v <= 1.0:
                raise ValueError(f"{name} is a cosine threshold in [-1, 1] or None, got {v}")


def drop_words(text: str, rate: float, rng: random.Random) -> str:
    """Drop round(rate * n) of the words, keeping at least one (query dropout for text)."""
    words = text.split()
    n_drop = min(len(words) - 1, round(rate * len(words)))
    if n_drop <= 0:
        return text
    dropped = set(rng.sample(range(len(words)), n_drop))
    return " ".join(w for i, w in enumerate(words) if i not in dropped)


def drop_patches(image: Image.Image, rate: float, rng: random.Random, patch: int = PATCH) -> Image.Image:
    """Whiten round(rate * n) of the image's patch x patch squares (query dropout for images; emoji backgrounds are white)."""
    arr = np.array(image.convert("RGB"))  # (H, W, 3) copy
    rows, cols = -(-arr.shape[0] // patch), -(-arr.shape[1] // patch)
    n_drop = round(rate * rows * cols)
    for cell in rng.sample(range(rows * cols), n_drop):
        r, c = divmod(cell, cols)
        arr[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 255
    return Image.fromarray(arr)


def drop_document(doc: Document, rate: float, rng: random.Random) -> Document:
    segs = tuple(drop_words(s, rate, rng) if isinstance(s, str) else drop_patches(s, rate, rng) for s in doc.segments)
    return replace(doc, segments=segs)


class Retriever:
    """Finds up to k documents for a text, image or document query, applying RetrieverConfig's rules."""

    def __init__(self, memory: Memory, encoder: Encoder, config: RetrieverConfig | None = None):
        memory.require_encoder(encoder.name)  # refuse another encoder's vectors, naming both
        if encoder.dim != memory.dim:
            raise ValueError(f"encoder dimension {encoder.dim} differs from the memory's {memory.dim}")
        self.memory = memory
        self.encoder = encoder
        self.config = config or RetrieverConfig()

    def embed_queries(self, queries: Sequence[Query], rng: random.Random | None = None) -> np.ndarray:
        """Queries -> (n, dim) normalised vectors; texts and images each embedded in one batch; dropout applied."""
        rate = self.config.query_dropout
        if rate > 0:
            rng = rng or random.Random()
            queries = [drop_words(q, rate, rng) if isinstance(q, str) else
                       drop_patches(q, rate, rng) if isinstance(q, Image.Image) else
                       drop_document(q, rate, rng) for q in queries]
        out = np.zeros((len(queries), self.encoder.dim), dtype=np.float32)
        groups: dict[type, list[int]] = {str: [], Image.Image: [], Document: []}
        for i, q in enumerate(queries):
            kind = str if isinstance(q, str) else Image.Image if isinstance(q, Image.Image) else \
                Document if isinstance(q, Document) else None
            if kind is None:
                raise TypeError(f"a query is a str, a PIL image or a Document, got {type(q).__name__}")
            groups[kind].append(i)
        if groups[str]:
            out[groups[str]] = self.encoder.embed_text([queries[i] for i in groups[str]])
        if groups[Image.Image]:
            out[groups[Image.Image]] = self.encoder.embed_image([queries[i] for i in groups[Image.Image]])
        if groups[Document]:
            out[groups[Document]] = self.encoder.embed_documents([queries[i] for i in groups[Document]])
        return out

    def retrieve(self, query: Query, k: int | None = None, exclude_ids: Iterable[str] = (),
                 rng: random.Random | None = None) -> list[Hit]:
        return self.retrieve_batch([query], k=k, exclude_ids=[exclude_ids], rng=rng)[0]

    def retrieve_batch(self, queries: Sequence[Query], k: int | None = None,
                       exclude_ids: Sequence[Iterable[str]] | None = None,
                       rng: random.Random | None = None) -> list[list[Hit]]:
        """One list of hits per query; exclude_ids is one iterable of ids per query (or None)."""
        k = self.config.k if k is None else k
        excludes = [set(e) for e in exclude_ids] if exclude_ids is not None else [set() for _ in queries]
        if len(excludes) != len(queries):
            raise ValueError(f"exclude_ids has {len(excludes)} entries for {len(queries)} queries")
        if k == 0 or not queries:
            return [[] for _ in queries]
        return self.retrieve_vectors(self.embed_queries(queries, rng), k, excludes)

    def retrieve_vectors(self, vectors: np.ndarray, k: int, excludes: Sequence[set[str]]) -> list[list[Hit]]:
        """The rules applied to already-embedded queries (n, dim), on the candidates' vectors; only the documents
        picked are decoded, all queries' in one fetch."""
        vectors = l2_normalize(vectors)
        chosen: list[tuple[Candidates, list[int]] | None] = [None] * len(vectors)
        todo = list(range(len(vectors)))
        fetch = max(self.config.candidates, 4 * k)
        while todo:
            found = self.memory.candidates(vectors[todo], fetch, exclude_ids=[excludes[q] for q in todo])
            again = []
            for q, cands in zip(todo, found):
                picked = self._select(cands, k)
                # Too few survived the rules and the memory holds more (it answered all that was asked): widen.
                if len(picked) < k and len(cands.ids) == fetch:
                    again.append(q)
                else:
                    chosen[q] = (cands, picked)
            todo, fetch = again, fetch * 4
        return self.memory.hits([c for c, _ in chosen], [picked for _, picked in chosen])

    def _select(self, cands: Candidates, k: int) -> list[int]:
        """Indices into cands (best first by exact cosine) that the rules keep, at most k."""
        cfg = self.config
        order = range(len(cands.ids))
        if cfg.max_similarity is not None:  # near-duplicates of the query are skipped (training)
            order = [i for i in order if cands.scores[i] <= cfg.max_similarity]
        if cfg.prefer_multimodal:  # stable: score order kept within each group
            order = sorted(order, key=lambda i: not cands.multimodal[i])
        picked: list[int] = []
        for i in order:
            if len(picked) == k:
                break
            if cfg.diversity is not None and picked and \
                    float(np.max(cands.vectors[picked] @ cands.vectors[i])) > cfg.diversity:
                continue
            picked.append(i)
        return picked
