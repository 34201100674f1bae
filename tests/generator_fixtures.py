"""Tiny data and tokenizers for the generator tests: colored shapes in two styles, 16x16 images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from racm3.documents import Document, write_jsonl_dataset

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "orange": (250, 150, 20),
          "purple": (140, 40, 170), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle", "bar")
HELDOUT = {("purple", "bar"), ("black", "circle"), ("orange", "triangle"), ("green", "square")}


def draw(color: str, shape: str, style: str, size: int = 16) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    fill, outline = (COLORS[color], None) if style == "filled" else (None, COLORS[color])
    box = (2, 2, size - 3, size - 3)
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        d.polygon([(size // 2, 2), (size - 3, size - 3), (2, size - 3)], fill=fill, outline=outline, width=2)
    else:
        d.rectangle((2, size // 2 - 3, size - 3, size // 2 + 2), fill=fill, outline=outline, width=2)
    return im


def shape_documents() -> list[Document]:
    docs = []
    for style in ("filled", "outline"):
        for color in COLORS:
            for shape in SHAPES:
                caption = f"{color} {shape}"
                docs.append(Document(f"{style}-{color}-{shape}", (draw(color, shape, style), caption),
                                     {"style": style, "concept": caption,
                                      "split": "heldout" if (color, shape) in HELDOUT else "train"}))
    return docs


def write_shape_dataset(out: Path) -> Path:
    write_jsonl_dataset(shape_documents(), out)
    return out


def write_tiny_tokenizers(out: Path) -> Path:
    """text_tokenizer/ trained on the captions; image_tokenizer/ the 'tiny' VQ with its codebook k-means-initialised
    on the shapes' images (one training-mode pass, no gradient step): varied, deterministic codes."""
    import torch

    from racm3.tokenizers.image import ImageTokenizer
    from racm3.tokenizers.text import TextTokenizer

    captions = [d.text for d in shape_documents()]
    TextTokenizer.train(captions * 4, vocab_size=300, min_frequency=1).save_pretrained(out / "text_tokenizer")
    torch.manual_seed(0)
    vq = ImageTokenizer("tiny")
    docs = shape_documents()
    with torch.no_grad():
        vq.train()(vq.to_tensor([d.image.resize((vq.image_size, vq.image_size)) for d in docs]))
    vq.save_pretrained(out / "image_tokenizer")
    return out


def free_port() -> int:
    """A TCP port free right now, for a torchrun rendezvous (a fixed one collides with anything else using it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parts(seq, vocab) -> tuple[list[list[int]], list[int]]:
    """(the documents in context, the main document) of an unmasked sequence, without wrappers and <eos>."""
    k = max(seq.doc_index)
    ctx = [[t for t, d in zip(seq.ids, seq.doc_index) if d == j][1:-1] for j in range(k)]
    main = [t for t, d in zip(seq.ids, seq.doc_index) if d == k]
    return ctx, main[:-1] if main[-1] == vocab.eos_id else main
