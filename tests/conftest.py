"""Shared fixtures: one tiny generator trained once per test session on the shapes data; `memories`, the memory
tests' memories on each backend (memory_backends.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tests.memory_backends import memories  # noqa: E402,F401 (a fixture)

STEPS = 80


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(root, TrainConfig, MultimodalTokenizer, generator): a tiny generator trained STEPS steps (lessons only).

    It trains the v1 recipe, which the tests using it were written against (test_recipe.py trains v2)."""
    from generator_fixtures import write_shape_dataset, write_tiny_tokenizers

    from racm3.generator.data import RECIPES
    from racm3.generator.model import load_generator
    from racm3.generator.train import TrainConfig, load_tokenizers, train

    root = tmp_path_factory.mktemp("gen")
    write_shape_dataset(root / "data")
    write_tiny_tokenizers(root / "tok")
    cfg = TrainConfig(dataset=root / "data", out=root / "run", tokenizers=root / "tok", preset="tiny", steps=STEPS,
                      batch_size=16, lr=3e-3, warmup=5, log_every=5, eval_every=20, save_every=20, eval_docs=8,
                      progress=False, save_dtype="float32", threads=1, snapshot_every=40,
                      recipe=RECIPES["v1"])
    train(cfg)
    return root, cfg, load_tokenizers(root / "tok"), load_generator(root / "run")


@pytest.fixture(scope="session")
def tiny_model_dir(trained, tmp_path_factory):
    """A complete model folder (tokenizers, an untrained emoji encoder, the tiny generator) and a memory of shapes."""
    import shutil

    from generator_fixtures import shape_documents

    from racm3.retrieval.encoder import EmojiEncoder, ImageTowerConfig
    from racm3.retrieval.memory import Memory

    root, *_ = trained
    model_dir = tmp_path_factory.mktemp("model")
    shutil.copytree(root / "tok" / "text_tokenizer", model_dir / "text_tokenizer")
    shutil.copytree(root / "tok" / "image_tokenizer", model_dir / "image_tokenizer")
    shutil.copytree(root / "run", model_dir / "generator", ignore=shutil.ignore_patterns("checkpoint.safetensors", "cache.json"))
    EmojiEncoder.untrained(ImageTowerConfig(image_size=16, widths=(8, 16))).save_pretrained(model_dir / "encoder")
    from racm3.retrieval.encoder import load_encoder

    encoder = load_encoder(model_dir / "encoder")
    with Memory.create(model_dir.parent / "shapes-memory", encoder.name, encoder.dim) as memory:
        memory.add_documents(shape_documents(), encoder)
    return model_dir, model_dir.parent / "shapes-memory"
