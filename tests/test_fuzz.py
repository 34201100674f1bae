"""Issue 13: fuzzing every entry point that takes input from outside: image bytes, docs.jsonl lines, WebDataset
tar members, and the generate commands' option values. Never a traceback, never a hang: every input becomes a
result or one BadRecord / one-line error.

Each test runs FUZZ_EXAMPLES examples (100 by default, a few seconds); RACM3_FUZZ_EXAMPLES=1000 raises it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import racm3.cli as cli
from racm3.documents import MAX_IMAGE_PIXELS, BadRecord, Document, load_image
from racm3.readers import ReadReport, read_documents, read_webdataset

FUZZ_EXAMPLES = int(os.environ.get("RACM3_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HANG_S = 10.0  # one example taking longer than this counts as a hang


def assert_one_line_bad(exc: BadRecord, label: str) -> None:
    message = str(exc)
    assert message and "\n" not in message and label in message, message


# ---------------------------------------------------------------------------------------------
# Image bytes: random, and real images of every format with bytes flipped or cut
# ---------------------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seed_images() -> list[bytes]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    grey16 = Image.fromarray((np.arange(120, dtype=np.uint16).reshape(12, 10) * 500))
    palette = rgb.convert("P")
    rgba = rgb.convert("RGBA")
    return [_encoded(rgb, "PNG"), _encoded(rgb, "JPEG"), _encoded(rgb, "GIF"), _encoded(rgb, "BMP"),
            _encoded(rgb, "TIFF"), _encoded(rgb, "WEBP"), _encoded(rgb, "PPM"), _encoded(rgb, "ICO"),
            _encoded(grey16, "PNG"), _encoded(palette, "PNG", transparency=3), _encoded(rgba, "PNG"),
            _encoded(grey16, "TIFF"), _encoded(rgb.convert("CMYK"), "JPEG"), _encoded(rgb.convert("1"), "PNG")]


SEEDS = _seed_images()


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


image_bytes = st.one_of(st.binary(max_size=2048), mutated_image())


def check_load_image(data: bytes) -> None:
    t0 = time.perf_counter()
    try:
        image = load_image(data, name="fuzz-image")
    except BadRecord as exc:
        assert_one_line_bad(exc, "fuzz-image")
    else:
        assert image.mode == "RGB" and image.width * image.height <= MAX_IMAGE_PIXELS
        assert np.asarray(image).shape == (image.height, image.width, 3)
    assert time.perf_counter() - t0 < HANG_S


@FUZZ
@given(image_bytes)
def test_fuzz_load_image(data: bytes) -> None:
    check_load_image(data)


def test_unmutated_seed_images_all_load() -> None:
    # the fuzz above starts from real images: each must load, so mutations start from working decoders
    for data in SEEDS:
        assert load_image(data).mode == "RGB"


# ---------------------------------------------------------------------------------------------
# docs.jsonl lines: random JSON, record-shaped JSON with odd values, raw bytes
# ---------------------------------------------------------------------------------------------

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
IMAGE_PATHS = ["images/ok.png", "images/bad.png", "images/16bit.png", "images", "", "../outside.png",
               "/etc/passwd", "images/../../outside.png", "images/missing.png", "images/a\x00b.png", "\ud800.png"]
segment = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=30), json_value)}),
    st.fixed_dictionaries({"image": st.one_of(st.sampled_from(IMAGE_PATHS), json_value)}),
    json_value,
)
record = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=12), json_value), "segments": st.one_of(st.lists(segment, max_size=3), json_value)},
    optional={"style": json_value, "split": json_value, "source": json_value},
)


def _line(value) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return b"{}"


jsonl_line = st.one_of(record.map(_line), json_value.map(_line),
                       st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
                       st.text(max_size=40).map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass")))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzzdata")
    (root / "images").mkdir()
    Image.new("RGB", (4, 4), (9, 8, 7)).save(root / "images" / "ok.png")
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(root / "images" / "16bit.png")
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (4, 4)).save(root.parent / "outside.png")
    return root


def _blank(line: bytes) -> bool:
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


@FUZZ
@given(lines=st.lists(jsonl_line, max_size=6))
def test_fuzz_read_documents_jsonl(dataset_dir: Path, lines: list[bytes]) -> None:
    (dataset_dir / "docs.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    t0 = time.perf_counter()
    report = ReadReport(max_examples=10)
    docs = list(read_documents(dataset_dir, report=report))
    records = sum(not _blank(line) for line in lines)
    assert report.read == len(docs) and report.read + report.skipped == records  # one outcome per line
    assert len(report.examples) == report.skipped
    for reason in report.examples:
        assert "docs.jsonl:" in reason and "\n" not in reason, reason
    for doc in docs:
        assert isinstance(doc, Document) and all(im.mode == "RGB" for im in doc.images)
        # outside.png (black) is never read; the images inside are (9, 8, 7) and the 16-bit grey scaled to 156
        assert all(np.asarray(im).reshape(-1, 3)[0].tolist() in ([9, 8, 7], [156, 156, 156]) for im in doc.images)
    # strict: the first bad line stops the read with that line's BadRecord, after the good lines before it
    try:
        strict_docs = list(read_documents(dataset_dir, strict=True))
    except BadRecord as exc:
        assert str(exc) == report.examples[0]
    else:
        assert report.skipped == 0 and len(strict_docs) == len(docs)
    assert time.perf_counter() - t0 < HANG_S


# ---------------------------------------------------------------------------------------------
# WebDataset shards: random member names, types and contents; shards cut short or garbled
# ---------------------------------------------------------------------------------------------

member_name = st.one_of(
    st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(["a", "b", "dir/c", "d.e", ""]),
              st.sampled_from(["png", "jpg", "txt", "json", "cls", "PNG", "webp", "txt.gz", ""])),
    st.text(min_size=1, max_size=20).filter(lambda n: "\x00" not in n),
)
member_data = st.one_of(image_bytes, st.sampled_from(SEEDS), st.text(max_size=30).map(str.encode),
                        json_value.map(_line), st.binary(max_size=64))
member = st.tuples(member_name, member_data, st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE,
                                                                                        tarfile.SYMTYPE]))


def _shard(members, mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "a.png" if kind == tarfile.SYMTYPE else ""
                tar.addfile(info)
    return buf.getvalue()


@st.composite
def shard_bytes(draw) -> bytes:
    members = draw(st.lists(member, max_size=6))
    data = bytearray(_shard(members, draw(st.sampled_from(["w", "w:gz", "w:bz2", "w:xz"]))))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


@FUZZ
@given(data=st.one_of(shard_bytes(), st.binary(max_size=1024)))
def test_fuzz_read_webdataset(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "00000.tar"
        shard.write_bytes(data)
        t0 = time.perf_counter()
        report = ReadReport(max_examples=50)
        docs = list(read_webdataset(shard, report=report))
        assert report.read == len(docs) and len(report.examples) == report.skipped
        for reason in report.examples:
            assert str(shard) in reason and "\n" not in reason, reason
        for doc in docs:
            assert doc.image.mode == "RGB" and doc.text and doc.text == doc.text.strip()
        try:
            list(read_webdataset(shard, strict=True))
        except BadRecord as exc:
            assert str(exc) == report.examples[0]
        else:
            assert report.skipped == 0
        assert time.perf_counter() - t0 < HANG_S


# ---------------------------------------------------------------------------------------------
# The generate commands' options: the validation layer, with a model that is never loaded
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_model():
    """What the model-dependent checks read (the context length, tokens per image, the real text tokenizer),
    with RACM3's own check_request."""
    from racm3.pipeline import RACM3
    from racm3.pretrained import shipped_model_dir
    from racm3.tokenizers.text import TextTokenizer

    text = TextTokenizer.from_pretrained(shipped_model_dir() / "text_tokenizer")
    model = SimpleNamespace(max_len=384, tokenizer=SimpleNamespace(tokens_per_image=64, text=text))
    model.check_request = lambda k, caption=None: RACM3.check_request(model, k, caption)
    return model


def _stand_in(model):
    """A _load_model_and_memory that runs the model-dependent checks on model, then stops (exit 0)."""
    def load(model_dir, memory_dir, k, generator="generator", check=None, device="auto"):
        if check is not None:
            check(model)
        raise typer.Exit(0)

    return load


def _number(value) -> str:
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


# Mostly values in range (so the checks after the first run too), then edges, anything, and non-numbers.
def mostly(valid, *others):
    """valid about four times in five, so that the checks after the first option run too."""
    return st.tuples(st.integers(0, 4), valid, st.one_of(*others)).map(lambda t: t[1] if t[0] else t[2])


floats = mostly(st.floats(0.01, 1), st.sampled_from([0.0, 1.0, -0.0, 1e-30, 0.01, 100.0, 100.5, 1 + 1e-9]),
                st.floats(-2, 200), st.floats(allow_nan=True, allow_infinity=True))
ints = mostly(st.integers(1, 8), st.sampled_from([0, 1, 64, 65, 19, 20, 2**63 - 1, 2**63, -1]), st.integers())
junk = st.sampled_from(["abc", "", "1.5.2", "--", "0x10"])
OUT_SHAPES = ["o.png", "sub/dir/o.png", "o", "o.xyz", "folder", "file.txt/o.png", "", ".png", "o.JPG"]
captions = st.one_of(st.text(max_size=40), st.sampled_from(["", "   ", "flag: France", "日本の旗"]),
                     st.integers(0, 6000).map(lambda n: "ab " * n))


def _valid_options(samples, guidance, temperature, top_p, k, seed) -> bool:
    """The documented ranges, written independently of the command."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return (num(samples) and 1 <= samples <= 64 and num(k) and k >= 0 and num(seed) and 0 <= seed < 2**63
            and num(temperature) and (temperature == 0 or 0.01 <= temperature <= 100)
            and (guidance is None or (num(guidance) and 0 <= guidance <= 100))
            and (top_p is None or (num(top_p) and 0 < top_p <= 1)))


def check_cli(args: list[str], values_ok: bool, expect_written: Path | None) -> None:
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli.app, args)
    assert time.perf_counter() - t0 < HANG_S
    assert isinstance(result.exception, SystemExit) or result.exception is None, (args, result.exception)
    out = result.output
    assert "Traceback" not in out, out
    if result.exit_code == 2:  # click's own usage error: a value that is not a number at all
        event("exit 2 (usage)")
        assert "Invalid value" in out or "Missing" in out or "requires an argument" in out or "No such option" in out
        return
    lines = [line for line in out.splitlines() if line.strip()]
    word = lines[0].split()[1] if result.exit_code and len(lines[0].split()) > 1 else ""
    event(f"exit {result.exit_code}" + (f": {'the image' if word.startswith('/') else word}" if word else ""))
    if result.exit_code == 0:
        assert values_ok, (args, out)
    else:
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args, out)
        if values_ok:  # option values in range: only the caption, the image, -k's fit or --out can be refused
            assert any(p in lines[0] for p in ("caption", "k=", "--out", "image", "not a readable")), lines
    if expect_written is not None:
        assert not expect_written.exists()  # nothing written, whatever happened


def junk_one(options: list[str]):
    """None (every value a number) most of the time, else (an option, a non-number to give it)."""
    return st.one_of(st.none(), st.none(), st.none(), st.tuples(st.sampled_from(options), junk))


def _args(values: dict, junked) -> list[str]:
    if junked is not None:
        values = {**values, junked[0]: junked[1]}
    return [item for name, value in values.items() for item in (name, _number(value))]


IMAGE_OPTIONS = ["--samples", "--guidance", "--temperature", "--top-p", "-k", "--seed"]
TEXT_OPTIONS = ["--samples", "--temperature", "-k", "--seed"]


@FUZZ
@given(caption=captions, samples=ints, guidance=floats, temperature=floats, top_p=floats, k=ints, seed=ints,
       junked=junk_one(IMAGE_OPTIONS), out=st.sampled_from(OUT_SHAPES + [None] * 3))
def test_fuzz_generate_image_options(fake_model, caption, samples, guidance, temperature, top_p, k, seed, junked,
                                     out) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load_model_and_memory", _stand_in(fake_model))
        mp.chdir(tmp)
        (Path(tmp) / "folder").mkdir()
        (Path(tmp) / "file.txt").write_text("x")
        values = dict(zip(IMAGE_OPTIONS, [samples, guidance, temperature, top_p, k, seed]))
        args = ["generate", "image", *_args(values, junked), *(["--out", out] if out is not None else []), "--", caption]
        ok = junked is None and _valid_options(samples, guidance, temperature, top_p, k, seed)
        check_cli(args, ok, Path(tmp) / "racm3-output")
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["file.txt", "folder"]  # no probe file left
        assert not any((Path(tmp) / "folder").iterdir())


@FUZZ
@given(image=st.one_of(st.sampled_from(SEEDS), image_bytes, st.none()), samples=ints, temperature=floats, k=ints,
       seed=ints, junked=junk_one(TEXT_OPTIONS))
def test_fuzz_generate_text_options(fake_model, image, samples, temperature, k, seed, junked) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load_model_and_memory", _stand_in(fake_model))
        path = Path(tmp) / "query.png"
        if image is None:
            path.mkdir()  # a folder where the image should be
        else:
            path.write_bytes(image)
        values = dict(zip(TEXT_OPTIONS, [samples, temperature, k, seed]))
        args = ["generate", "text", *_args(values, junked), str(path)]
        check_cli(args, junked is None and _valid_options(samples, None, temperature, None, k, seed), None)
