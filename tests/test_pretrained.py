"""Assembling a model folder from trained components, and the shipped folder's contents."""

from __future__ import annotations

import pytest
import torch

from racm3.pipeline import RACM3
from racm3.pretrained import assemble, shipped_model_dir
from racm3.tokenizers.image import ImageTokenizer


def test_assemble_copies_weights_only_and_loads(tiny_model_dir, tmp_path):
    src, _ = tiny_model_dir
    out = assemble(tmp_path / "m", text_tokenizer=src / "text_tokenizer", image_tokenizer=src / "image_tokenizer",
                   encoder=src / "encoder", generator=src / "generator", generator_k0=src / "generator")
    assert sorted(p.name for p in (out / "generator").iterdir()) == ["config.json", "model.safetensors", "racm3.json"]
    vq = ImageTokenizer.from_pretrained(out / "image_tokenizer")
    assert next(iter(vq.state_dict().values())).dtype == torch.float32  # loaded back as float32 for use
    model = RACM3.from_pretrained(out)
    baseline = RACM3.from_pretrained(out, generator="generator_k0")
    assert model.vocab == baseline.vocab
    # A component folder missing its weights fails and leaves the assembled generator as it was.
    (tmp_path / "broken").mkdir()
    with pytest.raises(FileNotFoundError, match="is missing"):
        assemble(out, generator=tmp_path / "broken")
    assert (out / "generator" / "model.safetensors").exists()


def test_shipped_folder_is_small_and_complete():
    root = shipped_model_dir()
    if not (root / "generator").exists():
        pytest.skip("the shipped generator is not in this checkout yet")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 80 * 2**20
    assert {p.name for p in root.iterdir()} >= {"text_tokenizer", "image_tokenizer", "encoder", "generator"}
    # both generators name the VQ whose codes they were trained on, so a swapped image tokenizer is refused
    import json

    fingerprint = ImageTokenizer.from_pretrained(root / "image_tokenizer").code_fingerprint()
    for name in ("generator", "generator_k0"):
        assert json.loads((root / name / "racm3.json").read_text())["image_codes"] == fingerprint


def test_a_model_folder_carries_its_default_temperatures(tiny_model_dir, tmp_path, monkeypatch):
    """sampling.json (written by assemble) sets what generate_image and generate_text sample at unless told."""
    import json

    from racm3.errors import ModelFolderError
    from racm3.retrieval.memory import Memory

    src, memory_dir = tiny_model_dir
    out = assemble(tmp_path / "m", text_tokenizer=src / "text_tokenizer", image_tokenizer=src / "image_tokenizer",
                   encoder=src / "encoder", generator=src / "generator")
    assert RACM3.from_pretrained(out).sampling == {"image_temperature": 1.0, "text_temperature": 0.7}  # no file
    assemble(out, sampling={"image_temperature": 0.3})
    assemble(out, sampling={"text_temperature": 0.2})  # merged with what is there
    assert json.loads((out / "sampling.json").read_text()) == {"image_temperature": 0.3, "text_temperature": 0.2}
    model = RACM3.from_pretrained(out)
    with Memory.open(memory_dir) as memory:
        run = dict(memory=memory, k=1, num_samples=3, seed=5)
        default = model.generate_image("red circle", **run).codes
        assert torch.equal(default, model.generate_image("red circle", temperature=0.3, **run).codes)
        assert not torch.equal(default, model.generate_image("red circle", temperature=3.0, **run).codes)
        picture = model.generate_image("red circle", **run).image
        import racm3.pipeline

        seen, decode = [], racm3.pipeline.generate_text_ids  # the Sampling text decoding is handed
        monkeypatch.setattr(racm3.pipeline, "generate_text_ids", lambda *a, **kw: seen.append(a[5]) or decode(*a, **kw))
        model.generate_text(picture, **run)
        model.generate_text(picture, temperature=0.9, **run)
        assert [s.temperature for s in seen] == [0.2, 0.9]
    # a bad value is refused before anything is written, and a broken file when the folder loads
    with pytest.raises(ValueError, match="image_temperature must be .* got -1.0"):
        assemble(out, sampling={"image_temperature": -1.0}, generator=src / "broken-on-purpose")
    assert json.loads((out / "sampling.json").read_text())["image_temperature"] == 0.3
    (out / "sampling.json").write_text('{"image_temperature": "hot"}')
    with pytest.raises(ModelFolderError, match="sampling.json.*image_temperature"):
        RACM3.from_pretrained(out)
