"""Multimodal documents (ordered text and image segments) and the streaming readers that produce them."""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

# A decoded image larger than this is refused (decompression bombs); 4096 x 4096 is far above any
# image this project trains on and far below what would exhaust memory.
MAX_IMAGE_PIXELS = 4096 * 4096

# Metadata keys every document may carry; readers fill what they know.
META_KEYS = ("source", "license", "style", "split", "concept")


class BadRecord(ValueError):
    """A record that cannot become a Document; the message names the record and the reason.

    The message is kept to one line: newlines and other unprintable characters (in ids, member names,
    paths taken from the record) are written as escapes.
    """

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


Segment = str | Image.Image


@dataclass(frozen=True, eq=False)
class Document:
    """An id, an ordered list of text and image segments, and metadata (source, license, style, split, concept).

    Images are held as RGB PIL images; text segments as non-empty strings.
    """

    id: str
    segments: tuple[Segment, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise BadRecord(f"document id must be a non-empty string, got {self.id!r}")
        if not self.segments:
            raise BadRecord(f"document {self.id!r} has no segments")
        for seg in self.segments:
            if isinstance(seg, str):
                if not seg.strip():
                    raise BadRecord(f"document {self.id!r} has an empty text segment")
            elif isinstance(seg, Image.Image):
                if seg.mode != "RGB":
                    raise BadRecord(f"document {self.id!r} has a {seg.mode} image; convert with to_rgb() first")
            else:
                raise BadRecord(f"document {self.id!r} has a segment of type {type(seg).__name__}")

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]

    @property
    def text(self) -> str | None:
        """All text segments joined by a space, or None for an image-only document."""
        texts = self.texts
        return " ".join(texts) if texts else None

    @property
    def image(self) -> Image.Image | None:
        """The first image, or None for a text-only document."""
        images = self.images
        return images[0] if images else None

    @property
    def is_multimodal(self) -> bool:
        return bool(self.texts) and bool(self.images)

    def __getattr__(self, name: str) -> Any:
        # style, split, concept, source, license read from meta (None when absent).
        if name in META_KEYS:
            return self.meta.get(name)
        raise AttributeError(name)


# Integer greyscale modes holding 16 bits per pixel (a 16-bit PNG opens as "I;16"; some decoders give "I"):
# their values run to 65535, so a plain convert("RGB") would clip nearly every pixel to white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette and transparent images become RGB; transparency is composited on white.

    16-bit greyscale is scaled to 8 bits (v / 257, rounded: 65535 -> 255), not clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as "L" (or "LA" when a transparent grey value is set), scaled, not clipped."""
    import numpy as np

    values = np.asarray(image).astype(np.int64)
    grey = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def load_image(source: str | os.PathLike | bytes, *, name: str = "") -> Image.Image:
    """Decode an image from a path or bytes into RGB, refusing corrupt, truncated and oversized images.

    Every failure is a BadRecord naming the image: a missing file, a folder, a file that cannot be opened,
    and any error the decoders raise on bytes they cannot read.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise BadRecord(f"{label}: image file not found") from None
    except IsADirectoryError:
        raise BadRecord(f"{label}: is a folder, not an image file") from None
    except (OSError, ValueError) as exc:  # no permission, a name the file system refuses, an embedded NUL
        raise BadRecord(f"{label}: cannot open the image file ({getattr(exc, 'strerror', None) or exc})") from None
    with fp:
        try:
            image = Image.open(fp)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadRecord(f"{label}: image of {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
            image.load()  # decodes fully: a truncated file fails here, not later
            return to_rgb(image)
        except BadRecord:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own guard fires first for huge headers
            raise BadRecord(f"{label}: image is over the pixel limit ({exc})") from None
        except UnidentifiedImageError:  # its message names a BytesIO object's address: say it plainly
            raise BadRecord(f"{label}: not a readable image (no known image format)") from None
        except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes raise many types (struct.error, ...)
            reason = " ".join(str(exc).split())[:200]
            raise BadRecord(f"{label}: not a readable image ({type(exc).__name__}: {reason})") from None


def image_to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# This project's dataset folder: docs.jsonl + images/
# ---------------------------------------------------------------------------------------------


def document_from_record(record: dict[str, Any], root: Path, *, allow_outside: bool = False) -> Document:
    """One docs.jsonl line -> Document; image paths are relative to the dataset folder and must stay inside it
    (absolute paths and `../` out of it are a BadRecord) unless allow_outside."""
    doc_id = record.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        raise BadRecord(f"record without an id: {str(record)[:80]}")
    raw = record.get("segments")
    if not isinstance(raw, list) or not raw:
        raise BadRecord(f"{doc_id}: no segments")
    segments: list[Segment] = []
    for seg in raw:
        if isinstance(seg, dict) and "text" in seg:
            text = seg["text"]
            if not isinstance(text, str) or not text.strip():
                raise BadRecord(f"{doc_id}: empty or non-text caption {text!r}")
            segments.append(text)
        elif isinstance(seg, dict) and "image" in seg:
            path = dataset_image_path(seg["image"], root, doc_id, allow_outside)
            segments.append(load_image(path, name=f"{doc_id}: {seg['image']}"))
        else:
            raise BadRecord(f"{doc_id}: segment {seg!r} is neither text nor image")
    meta = {k: v for k, v in record.items() if k not in ("id", "segments")}
    return Document(doc_id, tuple(segments), meta)


def dataset_image_path(rel: Any, root: Path, doc_id: str, allow_outside: bool = False) -> Path:
    """root / rel for a docs.jsonl image path, refused (BadRecord) when it is not a non-empty string or, unless
    allow_outside, when it leads out of root. The refusal is decided on the path alone, before any file is
    touched, so it never tells whether a file outside the dataset exists."""
    if not isinstance(rel, str) or not rel.strip():
        raise BadRecord(f"{doc_id}: image path must be a non-empty string, got {rel!r:.60}")
    path = root / rel
    try:
        inside = allow_outside or path.resolve().is_relative_to(root.resolve())
    except (OSError, ValueError, RuntimeError) as exc:  # an embedded NUL byte, a symlink loop
        raise BadRecord(f"{doc_id}: image path {rel!r:.80} is not a usable path ({exc})") from None
    if not inside:
        raise BadRecord(f"{doc_id}: image path {rel!r:.80} leads outside the dataset folder {root}; keep images "
                        "inside it (or read with allow_outside=True)")
    return path


def write_jsonl_dataset(docs: Iterable[Document], out_dir: str | os.PathLike) -> int:
    """Write documents as out_dir/docs.jsonl + out_dir/images/ID-N.png; returns the count.

    The JSONL is written to a temporary file and renamed, so a crash never leaves half a docs.jsonl (images
    already written stay; they are named by document id, so a rerun overwrites them).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder to write the data set into")
    (out / "images").mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".docs-", suffix=".jsonl", dir=out)
    tmp = Path(tmp_name)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                segs = []
                for i, seg in enumerate(doc.segments):
                    if isinstance(seg, str):
                        segs.append({"text": seg})
                    else:
                        rel = f"images/{_safe_name(doc.id)}-{i}.png"
                        seg.save(out / rel)
                        segs.append({"image": rel})
                f.write(json.dumps({"id": doc.id, "segments": segs, **doc.meta}, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out / "docs.jsonl")
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: the old docs.jsonl, if any, stays as it was
    return count


def _safe_name(doc_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in doc_id)
