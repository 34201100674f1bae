"""The factorized image head: a code predicted in two parts has exactly the probability the returned logits give,
decodes the same with and without the KV cache, survives save/load, and a tiny generator with it learns."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from racm3.generator.decode import Sampling, generate_image_codes, generate_text_ids
from racm3.generator.model import build_model, code_split, get_preset, load_generator, save_generator
from racm3.tokenizers.vocab import Vocab

sys.path.insert(0, str(Path(__file__).parent))
from generator_fixtures import write_shape_dataset, write_tiny_tokenizers  # noqa: E402

LEVELS = (4, 3, 5)  # 60 codes: split (5, 12), first parts 5 rows of the output layer, second parts a 12-way head


def _model(seed: int = 0):
    torch.manual_seed(seed)
    vocab = Vocab(text_size=40, image_size=60)
    return vocab, build_model(replace(get_preset("tiny"), image_head="factorized"), vocab, 16, LEVELS).eval()


def test_code_split_keeps_the_fsq_dimensions_together_and_the_output_layer_small():
    assert code_split(15360, (8, 8, 8, 6, 5)) == (240, 64)  # v2-64: levels 8x8 in one part, 8x6x5 in the other
    assert code_split(60, LEVELS) == (5, 12)
    assert code_split(1024) == (32, 32)  # a VQ codebook: any divisor
    vocab, model = _model()
    assert model.lm_head.weight.shape[0] == vocab.image_offset + 5  # not + 60
    assert model.code_head.weight.shape[0] == 12


def test_factorized_nll_equals_the_softmax_of_the_returned_logits():
    vocab, model = _model()
    ids = torch.randint(0, vocab.size, (3, 20))
    ids[:, 0] = vocab.bos_id
    ids[0, 5:] = vocab.image_to_vocab(torch.arange(15))  # every image code part is exercised
    logits = model(input_ids=ids).logits
    assert logits.shape == (3, 20, vocab.size)
    logp = torch.log_softmax(logits, -1)
    expected = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    nll = model(input_ids=ids, per_token_nll=True).loss
    assert torch.allclose(nll, expected, atol=1e-5)
    # a distribution over the whole vocabulary: image codes' probabilities are products of the two parts
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 20), atol=1e-5)


def test_factorized_generator_decodes_the_same_cached_and_after_save_load(tmp_path):
    vocab, model = _model(1)
    save_generator(model, tmp_path / "g", dtype=torch.float32)
    again = load_generator(tmp_path / "g")
    assert again.split == (5, 12)
    prompts = [[vocab.bos_id, *vocab.text_to_vocab([3, 4, 5]), vocab.img_id], [vocab.bos_id, vocab.img_id]]
    greedy = Sampling(temperature=0)
    cached = generate_image_codes(again, vocab, prompts, 16, 2048, greedy, use_cache=True)
    full = generate_image_codes(model, vocab, prompts, 16, 2048, greedy, use_cache=False)
    assert torch.equal(cached, full) and int(cached.max()) < 60
    text = [[vocab.bos_id, vocab.img_id, *vocab.image_to_vocab(cached[0].tolist()), vocab.img_end_id]]
    assert (generate_text_ids(again, vocab, text, 16, 2048, greedy, max_new_tokens=5, use_cache=True)
            == generate_text_ids(model, vocab, text, 16, 2048, greedy, max_new_tokens=5, use_cache=False))


def test_a_tiny_factorized_generator_learns_fsq_codes(tmp_path):
    from racm3.generator.train import TrainConfig, load_tokenizers, train
    from racm3.tokenizers.image import ImageTokenizer, ImageTokenizerConfig

    write_shape_dataset(tmp_path / "data")
    write_tiny_tokenizers(tmp_path / "tok")
    torch.manual_seed(0)
    fsq = ImageTokenizerConfig(image_size=16, channels=(8, 16, 16), latent_dim=8, quantizer="fsq", fsq_levels=(4, 4, 3))
    ImageTokenizer(fsq).save_pretrained(tmp_path / "tok" / "image_tokenizer")  # 48 codes, split (12, 4)
    preset = {k: v for k, v in asdict(get_preset("tiny")).items() if k != "image_base"}
    (tmp_path / "factorized.json").write_text(json.dumps({**preset, "image_head": "factorized"}))
    cfg = TrainConfig(dataset=tmp_path / "data", out=tmp_path / "run", tokenizers=tmp_path / "tok",
                      preset=str(tmp_path / "factorized.json"), steps=60, batch_size=16, lr=3e-3, warmup=5,
                      log_every=5, eval_every=60, eval_docs=4, progress=False, save_dtype="float32", threads=1)
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    chance = math.log(load_tokenizers(tmp_path / "tok").vocab.size)
    assert log[0]["main"] > 0.8 * chance
    assert log[-1]["main"] < 0.6 * chance, (log[0]["main"], log[-1]["main"], chance)
    assert load_generator(tmp_path / "run").split == (12, 4)
    # it resumes, and starts a fine-tuning run (both check the architecture on the meta device, FSQ levels included)
    assert train(replace(cfg, steps=65, resume=True))["step"] == 65
    tuned = train(replace(cfg, out=tmp_path / "tuned", steps=5, init_from=tmp_path / "run", lr=1e-4, eval_every=5))
    assert tuned["main"] < 0.6 * chance, tuned["main"]


def test_resuming_with_another_image_head_is_one_line_before_the_precomputation(tmp_path, monkeypatch):
    import pytest

    from racm3.generator import train as train_module
    from racm3.generator.train import TrainConfig, train

    write_shape_dataset(tmp_path / "data")
    write_tiny_tokenizers(tmp_path / "tok")
    cfg = TrainConfig(dataset=tmp_path / "data", out=tmp_path / "run", tokenizers=tmp_path / "tok", preset="tiny",
                      steps=4, batch_size=4, warmup=1, log_every=2, eval_every=4, save_every=2, eval_docs=2,
                      progress=False, threads=1)
    train(cfg)
    preset = {k: v for k, v in asdict(get_preset("tiny")).items() if k != "image_base"}
    (tmp_path / "factorized.json").write_text(json.dumps({**preset, "image_head": "factorized"}))
    monkeypatch.setattr(train_module, "precompute", lambda *a: pytest.fail("precomputed before refusing"))
    with pytest.raises(ValueError) as refused:
        train(replace(cfg, preset=str(tmp_path / "factorized.json"), steps=6, resume=True))
    message = str(refused.value)
    assert "checkpoint.safetensors: tensor" in message and "train into a new folder" in message
    assert "\n" not in message


def test_a_factorized_folder_with_a_broken_split_or_unsupported_options_is_refused(tmp_path):
    import pytest

    from racm3.errors import ModelFolderError

    vocab, model = _model()
    save_generator(model, tmp_path / "g", dtype=torch.float32)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**cfg, "code_split": [6, 10]}))
    with pytest.raises(ModelFolderError, match="code_split"):
        load_generator(tmp_path / "g")
    ids = torch.tensor([[vocab.bos_id, vocab.img_id]])
    with pytest.raises(TypeError, match="labels"):
        model(input_ids=ids, labels=ids)
    assert torch.allclose(model(input_ids=ids, logits_to_keep=torch.tensor([1])).logits, model(input_ids=ids).logits[:, 1:],
                          atol=1e-6)
