"""clip-retrieval's back-end protocol (`clip-retrieval back`): POST /knn-service and GET /indices-list.

Requests carry the fields clip_retrieval.clip_client.ClipClient sends (text, image as base64, image_url,
embedding_input, modality, num_images, num_result_ids, indice_name, deduplicate, and the safety, aesthetic and
mclip options); answers are lists of {id, similarity, caption, url}, best first. racm3 has one mixed index per
memory, so `modality` is accepted and does not change the search; `id` is the document's racm3 id (a string, where
clip-retrieval's back end numbers its rows); `url` points at the document's image on this server. Options for models
racm3 does not have (safety, violence, aesthetic, mclip) are accepted and ignored. Nothing is ever downloaded:
`image_url` is refused.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from racm3.documents import BadRecord, load_image

DEDUP_SIMILARITY = 0.94  # clip-retrieval's back end drops results whose embeddings are this close to a better one


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str | None = None
    image: str | None = Field(None, description="the query image, base64-encoded file bytes")
    image_url: str | None = Field(None, description="refused: this server never downloads")
    embedding_input: list[float] | None = Field(None, description="a query vector of the memory's dimension")
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, le=1000)
    num_result_ids: int | None = Field(None, ge=1, le=10000)
    indice_name: str | None = None
    deduplicate: bool = True
    use_mclip: Any = None
    use_safety_model: Any = None
    use_violence_detector: Any = None
    aesthetic_score: Any = None
    aesthetic_weight: Any = None


class KnnError(ValueError):
    """A knn-service request the server cannot answer; the message names the field and the fix."""


def decode_base64_image(data: str, field: str):
    """A base64 string (optionally a data: URL) -> RGB PIL image; KnnError/BadRecord name the field."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise KnnError(f"{field}: not base64; send the image file's bytes base64-encoded") from None
    return load_image(raw, name=field)


def query_vector(req: KnnRequest, encoder, dim: int) -> np.ndarray:
    """The request's query as one L2-normalised vector (text, then image, then embedding_input, as clip back does)."""
    if req.text:
        return np.asarray(encoder.embed_text([req.text]), dtype=np.float32)[0]
    if req.image:
        try:
            return np.asarray(encoder.embed_image([decode_base64_image(req.image, "image")]), dtype=np.float32)[0]
        except BadRecord as exc:
            raise KnnError(str(exc)) from None
    if req.image_url:
        raise KnnError("image_url: this server never downloads; send the image itself, base64-encoded, in `image` "
                       "(ClipClient.query(image=PATH) does)")
    if req.embedding_input is not None:
        vec = np.asarray(req.embedding_input, dtype=np.float32)
        if vec.shape != (dim,) or not np.isfinite(vec).all() or not np.linalg.norm(vec) > 0:
            raise KnnError(f"embedding_input: needs {dim} finite numbers, not all 0 (the memory's dimension), got "
                           f"{len(req.embedding_input)}")
        return vec / np.linalg.norm(vec)
    raise KnnError("give one of text, image (base64) or embedding_input")


def knn(memory, encoder, req: KnnRequest, image_url) -> list[dict]:
    """Answer one knn-service request from a memory: [{id, similarity, caption, url}], best first."""
    vec = query_vector(req, encoder, memory.dim)
    fetch = max(req.num_images, req.num_result_ids or req.num_images)
    if req.deduplicate:  # fetch more, so that num_images remain after near-duplicates are dropped where they can
        fetch = max(fetch, min(4 * req.num_images, 4000))
    hits = memory.search(vec[None, :], fetch)[0]
    if req.deduplicate and len(hits) > 1:
        hits = _deduplicate(hits, memory.vectors([h.id for h in hits]))
    return [{"id": h.id, "similarity": round(h.score, 6), "caption": h.document.text,
             "url": image_url(h.id) if h.document.image is not None else None} for h in hits[:req.num_images]]


def _deduplicate(hits: list, vectors: np.ndarray) -> list:
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or float((vectors[kept] @ vectors[i]).max()) <= DEDUP_SIMILARITY:
            kept.append(i)
    return [hits[i] for i in kept]
