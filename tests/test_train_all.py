"""Issue 16, item 1: `racm3 train all` takes a data set the test makes (Parquet, WebDataset) to a model folder that
loads, generates both ways and passes the loader's identity checks; a second run skips every stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from generator_fixtures import shape_documents
from test_cli_errors import one_line_error
from test_encoder import make_tiny_clip
from test_readers import encode, write_source

from racm3.cli import app

STAGES = ["data", "text-tokenizer", "image-tokenizer", "encoder", "assemble-tokenizers", "memory", "generator",
          "generator-k0", "assemble-generators"]
# tiny presets and about 1% of every trainer's default length: the whole pipeline in seconds
TINY = ["--image-tokenizer-preset", "tiny", "--generator-preset", "tiny", "--steps-scale", "0.01", "--device", "cpu"]


def shapes_dataset(fmt: str, root: Path) -> Path:
    """48 coloured shapes (16x16) with captions and no split field: train all must make the split itself."""
    return write_source(fmt, root, [(d.id, encode(d.image), d.text) for d in shape_documents()])


def run(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("fmt, clip", [("parquet", False), ("webdataset", True)])
def test_train_all_makes_a_model_that_generates_both_ways(tmp_path: Path, fmt: str, clip: bool) -> None:
    from racm3.pipeline import RACM3
    from racm3.retrieval.encoder import ClipEncoder
    from racm3.retrieval.memory import Memory

    dataset, out = shapes_dataset(fmt, tmp_path / "src"), tmp_path / "run"
    extra = []
    if clip:  # a given CLIP instead of training the image tower
        make_tiny_clip(tmp_path / "clip")
        extra = ["--encoder", f"clip:{tmp_path / 'clip'}"]
    result = run(["train", "all", dataset, out, *TINY, *extra])
    assert result.exit_code == 0, (result.output, result.exception)

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["stages"]}
    assert [r["stage"] for r in summary["stages"]] == STAGES
    assert all(r["status"] == "ran" and r["seconds"] >= 0 and r["bytes"] > 0 for r in rows.values())
    data = rows["data"]["quality"]
    assert data["documents"] == 48 and data["heldout"] > 0 and data["train"] + data["heldout"] == 48
    assert rows["text-tokenizer"]["quality"]["heldout_tokens_per_caption"] > 0
    assert rows["image-tokenizer"]["quality"]["heldout_psnr"] > 0
    assert 0 <= rows["memory"]["quality"]["image_to_own_doc_recall@1"] <= 1
    assert "train_loss" in rows["generator"]["quality"] and "train_loss" in rows["generator-k0"]["quality"]
    assert "image-tokenizer" in result.output and "assemble-generators" in result.output  # the table

    model = RACM3.from_pretrained(out / "model", device="cpu")  # check_vocab: the code fingerprint
    assert model.generator.racm3["image_codes"] == model.tokenizer.image_code_fingerprint()
    assert isinstance(model.encoder, ClipEncoder) == clip
    with Memory.open(out / "memory") as memory:
        assert memory.info()["encoder"] == model.encoder.name and len(memory) == 48
        image = model.generate_image("red circle", memory=memory, k=1, num_samples=1)
        assert image.image.size == (16, 16) and len(image.sources) == 1
        caption = model.generate_text(image.image, memory=memory, k=1, num_samples=1)
        assert isinstance(caption.text, str) and caption.sources
    baseline = RACM3.from_pretrained(out / "model", generator="generator_k0", device="cpu")
    assert baseline.generate_image("red circle", k=0, num_samples=1).image.size == (16, 16)

    t0 = time.perf_counter()
    again = run(["train", "all", dataset, out, *TINY, *extra])
    assert again.exit_code == 0, (again.output, again.exception)
    assert time.perf_counter() - t0 < 10
    assert again.output.count("done already, skipped") == len(STAGES)
    rerun = json.loads((out / "summary.json").read_text())["stages"]
    assert [r["status"] for r in rerun] == ["skipped"] * len(STAGES)
    assert [r["seconds"] for r in rerun] == [rows[s]["seconds"] for s in STAGES]  # the times of the run that made them

    # a damaged row is one line naming it and the fix
    row = out / "stages" / "memory.json"
    intact = row.read_text()
    row.write_text(intact[:20])
    one_line_error(run(["train", "all", dataset, out, *TINY, *extra]), str(row), "delete it")
    row.write_text(intact)

    # a done stage is never reused with other settings
    changed = run(["train", "all", dataset, out, *TINY[:2], "--generator-preset", "emoji-small", *TINY[4:], *extra])
    one_line_error(changed, "generator.json", "emoji-small")

    # a stage whose row is gone runs again (a trainer resumes from its checkpoint), and so must every later one
    (out / "stages" / "generator.json").unlink()
    one_line_error(run(["train", "all", dataset, out, *TINY, *extra]), "generator", "generator-k0",
                   "assemble-generators")
    for name in ("generator-k0", "assemble-generators"):
        (out / "stages" / f"{name}.json").unlink()
    resumed = run(["train", "all", dataset, out, *TINY, *extra])
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    resumed_rows = json.loads((out / "summary.json").read_text())["stages"]
    assert [r["status"] for r in resumed_rows] == ["skipped"] * 6 + ["ran"] * 3
    # the generators were at their last step already: their quality comes from their logs, not lost
    assert [r["quality"] for r in resumed_rows[6:8]] == [rows["generator"]["quality"], rows["generator-k0"]["quality"]]
    RACM3.from_pretrained(out / "model", device="cpu")


def test_generators_side_by_side_train_what_one_after_the_other_does(tmp_path: Path) -> None:
    """On a CPU the RA generator and its baseline train at once, a process each: the same weights (one thread
    each, the same seeds) and rows as one after the other, with a line of progress while they run."""
    import os

    from racm3.generator.model import load_generator
    from racm3.train_all import TrainAllOptions, train_all

    dataset = shapes_dataset("parquet", tmp_path / "src")
    runs, logs = {}, {}
    # two cores at most, so each side-by-side process gets one thread, and one thread for everything else: the
    # same floating-point work in both runs on any machine
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, sorted(cores)[:2])
    torch.set_num_threads(1)
    try:
        for together in (True, False):
            out, lines = tmp_path / f"together-{together}", []
            opts = TrainAllOptions(dataset, out, image_tokenizer_preset="tiny", generator_preset="tiny",
                                   device="cpu", steps_scale=0.01, side_by_side=together)
            runs[together] = {r["stage"]: r for r in train_all(opts, log=lines.append)["stages"]}
            logs[together] = "\n".join(lines)
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
    assert "side by side, 1 thread(s) each" in logs[True] and "side by side" not in logs[False]
    assert "generator: step 15/15" in logs[True] and "generator-k0: step 15/15" in logs[True]
    for stage, part in (("generator", "generator"), ("generator-k0", "generator_k0")):
        assert runs[True][stage]["settings"] == runs[False][stage]["settings"]
        assert runs[True][stage]["quality"]["train_loss"] == pytest.approx(runs[False][stage]["quality"]["train_loss"])
        a, b = (load_generator(tmp_path / f"together-{t}" / "model" / part).state_dict() for t in (True, False))
        assert all(torch.equal(a[n], b[n]) for n in a), stage


def test_a_generator_that_fails_side_by_side_is_one_line_and_the_other_trains_on(tmp_path: Path) -> None:
    """One of the two side-by-side trainings stops with an error: it is logged when it happens, the other trains to
    its end and saves, and the first error is raised (the command's one line)."""
    from dataclasses import replace

    from racm3.train_all import TrainAllOptions, _train_side_by_side, plan, train_all

    dataset, out = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "run"
    opts = TrainAllOptions(dataset, out, image_tokenizer_preset="tiny", generator_preset="tiny", device="cpu",
                           steps_scale=0.01, side_by_side=False)
    train_all(opts, log=lambda m: None)  # the stages the generators read: data, tokenizers, memory
    stages = {s.name: s for s in plan(opts, log=lambda m: None)}
    ra = replace(stages["generator"], training=replace(stages["generator"].training, out=tmp_path / "again"))
    k0 = replace(stages["generator-k0"], training=replace(stages["generator-k0"].training, dataset=tmp_path / "gone"))
    lines: list[str] = []
    with pytest.raises(FileNotFoundError, match="gone"):
        _train_side_by_side([ra, k0], lines.append)
    assert any(line.startswith("  generator-k0 stopped:") and "the other goes on" in line for line in lines), lines
    assert (tmp_path / "again" / "model.safetensors").is_file() and "generator: step 15/15" in lines[-1]


def test_the_emoji_small_pipeline_is_the_shipped_models_training(tmp_path: Path, monkeypatch) -> None:
    """`--pipeline emoji-small` (what scripts/train_emoji_small.sh runs) plans the settings the shipped model was
    trained with, stage by stage (the script's commands before it called train all, commit 7df5efb), and the
    architectures it plans are the shipped folders' own."""
    from dataclasses import asdict

    import racm3.train_all
    from racm3.generator.model import GeneratorConfig, get_preset
    from racm3.pretrained import shipped_model_dir
    from racm3.retrieval.encoder import load_encoder
    from racm3.retrieval.train_encoder import TrainEncoderConfig
    from racm3.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from racm3.tokenizers.image_train import preset_train_config
    from racm3.tokenizers.text import TextTokenizer

    planned = {}

    def plan_only(opts, log):
        stages = racm3.train_all.plan(opts, log)
        planned.update({s.name: (s.settings, s.training) for s in stages})
        raise ValueError("planned")

    monkeypatch.setattr(racm3.train_all, "train_all", plan_only)
    dataset, out = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "run"
    one_line_error(run(["train", "all", dataset, out, "--pipeline", "emoji-small"]), "planned")
    warmup = preset_train_config("emoji-8x8").warmup
    assert planned["text-tokenizer"][0] == {}  # 2,048 pieces, the trainer's default
    assert planned["image-tokenizer"][0] == {"preset": "emoji-8x8", "steps": 1500, "warmup": warmup}
    assert preset_train_config("emoji-8x8").precision == "fp32"
    assert planned["encoder"][0] == {"epochs": 45, "precision": "fp32"}
    for stage, batch, k in (("generator", 24, 2), ("generator-k0", 64, 0)):
        settings, training = planned[stage]
        assert settings == {"preset": "emoji-small", "steps": 1200, "batch_size": batch, "recipe": "v1"}
        assert training.recipe.k == k and training.lr == 1e-3 and training.snapshot_every == 200
        assert training.eval_every == 10 and training.memory == (out / "memory" if k else None)
        assert (training.memory is None) == (k == 0)

    shipped = shipped_model_dir()
    assert ImageTokenizer.from_pretrained(shipped / "image_tokenizer").config == ImageTokenizerConfig.from_preset("emoji-8x8")
    assert TextTokenizer.from_pretrained(shipped / "text_tokenizer").vocab_size == 2048
    assert load_encoder(shipped / "encoder").config == TrainEncoderConfig().tower
    for part in ("generator", "generator_k0"):
        trained = json.loads((shipped / part / "racm3.json").read_text())["generator"]
        assert {**asdict(GeneratorConfig()), **trained} == asdict(get_preset("emoji-small")), part
    assert not out.exists()
    # a pipeline file is checked whole before anything runs: one line naming the file and the field
    bad = tmp_path / "bad.json"
    bad.write_text((Path(racm3.train_all.__file__).parent / "pipelines" / "v2.json").read_text()
                   .replace('"recipe": "v2"', '"recipe": "v9"', 1))
    one_line_error(run(["train", "all", dataset, out, "--pipeline", bad]), str(bad), "generator.recipe", "v9")
    v2_text = (Path(racm3.train_all.__file__).parent / "pipelines" / "v2.json").read_text()
    for field, good, bad_value, expected in (
            ("image_tokenizer", '{"preset": null}', '{"preset": "v2-64", "then": "emoji-8x8"}',
             "image_tokenizer.then emoji-8x8 is another architecture than v2-64"),
            ("text_tokenizer", '{"vocab_size": 2048}', '{"given": "%s"}' % tmp_path,
             "text_tokenizer.given"),
            ("text_tokenizer", '{"vocab_size": 2048}', '{"vocab_size": 100}', "vocab_size must be >= 257"),
            ("encoder", '{"epochs": 24, "precision": "auto"}', '{"given": ""}', "encoder.given ''")):
        assert good in v2_text
        bad.write_text(v2_text.replace(good, bad_value))
        one_line_error(run(["train", "all", dataset, out, "--pipeline", bad]), str(bad), expected)
    one_line_error(run(["train", "all", dataset, out, "--pipeline", "nope"]), "unknown pipeline preset 'nope'",
                   "emoji-small")
    one_line_error(run(["train", "all", dataset, out, "--pipeline", "emoji-small", "--from", shipped]),
                   "drop --pipeline emoji-small")
    one_line_error(run(["train", "all", dataset, out, "--pipeline", "emoji-small", "--image-size", "128"]),
                   "emoji-8x8", "--image-size 128")
    assert not out.exists()


def test_the_emoji_v2_pipeline_is_the_shipped_v2_models_training(tmp_path: Path, monkeypatch) -> None:
    """`--pipeline emoji-v2` plans what scripts/train_emoji_v2.sh ran before it called train all (commit 7df5efb,
    with the aligned RA preset and the 0.5 image temperature emoji-v2 shipped with): emoji-small's text tokenizer
    and encoder as they are, v2-64 then its decoder alone, 1,000 generator steps of 16 and 32; and the shipped
    emoji-v2 folders' architectures."""
    from dataclasses import asdict

    import racm3.train_all
    from racm3.generator.model import GeneratorConfig, get_preset
    from racm3.pretrained import PRETRAINED_DIR
    from racm3.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from racm3.tokenizers.image_train import preset_train_config

    planned = {}

    def plan_only(opts, log):
        planned.update({s.name: (s.settings, s.training) for s in racm3.train_all.plan(opts, log)})
        raise ValueError("planned")

    monkeypatch.setattr(racm3.train_all, "train_all", plan_only)
    dataset, out = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "run"
    one_line_error(run(["train", "all", dataset, out, "--pipeline", "emoji-v2"]), "planned")
    small, v2 = PRETRAINED_DIR / "emoji-small", PRETRAINED_DIR / "emoji-v2"
    assert planned["text-tokenizer"][0] == {"given": str(small / "text_tokenizer")}
    assert planned["encoder"][0] == {"given": str(small / "encoder")}
    schedule = {p: {"steps": preset_train_config(p).steps, "warmup": preset_train_config(p).warmup}
                for p in ("v2-64", "v2-64-decoder")}
    assert schedule["v2-64-decoder"] == {"steps": 1500, "warmup": 50}
    assert planned["image-tokenizer"][0] == {"preset": "v2-64", **schedule["v2-64"],
                                             "then": {"preset": "v2-64-decoder", **schedule["v2-64-decoder"]}}
    for stage, preset, batch in (("generator", "v2-small-aligned", 16), ("generator-k0", "v2-small", 32)):
        settings, training = planned[stage]
        assert settings == {"preset": preset, "steps": 1000, "batch_size": batch}
        assert training.eval_every == 50 and training.snapshot_every == 200 and training.recipe.k == (stage == "generator") * 2
    assert planned["assemble-generators"][0] == {"sampling": {"image_temperature": 0.5}}
    assert json.loads((v2 / "sampling.json").read_text()) == {"image_temperature": 0.5}
    assert ImageTokenizer.from_pretrained(v2 / "image_tokenizer").config == ImageTokenizerConfig.from_preset("v2-64")
    for part, preset in (("generator", "v2-small-aligned"), ("generator_k0", "v2-small")):
        trained = json.loads((v2 / part / "racm3.json").read_text())["generator"]
        assert {**asdict(GeneratorConfig()), **trained} == asdict(get_preset(preset)), part
    # --image-tokenizer-preset replaces the whole image tokenizer stage, its second training included
    one_line_error(run(["train", "all", dataset, out, "--pipeline", "emoji-v2", "--image-tokenizer-preset", "v2-64"]),
                   "planned")
    assert planned["image-tokenizer"][0] == {"preset": "v2-64", **schedule["v2-64"]}
    assert not out.exists()


def test_a_pipeline_of_ones_own_with_given_parts_and_a_second_tokenizer_training(tmp_path: Path) -> None:
    """A PIPELINE.json of one's own: the shipped text tokenizer and encoder as they are, the image tokenizer
    trained and then its decoder alone from those weights (the codes unchanged), a sampling temperature."""
    import racm3.tokenizers.image as image_module
    from racm3.pipeline import RACM3
    from racm3.pretrained import read_sampling, shipped_model_dir
    from racm3.tokenizers.image import ImageTokenizer

    tiny = json.loads((Path(image_module.__file__).parent / "image_presets" / "tiny.json").read_text())
    decoder = tmp_path / "tiny-decoder.json"
    decoder.write_text(json.dumps({"model": tiny["model"], "train": {"decoder_only": True, "lr": 1e-3}}))
    generator = {"preset": "tiny", "recipe": "v2", "steps": 4, "batch_size": 4, "eval_every": 10, "snapshot_every": 0}
    pipeline = tmp_path / "mine.json"
    pipeline.write_text(json.dumps({
        "about": "a test's", "text_tokenizer": {"given": "emoji-small"},
        "image_tokenizer": {"preset": "tiny", "then": str(decoder)}, "encoder": {"given": str(shipped_model_dir())},
        "generator": generator, "generator_k0": generator, "sampling": {"image_temperature": 0.7}}))
    dataset, out = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "run"
    result = run(["train", "all", dataset, out, "--pipeline", pipeline, "--steps-scale", "0.01", "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)

    rows = {r["stage"]: r for r in json.loads((out / "summary.json").read_text())["stages"]}
    shipped = shipped_model_dir()
    assert rows["text-tokenizer"]["settings"] == {"given": str(shipped / "text_tokenizer")}
    assert rows["encoder"]["settings"] == {"given": str(shipped / "encoder")}
    assert not (out / "text_tokenizer").exists() and not (out / "encoder").exists()
    assert (out / "model" / "text_tokenizer" / "tokenizer.json").read_bytes() == \
        (shipped / "text_tokenizer" / "tokenizer.json").read_bytes()
    first, final = (ImageTokenizer.from_pretrained(out / name).state_dict()
                    for name in ("image_tokenizer/first-tiny", "image_tokenizer"))
    encoder_side = [n for n in first if not n.startswith("decoder.")]
    assert encoder_side and all(torch.equal(first[n], final[n]) for n in encoder_side)  # the codes are the first's
    assert any(not torch.equal(first[n], final[n]) for n in first if n.startswith("decoder."))
    assert rows["assemble-generators"]["settings"] == {"sampling": {"image_temperature": 0.7}}
    assert read_sampling(out / "model")["image_temperature"] == 0.7
    model = RACM3.from_pretrained(out / "model", device="cpu")
    assert model.generate_image("red circle", k=0, num_samples=1).image.size == (16, 16)


def test_from_a_model_keeps_or_fine_tunes_its_generators_on_its_tokenizers(tmp_path: Path) -> None:
    """--from MODEL: MODEL's tokenizers are used as they are (measured, not trained), and so are its generators;
    with --generator-steps N they are fine-tuned from MODEL's: after a few steps their weights are still near the
    start's, not a fresh init's."""
    from racm3.generator.model import load_generator
    from racm3.pipeline import RACM3
    from racm3.retrieval.memory import Memory

    dataset, first = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "first"
    assert run(["train", "all", dataset, first, *TINY]).exit_code == 0
    start = (first / "model").resolve()

    def weights(folder: Path) -> dict:
        return load_generator(folder).state_dict()

    for name, extra in (("kept", []), ("tuned", ["--generator-steps", "3"])):
        out = tmp_path / name
        result = run(["train", "all", dataset, out, "--from", first / "model", *TINY[4:], *extra])
        assert result.exit_code == 0, (result.output, result.exception)
        rows = {r["stage"]: r for r in json.loads((out / "summary.json").read_text())["stages"]}
        assert list(rows) == STAGES and all(r["status"] == "ran" for r in rows.values())
        again = run(["train", "all", dataset, out, "--from", first / "model", *TINY[4:], *extra])
        assert again.exit_code == 0 and again.output.count("done already, skipped") == len(STAGES), again.output
        assert rows["text-tokenizer"]["settings"] == rows["image-tokenizer"]["settings"] == {"given": str(start)}
        assert rows["image-tokenizer"]["quality"]["heldout_psnr"] > 0  # the given tokenizer, measured on this data
        assert not (out / "text_tokenizer").exists() and not (out / "image_tokenizer").exists()
        for stage, part in (("generator", "generator"), ("generator-k0", "generator_k0")):
            before, after = weights(start / part), weights(out / "model" / part)
            moved = sum((after[n].float() - before[n].float()).norm() ** 2 for n in before) ** 0.5
            size = sum(before[n].float().norm() ** 2 for n in before) ** 0.5
            if name == "kept":
                assert rows[stage]["settings"] == {"given": str(start / part)} and moved == 0
            else:
                assert rows[stage]["settings"]["init_from"] == str(start / part)
                assert rows[stage]["settings"]["steps"] == 3 and rows[stage]["settings"]["preset"] == "tiny"
                assert 0 < moved < 0.2 * size, (stage, moved, size)

        model = RACM3.from_pretrained(out / "model", device="cpu")
        assert model.tokenizer.image_code_fingerprint() == RACM3.from_pretrained(start).tokenizer.image_code_fingerprint()
        with Memory.open(out / "memory") as memory:
            image = model.generate_image("red circle", memory=memory, k=1, num_samples=1).image
            assert image.size == (16, 16)
            assert isinstance(model.generate_text(image, memory=memory, k=1, num_samples=1).text, str)


def test_missing_dataset_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    result = run(["train", "all", tmp_path / "nowhere", tmp_path / "run", *TINY])
    one_line_error(result, str(tmp_path / "nowhere"), "no such file or folder")
    assert not (tmp_path / "run").exists()


def test_bad_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    dataset = shapes_dataset("parquet", tmp_path / "src")
    one_line_error(run(["train", "all", dataset, tmp_path / "run", "--image-size", "96"]), "--image-size", "96")
    one_line_error(run(["train", "all", dataset, tmp_path / "run", "--image-size", "64", *TINY]),
                   "tiny", "16 px", "--image-size 64")
    short = run(["train", "all", dataset, tmp_path / "run", "--image-size", "256", "--generator-preset", "emoji-small"])
    assert one_line_error(short) == (
        "error: generator preset emoji-small (--generator-preset, or the pipeline's): its 384-token context cannot "
        "hold a retrieved document beside the main one at 256 codes per image (v2-256: 552 tokens); choose a generator preset with a longer context: "
        "medium, v2-small, v2-small-aligned, v2-small-copy or a PRESET.json with max_len >= 552")
    assert not (tmp_path / "run").exists()


def test_bad_from_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    from racm3.pretrained import shipped_model_dir

    dataset, out, shipped = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "run", shipped_model_dir()
    one_line_error(run(["train", "all", dataset, out, "--from", tmp_path]), f"--from {tmp_path}", "no text_tokenizer/")
    one_line_error(run(["train", "all", dataset, out, "--from", shipped, "--image-size", "128"]),
                   "draws 64 px", "--image-size 128")
    one_line_error(run(["train", "all", dataset, out, "--from", shipped, "--generator-preset", "emoji-small"]),
                   "generators as they are", "drop --generator-preset")
    one_line_error(run(["train", "all", dataset, out, "--from", shipped, "--image-tokenizer-preset", "tiny"]),
                   "drop --image-tokenizer-preset")
    one_line_error(run(["train", "all", dataset, out, "--generator-steps", "0"]), "--generator-steps", "needs --from")
    one_line_error(run(["train", "all", dataset, out, "--from", shipped, "--generator-steps", "-1"]),
                   "--generator-steps must be >= 0 with --from", "got -1")
    assert not out.exists()


def test_default_options_pass_every_check(tmp_path: Path, monkeypatch) -> None:
    """`racm3 train all DATASET OUT` with no option, and with each --image-size, is planned and checked (the
    image tokenizer's codes fit the generator's context) without training: train_all is replaced by plan."""
    import racm3.train_all

    planned = {}

    def plan_only(opts, log):
        planned.update({s.name: s.settings for s in racm3.train_all.plan(opts, log)})
        raise ValueError("planned")

    monkeypatch.setattr(racm3.train_all, "train_all", plan_only)
    dataset, out = shapes_dataset("parquet", tmp_path / "src"), tmp_path / "run"
    for size in (None, 64, 128, 256):
        one_line_error(run(["train", "all", dataset, out, *(["--image-size", size] if size else [])]), "planned")
        assert planned["image-tokenizer"]["preset"] == f"v2-{size or 64}"
        assert planned["generator"]["preset"] == "v2-small-aligned" and planned["generator-k0"]["preset"] == "v2-small"
        assert planned["assemble-generators"] == {"sampling": {"image_temperature": 0.5}}
    # --steps-scale scales the whole schedule: a warm-up of 1% of the steps stays 1%
    sharp = tmp_path / "sharp.json"
    sharp.write_text(json.dumps({"model": {"image_size": 64, "channels": [8, 16, 16], "quantizer": "fsq",
                                           "fsq_levels": [5, 5, 5]},
                                 "train": {"steps": 10000, "warmup": 100}}))
    one_line_error(run(["train", "all", dataset, out, "--steps-scale", "0.1", "--image-tokenizer-preset", sharp]),
                   "planned")
    assert planned["image-tokenizer"] == {"preset": str(sharp), "steps": 1000, "warmup": 10}
    # --from the shipped model: its tokenizers and generators; with --generator-steps, fine-tuned from its generators
    from racm3.pretrained import shipped_model_dir
    from racm3.train_all import FINE_TUNE

    shipped = shipped_model_dir().resolve()
    one_line_error(run(["train", "all", dataset, out, "--from", shipped]), "planned")
    assert planned["text-tokenizer"] == planned["image-tokenizer"] == {"given": str(shipped)}
    assert planned["generator"] == {"given": str(shipped / "generator")}
    one_line_error(run(["train", "all", dataset, out, "--from", shipped, "--generator-steps", "300"]), "planned")
    assert planned["generator"] == {"preset": "emoji-small", **FINE_TUNE, "steps": 300, "batch_size": 24,
                                    "init_from": str(shipped / "generator")}
    assert planned["generator-k0"]["init_from"] == str(shipped / "generator_k0")
    # each generator fine-tunes under its own preset: emoji-v2's RA generator is aligned, its baseline is not
    v2 = shipped.parent / "emoji-v2"
    one_line_error(run(["train", "all", dataset, out, "--from", v2, "--generator-steps", "10"]), "planned")
    assert planned["generator"]["preset"] == "v2-small-aligned" and planned["generator-k0"]["preset"] == "v2-small"
    # from nothing, --generator-steps replaces the scaled default
    one_line_error(run(["train", "all", dataset, out, "--generator-steps", "40"]), "planned")
    assert planned["generator"]["steps"] == planned["generator-k0"]["steps"] == 40
    assert not out.exists()
