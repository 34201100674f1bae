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
