"""Encoders: normalised rows, the mixed-document rule, save/load round trips, CLIP loading, a tiny LiT training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from racm3.documents import Document
from racm3.retrieval.encoder import (ClipEncoder, EmojiEncoder, EncoderError, ImageTowerConfig, MiniLMTextTower,
                                     l2_normalize, load_encoder)
from racm3.retrieval.train_encoder import TrainEncoderConfig, lit_loss, train_encoder

TINY = ImageTowerConfig(image_size=16, widths=(8, 16))
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "black": (10, 10, 10)}
SHAPES = ("circle", "square")


def shape_image(colour: str, shape: str, size: int = 16, offset: int = 0) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    box = (3 + offset, 3 + offset, size - 4 + offset, size - 4 + offset)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return im


def shape_docs() -> list[Document]:
    """8 captions x 2 drawings (two offsets stand in for two styles)."""
    return [Document(f"{c}-{s}-{o}", (shape_image(c, s, offset=o), f"{c} {s}"), {"split": "train"})
            for c in COLOURS for s in SHAPES for o in (0, 1)]


@pytest.fixture(scope="module")
def text_tower() -> MiniLMTextTower:
    return MiniLMTextTower()


def test_text_tower_is_minilm_sentence_embedding(text_tower):
    emb = text_tower(["flag: France", "flag: Italy", "pizza"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # MiniLM knows that two flags are closer to each other than to a pizza
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_mixed_document_is_mean_of_normalised_parts(text_tower):
    enc = EmojiEncoder.untrained(TINY, text_tower=text_tower)
    img = shape_image("red", "circle")
    docs = [Document("a", (img, "red circle")), Document("b", ("red circle",)), Document("c", (img,))]
    got = enc.embed_documents(docs)
    t, i = enc.embed_text(["red circle"])[0], enc.embed_image([img])[0]
    np.testing.assert_allclose(got[0], l2_normalize(t + i), atol=1e-5)
    np.testing.assert_allclose(got[1], t, atol=1e-5)
    np.testing.assert_allclose(got[2], i, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_save_load_round_trip_and_name_tracks_weights(tmp_path, text_tower):
    enc = EmojiEncoder.untrained(TINY, seed=0, text_tower=text_tower)
    enc.save_pretrained(tmp_path / "a", fp16=False)
    back = EmojiEncoder.from_pretrained(tmp_path / "a", text_tower=text_tower)
    imgs = [shape_image(c, "square") for c in COLOURS]
    np.testing.assert_allclose(back.embed_image(imgs), enc.embed_image(imgs), atol=1e-6)
    assert back.name == enc.name
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "racm3-emoji-encoder"
    other = EmojiEncoder.untrained(TINY, seed=1, text_tower=text_tower)
    assert other.name != enc.name  # another tower, another identity: its memories stay apart
    assert isinstance(load_encoder(tmp_path / "a"), EmojiEncoder)


def test_fp16_weights_keep_embeddings(tmp_path, text_tower):
    enc = EmojiEncoder.untrained(TINY, text_tower=text_tower)
    enc.save_pretrained(tmp_path, fp16=True)
    back = EmojiEncoder.from_pretrained(tmp_path, text_tower=text_tower)
    imgs = [shape_image(c, s) for c in COLOURS for s in SHAPES]
    cos = np.sum(back.embed_image(imgs) * enc.embed_image(imgs), axis=1)
    assert cos.min() > 0.999


def test_missing_encoder_folder_says_how_to_fix(tmp_path):
    with pytest.raises(EncoderError, match="racm3 train encoder|config.json"):
        load_encoder(tmp_path / "nowhere")


def test_lit_loss_counts_same_caption_images_as_positives():
    import torch

    text = torch.nn.functional.normalize(torch.eye(3), dim=-1)  # 3 captions, orthogonal
    img = text[torch.tensor([0, 0, 1])]  # two images of caption 0, one of caption 1, perfectly aligned
    loss, parts = lit_loss(img, torch.tensor([0, 0, 1]), text, torch.tensor(np.log(100.0)))
    assert parts["i2t"] < 1e-3 and parts["t2i"] < 1e-3  # duplicates are not punished as negatives


@pytest.mark.parametrize("precision", ["fp32", "auto"])  # the shipped tower's fp32; bf16 autocast where supported
def test_tiny_lit_training_beats_chance_and_resumes_only_when_asked(tmp_path, text_tower, precision):
    docs = shape_docs()
    cfg = TrainEncoderConfig(epochs=40, batch_size=16, lr=3e-3, warmup_steps=5, tower=TINY, max_shift=0.05,
                             precision=precision)
    enc = train_encoder(docs, tmp_path, cfg, text_tower=text_tower, progress=False, log=lambda m: None)
    captions = sorted({d.text for d in docs})
    sims = enc.embed_image([d.image for d in docs]) @ enc.embed_text(captions).T  # (16, 8)
    top1 = np.mean([captions[j] == d.text for d, j in zip(docs, sims.argmax(1))])
    assert top1 >= 0.75  # chance is 1/8
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "checkpoint.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):  # never resumed (or started over) silently
        train_encoder(docs, tmp_path, cfg, text_tower=text_tower, progress=False, log=lambda m: None)
    # resuming a finished run trains nothing more and returns the same weights
    again = train_encoder(docs, tmp_path, cfg, text_tower=text_tower, progress=False, log=lambda m: None, resume=True)
    assert again.name == enc.name
    with pytest.raises(ValueError, match="another training config"):
        train_encoder(docs, tmp_path, TrainEncoderConfig(epochs=40, batch_size=8, tower=TINY, precision=precision),
                      text_tower=text_tower, progress=False, log=lambda m: None, resume=True)


def make_tiny_clip(path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), ":", ":</w>", "re</w>"]:
        vocab[tok] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nr e</w>\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def test_clip_encoder_from_tiny_random_checkpoint(tmp_path):
    make_tiny_clip(tmp_path / "clip")
    enc = load_encoder(tmp_path / "clip")
    assert isinstance(enc, ClipEncoder) and enc.dim == 16
    t = enc.embed_text(["red circle", "blue square", "red circle"])
    i = enc.embed_image([shape_image("red", "circle", size=40), shape_image("blue", "square", size=24)])
    assert t.shape == (3, 16) and i.shape == (2, 16) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(np.vstack([t, i]), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)  # deterministic
    assert not np.allclose(t[0], t[1])
    doc = enc.embed_documents([Document("d", ("red circle", shape_image("red", "circle", size=40)))])[0]
    np.testing.assert_allclose(doc, l2_normalize(t[0] + i[0]), atol=1e-5)
    assert ClipEncoder.from_pretrained(tmp_path / "clip").name == enc.name


def test_retrieval_eval_reports_the_ceiling_that_same_pictures_set(tmp_path, text_tower):
    from racm3.retrieval.evaluate import memory_recall
    from racm3.retrieval.memory import Memory

    docs = shape_docs()
    # a second caption drawn as the very same picture (as flag: France / flag: St. Martin are): one query
    docs.append(Document("twin", (shape_image("red", "circle"), "scarlet disc"), {"split": "train"}))
    enc = EmojiEncoder.untrained(TINY, text_tower=text_tower)
    mem = Memory.create(tmp_path / "m", enc.name, enc.dim)
    mem.add(docs, enc.embed_documents(docs))
    got = memory_recall(mem, enc, docs)
    assert got["image_to_text_ceiling_recall@1"] == pytest.approx(16 / 17)
    # "red circle" and "scarlet disc" ask with one picture: at most one of them finds its own document first
    assert got["image_to_text"]["recall@1"] <= 16 / 17
    assert got["image_to_text_identical_images_equal"]["recall@1"] >= got["image_to_text"]["recall@1"]
