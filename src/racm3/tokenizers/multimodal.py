"""Documents <-> unified token ids: text segments as BPE ids, image segments as `<img> codes </img>`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence as Seq

import torch
from PIL import Image

from racm3.documents import Document
from racm3.tokenizers.text import TextTokenizer
from racm3.tokenizers.vocab import Vocab

# A segment whose image is already tokenized: a caption (str) or the image's codes (LongTensor [N] or list).
CodeSegment = str | torch.Tensor | Seq[int]


class MultimodalTokenizer:
    """Text tokenizer + image tokenizer + the Vocab that lays their ids out in one space.

    document_to_ids gives the bare document (no <bos>/<eos>/<doc> wrappers: build_sequence adds those): its
    segments in order, any number of each kind. Consecutive text segments are joined by one space (as
    Document.text does) and encoded as one text, so the round trip keeps the text exactly and a document whose
    text segments are separated by images (every document this project builds, interleaved ones included)
    comes back segment for segment.
    """

    def __init__(self, text: TextTokenizer, image: Any, vocab: Vocab | None = None) -> None:
        vocab = vocab or Vocab(text.vocab_size, image.codebook_size)
        if vocab.text_size != text.vocab_size or vocab.image_size != image.codebook_size:
            raise ValueError(f"Vocab(text_size={vocab.text_size}, image_size={vocab.image_size}) does not match the "
                             f"tokenizers (text {text.vocab_size}, codebook {image.codebook_size})")
        self.text, self.image, self.vocab = text, image, vocab

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "MultimodalTokenizer":
        """Load MODEL_DIR/text_tokenizer/ and MODEL_DIR/image_tokenizer/ (docs/design.md, Artifacts)."""
        from racm3.tokenizers.image import ImageTokenizer

        d = Path(model_dir)
        return cls(TextTokenizer.from_pretrained(d / "text_tokenizer"), ImageTokenizer.from_pretrained(d / "image_tokenizer"))

    def save_pretrained(self, model_dir: str | os.PathLike, **image_kwargs: Any) -> Path:
        d = Path(model_dir)
        self.text.save_pretrained(d / "text_tokenizer")
        self.image.save_pretrained(d / "image_tokenizer", **image_kwargs)
        return d

    @property
    def tokens_per_image(self) -> int:
        return int(self.image.tokens_per_image)

    # --- documents -> ids -------------------------------------------------------------------------
    def image_code_fingerprint(self) -> str | None:
        """The image tokenizer's code_fingerprint() (None for one without): what its codes mean."""
        fingerprint = getattr(self.image, "code_fingerprint", None)
        return fingerprint() if fingerprint is not None else None

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """VQ codes [B, N] for a batch of PIL images (no gradient)."""
        with torch.no_grad():
            return self.image.encode(images)

    def document_to_ids(self, doc: Document) -> list[int]:
        return [t for run in self.document_runs(doc) for t in run]

    def document_runs(self, doc: Document) -> list[list[int]]:
        """codes_document_runs of a document, its images encoded in one batch."""
        codes = iter(self.encode_images(doc.images).tolist() if doc.images else [])
        return self.codes_document_runs([s if isinstance(s, str) else next(codes) for s in doc.segments])

    def codes_document_to_ids(self, segments: Seq[CodeSegment]) -> list[int]:
        """Same as document_to_ids, for segments whose images are precomputed codes (no VQ encoder run)."""
        return [t for run in self.codes_document_runs(segments) for t in run]

    def codes_document_runs(self, segments: Seq[CodeSegment]) -> list[list[int]]:
        """The document's ids as runs, in order: each stretch of consecutive text segments, joined by one space,
        as one run of text ids; each image as `<img> codes </img>`. codes_document_to_ids is their concatenation."""
        runs: list[list[int]] = []
        texts: list[str] = []

        def flush_text() -> None:
            # One encode of the joined text: the ids the tokenizer gives the decoded text back (ids -> document -> ids).
            if texts:
                runs.append(self.vocab.text_to_vocab(self.text.encode(" ".join(texts))))
                texts.clear()

        for seg in segments:
            if isinstance(seg, str):
                texts.append(seg)
                continue
            flush_text()
            codes = seg.tolist() if isinstance(seg, torch.Tensor) else list(seg)
            if len(codes) != self.tokens_per_image:
                raise ValueError(f"an image segment has {len(codes)} codes; this image tokenizer makes "
                                 f"{self.tokens_per_image} per image")
            runs.append([self.vocab.img_id, *self.vocab.image_to_vocab(codes), self.vocab.img_end_id])
        flush_text()
        return runs

    # --- ids -> documents -------------------------------------------------------------------------
    def ids_to_segments(self, ids: Seq[int] | torch.Tensor) -> list[str | torch.Tensor]:
        """Parse ids into text strings and image codes (LongTensor [N]) without running the VQ decoder.

        <bos>, <eos>, <pad>, <doc> and </doc> are skipped; a <mask:i> (an unfilled hole: run cm3_unmask
        first), an image id outside <img>...</img> or an image with the wrong number of codes raises.
        """
        v = self.vocab
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        segments: list[str | torch.Tensor] = []
        text_run: list[int] = []
        image_run: list[int] | None = None

        def flush_text() -> None:
            if text_run:
                segments.append(self.text.decode(v.vocab_to_text(text_run)))
                text_run.clear()

        for t, tok in enumerate(ids):
            if image_run is not None:
                if tok == v.img_end_id:
                    if len(image_run) != self.tokens_per_image:
                        raise ValueError(f"image ending at token {t} has {len(image_run)} codes, expected "
                                         f"{self.tokens_per_image}")
                    segments.append(torch.tensor(v.vocab_to_image(image_run), dtype=torch.long))
                    image_run = None
                elif v.is_image(tok):
                    image_run.append(tok)
                else:
                    raise ValueError(f"token {t} ({v.token_name(tok)}) inside an image; only image codes belong there")
            elif v.is_text(tok):
                text_run.append(tok)
            elif tok == v.img_id:
                flush_text()
                image_run = []
            elif tok in (v.bos_id, v.eos_id, v.pad_id, v.doc_id, v.doc_end_id):
                flush_text()
            else:
                raise ValueError(f"token {t} ({v.token_name(tok)}) cannot appear in a document here"
                                 + ("; run cm3_unmask first" if v.is_mask(tok) else ""))
        if image_run is not None:
            raise ValueError("the ids end inside an image (no </img>)")
        flush_text()
        return segments

    def ids_to_document(self, ids: Seq[int] | torch.Tensor, id: str = "generated",
                        meta: dict[str, Any] | None = None) -> Document:
        """A Document from ids: text decoded exactly, images decoded by the VQ decoder (batched)."""
        segments = self.ids_to_segments(ids)
        codes = [s for s in segments if isinstance(s, torch.Tensor)]
        pils: list[Image.Image] = []
        if codes:
            with torch.no_grad():
                pils = self.image.to_pil(self.image.decode(torch.stack(codes)))
        out, k = [], 0
        for seg in segments:
            if isinstance(seg, str):
                out.append(seg)
            else:
                out.append(pils[k])
                k += 1
        return Document(id, tuple(out), dict(meta or {}))
