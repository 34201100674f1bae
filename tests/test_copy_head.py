"""The copy head (a pointer over earlier positions' next text tokens): its probabilities are a distribution the
training loss agrees with, it copies exactly what the context offers, decodes the same with and without the KV
cache, survives save/load, starts a fine-tuning from a generator without it, and a tiny model with it learns to
copy tokens it has never been trained on."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from racm3.generator.decode import Sampling, generate_text_ids
from racm3.generator.model import build_model, get_preset, load_generator, save_generator
from racm3.tokenizers.vocab import Vocab

sys.path.insert(0, str(Path(__file__).parent))
from generator_fixtures import write_shape_dataset, write_tiny_tokenizers  # noqa: E402

VOCAB = Vocab(text_size=40, image_size=60)


def _model(seed: int = 0, image_head: str = "full"):
    torch.manual_seed(seed)
    cfg = replace(get_preset("tiny"), image_head=image_head, copy_head=True)
    return build_model(cfg, VOCAB, 16, (4, 3, 5)).eval()


def _text(n: int, batch: int = 2) -> torch.Tensor:
    ids = torch.randint(VOCAB.text_offset, VOCAB.image_offset, (batch, n))
    ids[:, 0] = VOCAB.bos_id
    return ids


@pytest.mark.parametrize("image_head", ["full", "factorized"])
def test_the_mixture_is_a_distribution_and_the_training_loss_is_its_nll(image_head):
    model = _model(image_head=image_head)
    ids = _text(24)
    ids[1, 8:14] = VOCAB.image_to_vocab(torch.arange(6))  # image ids: never copied, still predicted
    logp = model(input_ids=ids).logits
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 24), atol=1e-5)
    nll = model(input_ids=ids, per_token_nll=True).loss
    assert torch.allclose(nll, -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], atol=1e-5)


def test_the_pointer_copies_exactly_the_next_text_tokens_of_earlier_positions():
    model = _model()
    with torch.no_grad():  # uniform attention over the candidates, all the mass on copying
        model.copy_query.weight.zero_()
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(-60.0)
    t = VOCAB.text_to_vocab
    ids = torch.tensor([[VOCAB.bos_id, *t([5, 7, 5]), VOCAB.img_id, *VOCAB.image_to_vocab([1, 2]), *t([9])]])
    p = model(input_ids=ids).logits.exp()[0]
    # at the last position (index 7) the earlier positions j < 7 whose next token is text: j = 0, 1, 2 offer
    # 5, 7, 5 and j = 6 offers 9; the image codes after j = 3, 4, 5 are not offered
    expected = torch.zeros(VOCAB.size)
    expected[t([5, 7, 9])] = torch.tensor([2.0, 1.0, 1.0]) / 4
    assert torch.allclose(p[7], expected, atol=1e-5)
    # the first position has nothing before it: the vocabulary alone, whatever the gate says
    plain = torch.softmax(model.lm_head(model.model(input_ids=ids[:, :1]).last_hidden_state)[0, 0], -1)
    assert torch.allclose(p[0], plain, atol=1e-5)


def test_cached_decoding_equals_full_recomputation_and_save_load(tmp_path):
    model = _model(1, "factorized")
    with torch.no_grad():
        model.copy_gate.bias.fill_(0.0)  # both parts matter
    save_generator(model, tmp_path / "g", dtype=torch.float32)
    again = load_generator(tmp_path / "g")
    assert again.copy_range == (VOCAB.text_offset, VOCAB.image_offset)
    t = VOCAB.text_to_vocab
    image = [VOCAB.img_id, *VOCAB.image_to_vocab(list(range(16))), VOCAB.img_end_id]
    # prompts of other lengths (left padding) and a shared prompt sampled twice (the prefill's row copy)
    prompts = [[VOCAB.bos_id, *t([3, 4, 5, 6]), *image], [VOCAB.bos_id, *image], [VOCAB.bos_id, *image]]
    for sampling in (Sampling(temperature=0), Sampling(temperature=1.0)):
        runs = []
        for m, cache in ((again, True), (model, False)):
            g = torch.Generator().manual_seed(3)
            runs.append(generate_text_ids(m, VOCAB, prompts, 16, 2048, sampling, max_new_tokens=8,
                                          use_cache=cache, generator=g))
        assert runs[0] == runs[1]


def test_a_folder_whose_copy_range_is_not_its_text_ids_is_refused(tmp_path):
    from racm3.errors import ModelFolderError

    save_generator(_model(), tmp_path / "g", dtype=torch.float32)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**cfg, "copy_head": [0, 5]}))
    with pytest.raises(ModelFolderError, match="copy_head"):
        load_generator(tmp_path / "g")


def _copy_nll_of_rare_pieces(copy_head: bool, steps: int = 150) -> float:
    """Sequences <bos> A <sep> A of 8 pieces, drawn by a Zipf law (the 20 rarest pieces: 1.5% of training
    tokens, as a held-out name's pieces are rare in captions); -log p of the second A made of rare pieces only."""
    torch.manual_seed(0)
    cfg = replace(get_preset("tiny"), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                  copy_head=copy_head)
    model = build_model(cfg, VOCAB, 16)
    zipf = 1.0 / torch.arange(1, VOCAB.text_size + 1).float() ** 2
    rare = torch.zeros(VOCAB.text_size)
    rare[20:] = 1.0

    def batch(probs: torch.Tensor, n: int = 32) -> torch.Tensor:
        a = torch.multinomial(probs, n * 8, replacement=True).view(n, 8) + VOCAB.text_offset
        return torch.cat([torch.full((n, 1), VOCAB.bos_id), a, torch.full((n, 1), VOCAB.eos_id), a], 1)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        nll = model(input_ids=batch(zipf), per_token_nll=True).loss[:, 9:].mean()  # the second A
        opt.zero_grad()
        nll.backward()
        opt.step()
    with torch.no_grad():
        return model.eval()(input_ids=batch(rare), per_token_nll=True).loss[:, 9:].mean().item()


def test_a_tiny_model_with_a_copy_head_copies_rare_pieces_that_one_without_does_not():
    with_head, without = _copy_nll_of_rare_pieces(True), _copy_nll_of_rare_pieces(False)
    chance = math.log(20)  # even knowing which 20 pieces are rare, without copying
    assert with_head < 0.1 * chance, (with_head, without)
    assert without > chance / 2, (with_head, without)  # the same training without the head: no copying yet


def test_a_fine_tuning_adds_the_copy_head_to_a_generator_without_it(tmp_path, capsys):
    from racm3.generator.train import TrainConfig, train

    write_shape_dataset(tmp_path / "data")
    write_tiny_tokenizers(tmp_path / "tok")
    cfg = TrainConfig(dataset=tmp_path / "data", out=tmp_path / "run", tokenizers=tmp_path / "tok", preset="tiny",
                      steps=4, batch_size=4, warmup=1, log_every=2, eval_every=4, eval_docs=2, progress=False,
                      save_dtype="float32", threads=1)
    train(cfg)
    preset = {k: v for k, v in asdict(get_preset("tiny")).items() if k != "image_base"}
    (tmp_path / "copy.json").write_text(json.dumps({**preset, "copy_head": True}))
    train(replace(cfg, out=tmp_path / "tuned", preset=str(tmp_path / "copy.json"), init_from=tmp_path / "run"))
    assert "freshly initialised: copy_gate, copy_key, copy_query" in capsys.readouterr().out
    start, tuned = load_generator(tmp_path / "run"), load_generator(tmp_path / "tuned")
    assert tuned.copy_range and not start.copy_range
    # the other way (a copy-head generator into a preset without one) is refused in one line
    with pytest.raises(ValueError, match="copy_gate") as refused:
        train(replace(cfg, out=tmp_path / "back", init_from=tmp_path / "tuned"))
    assert "\n" not in str(refused.value)
