"""Issue 13 (items 6, 7): a broken model folder, a bad option or an unusable output path is one line naming
the file or option and what to do, a non-zero exit, and nothing written; checked before any work starts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import racm3.cli as cli
from racm3.cli import app
from racm3.errors import ModelFolderError
from racm3.pretrained import shipped_model_dir

SHIPPED = shipped_model_dir()
COMPONENTS = ("text_tokenizer", "image_tokenizer", "encoder", "generator", "generator_k0")


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def one_line_error(result, *phrases: str) -> str:
    """The command failed (exit 1) with exactly one line, 'error: ...', holding every phrase; no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def model_with(tmp_path: Path, component: str, breaks) -> Path:
    """A model folder linking the shipped components, with one of them copied and broken by breaks(folder)."""
    root = tmp_path / "model"
    root.mkdir(parents=True)
    for name in COMPONENTS:
        if name == component:
            shutil.copytree(SHIPPED / name, root / name)
            breaks(root / name)
        else:
            (root / name).symlink_to(SHIPPED / name)
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# (component, how it is broken, the file the message must name, a phrase of the reason)
BROKEN = {
    "generator_truncated": ("generator", lambda d: truncate(d / "model.safetensors"), "model.safetensors",
                            "truncated"),
    "generator_empty_weights": ("generator", lambda d: (d / "model.safetensors").write_bytes(b""),
                                "model.safetensors", "truncated"),
    "generator_invalid_config": ("generator", lambda d: (d / "config.json").write_text("{not json"), "config.json",
                                 "not a readable JSON file"),
    "generator_config_list": ("generator", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json",
                              "must hold a JSON object"),
    "generator_hidden_size": ("generator", lambda d: edit_json(d / "config.json", hidden_size=128),
                              "model.safetensors", "the two files come from different models"),
    "generator_bad_heads": ("generator", lambda d: edit_json(d / "config.json", num_attention_heads=7), "config.json",
                            "not a Llama config"),
    "generator_meta": ("generator", lambda d: (d / "racm3.json").write_text("{}"), "racm3.json", "image_base"),
    "encoder_invalid_config": ("encoder", lambda d: (d / "config.json").write_text("{oops"), "config.json",
                               "not a readable JSON file"),
    "encoder_unknown_key": ("encoder", lambda d: edit_json(d / "config.json", bogus=1), "config.json",
                            "not an encoder config"),
    "encoder_dim": ("encoder", lambda d: edit_json(d / "config.json", dim=128), "model.safetensors",
                    "different models"),
    "encoder_truncated": ("encoder", lambda d: truncate(d / "model.safetensors"), "model.safetensors", "truncated"),
    "image_tokenizer_truncated": ("image_tokenizer", lambda d: truncate(d / "model.safetensors"),
                                  "model.safetensors", "truncated"),
    "image_tokenizer_invalid_config": ("image_tokenizer", lambda d: (d / "config.json").write_text("{"),
                                       "config.json", "not a readable JSON file"),
    "text_tokenizer_invalid": ("text_tokenizer", lambda d: (d / "tokenizer.json").write_text("{"), "tokenizer.json",
                               "not a readable tokenizers JSON file"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_generate_with_a_broken_model_folder_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    component, breaks, file, reason = BROKEN[case]
    root = model_with(tmp_path, component, breaks)
    out = tmp_path / "out.png"
    line = one_line_error(run(["generate", "image", "flag: France", "--model", str(root), "-k", "0",
                               "--samples", "1", "--out", str(out)]), str(root / component / file), reason)
    assert "restore" in line or "retrain" in line or "train one" in line  # what to do
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("case", ["encoder_invalid_config", "encoder_truncated", "encoder_dim"])
def test_encoder_option_with_a_broken_encoder_is_one_line(tmp_path: Path, case: str) -> None:
    _, breaks, file, reason = BROKEN[case]
    enc = tmp_path / "enc"
    shutil.copytree(SHIPPED / "encoder", enc)
    breaks(enc)
    memory = tmp_path / "memory"
    one_line_error(run(["memory", "build", str(tmp_path / "nodata"), str(memory), "--encoder", str(enc)]),
                   str(enc / file), reason)
    assert not memory.exists()  # refused before the memory folder was made
    one_line_error(run(["memory", "search", str(tmp_path / "nomemory"), "--text", "x", "--encoder", str(enc)]))


def test_loaders_raise_the_one_project_error(tmp_path: Path) -> None:
    from racm3.generator.model import load_generator
    from racm3.retrieval.encoder import EncoderError, load_encoder
    from racm3.tokenizers.image import ImageTokenizer
    from racm3.tokenizers.text import TextTokenizer

    loaders = {"generator": load_generator, "encoder": load_encoder, "image_tokenizer": ImageTokenizer.from_pretrained,
               "text_tokenizer": TextTokenizer.from_pretrained}
    for case in ("generator_truncated", "encoder_truncated", "image_tokenizer_truncated", "text_tokenizer_invalid"):
        component, breaks, file, _ = BROKEN[case]
        root = model_with(tmp_path / case, component, breaks)
        with pytest.raises(ModelFolderError) as info:
            loaders[component](root / component)
        assert isinstance(info.value, ValueError) and str(root / component / file) in str(info.value)
        assert "\n" not in str(info.value)
    assert issubclass(EncoderError, ModelFolderError)
    # the shipped components still load
    assert load_generator(SHIPPED / "generator").racm3["generator"]["image_base"] == 2048


# ---------------------------------------------------------------------------------------------
# Options, validated before the model is loaded
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command got as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_model_and_memory", refuse)


BAD_OPTIONS = [
    (["--samples", "0"], "--samples must be between 1 and 64"),
    (["--samples", "1000"], "--samples must be between 1 and 64"),
    (["--guidance", "-1"], "--guidance must be between 0 and 100"),
    (["--guidance", "inf"], "--guidance must be between 0 and 100"),
    (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or between"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or between"),
    (["--temperature", "1e-30"], "--temperature must be 0 (greedy) or between"),
    (["--top-p", "0"], "--top-p must be above 0 and at most 1"),
    (["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
    (["-k", "-1"], "-k must be 0 (no retrieval) or more"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2**70)], "--seed must be between 0 and"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_generate_image_refuses_bad_options_before_loading(no_model, tmp_path: Path, extra, message) -> None:
    out = tmp_path / "o.png"
    one_line_error(run(["generate", "image", "flag: France", "--out", str(out), *extra]), message)
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [b for b in BAD_OPTIONS if b[0][0] in ("--samples", "--temperature", "-k")])
def test_generate_text_refuses_bad_options_before_loading(no_model, tmp_path: Path, extra, message) -> None:
    image = tmp_path / "i.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image)
    one_line_error(run(["generate", "text", str(image), *extra]), message)


@pytest.mark.parametrize("caption", ["", "   ", "\n\t"])
def test_generate_image_refuses_an_empty_caption(no_model, caption: str) -> None:
    one_line_error(run(["generate", "image", caption]), "the caption is empty")


def test_generate_text_of_a_folder_and_memory_search_of_a_folder(no_model, tmp_path: Path) -> None:
    folder = tmp_path / "pictures.png"
    folder.mkdir()
    one_line_error(run(["generate", "text", str(folder)]), str(folder), "is a folder, not an image file")

    from racm3.retrieval import Memory, load_encoder

    enc = load_encoder(None)
    with Memory.create(tmp_path / "memory", enc.name, enc.dim):
        pass
    one_line_error(run(["memory", "search", str(tmp_path / "memory"), "--image", str(folder)]), str(folder),
                   "is a folder, not an image file")


def test_generate_image_refuses_an_out_it_cannot_write_before_generating(no_model, tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    one_line_error(run(["generate", "image", "x", "--out", str(a_file / "sub" / "o.png")]), "is a file, not a folder")
    assert a_file.read_text() == "x" and not (tmp_path / "sub").exists()
    one_line_error(run(["generate", "image", "x", "--out", str(tmp_path)]), "is a folder; give a file name")
    one_line_error(run(["generate", "image", "x", "--out", str(tmp_path / "o.notanimage")]),
                   "needs an image file extension")
    one_line_error(run(["generate", "image", "x", "--out", "/proc/racm3-test/o.png"]), "cannot write into /proc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written, no probe left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_generate_image_refuses_a_read_only_folder(no_model, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(run(["generate", "image", "x", "--out", str(locked / "o.png")]), "cannot write into")
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Options that depend on the model: checked after it loads, before the memory is opened or built
# ---------------------------------------------------------------------------------------------


def test_a_caption_too_long_for_the_context_is_refused_by_its_length(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    caption = "flag: France " * 400  # 5,200 characters, 2,001 tokens: far over the 384-token context
    line = one_line_error(run(["generate", "image", caption, "--memory", str(tmp_path / "nomemory"), "-k", "2"]),
                          "the caption is 2001 tokens long (5200 characters)", "shorten the caption")
    assert "image_base" not in line and "nomemory" not in line  # refused before the memory was opened
    assert not (tmp_path / "racm3-output").exists()


def test_a_k_over_the_context_is_refused(tmp_path: Path) -> None:
    line = one_line_error(run(["generate", "image", "flag: France", "--memory", str(tmp_path / "nomemory"),
                               "-k", "40"]), "k=40 is more documents than the generator's 384-token context holds")
    assert "nomemory" not in line
    image = tmp_path / "i.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image)
    one_line_error(run(["generate", "text", str(image), "--memory", str(tmp_path / "nomemory"), "-k", "40"]),
                   "k=40 is more documents")


# ---------------------------------------------------------------------------------------------
# Output names
# ---------------------------------------------------------------------------------------------


def test_slug_is_unique_for_non_latin_and_long_captions() -> None:
    assert cli._slug("flag: France") == "flag-france"
    assert cli._slug("日本の旗") != cli._slug("中国の旗")
    assert cli._slug("日本の旗").startswith("caption-") and cli._slug("日本の旗") == cli._slug("日本の旗")
    assert cli._slug("café") != cli._slug("caf") and cli._slug("café").startswith("caf-")
    long_a, long_b = "a" * 70 + "x", "a" * 70 + "y"
    assert cli._slug(long_a) != cli._slug(long_b) and len(cli._slug(long_a)) <= 69


def test_default_outputs_never_overwrite_and_out_replaces(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["-k", "0", "--samples", "1", "--json"]
    written = []
    for caption in ["日本の旗", "中国の旗", "日本の旗"]:
        r = run(["generate", "image", caption, *base])
        assert r.exit_code == 0, r.output
        written.append(json.loads(r.stdout.strip().splitlines()[-1])["image"])
    assert len(set(written)) == 3 and all(Path(p).is_file() for p in written)
    assert written[2] == written[0].replace(".png", "-2.png")  # the same caption again: a new name
    before = Path(written[0]).read_bytes()
    assert Image.open(written[0]).size == (64, 64)
    # an existing file at the default name stays as it was
    Path("racm3-output/flag-france.png").write_bytes(b"keep me")
    r = run(["generate", "image", "flag: France", *base])
    assert json.loads(r.stdout.strip().splitlines()[-1])["image"] == "racm3-output/flag-france-2.png"
    assert Path("racm3-output/flag-france.png").read_bytes() == b"keep me"
    assert Path(written[0]).read_bytes() == before
    # --out names a file: it is replaced, atomically (no temporary file left beside it)
    target = tmp_path / "chosen.png"
    target.write_bytes(b"old")
    r = run(["generate", "image", "flag: France", *base, "--out", str(target)])
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(target)).shape == (64, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen.png", "racm3-output"]
    assert not [p for p in Path("racm3-output").iterdir() if p.name.startswith(".")]


def test_save_without_hard_links_still_never_overwrites(tmp_path: Path, monkeypatch) -> None:
    taken = tmp_path / "a.png"
    taken.write_bytes(b"keep me")

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    written = cli.save_output_image(Image.new("RGB", (4, 4), (1, 2, 3)), taken, replace=False)
    assert written == tmp_path / "a-2.png" and taken.read_bytes() == b"keep me"
    assert np.asarray(Image.open(written))[0, 0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-2.png", "a.png"]  # no temporary file left
