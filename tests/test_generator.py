"""The generator: the RA-CM3 loss, training lowers it, and decoding is constrained, cached and guided correctly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from racm3.generator.data import RECIPES, ExampleBank, Recipe, tokenize_documents
from racm3.generator.decode import Sampling, generate_image_codes, generate_text_ids
from racm3.generator.loss import ra_cm3_loss
from racm3.generator.model import check_vocab, get_preset, load_generator, save_generator
from racm3.generator.train import train
from racm3.runtime import load_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from generator_fixtures import free_port, shape_documents, write_shape_dataset, write_tiny_tokenizers  # noqa: E402

STEPS = 80


def test_loss_is_main_plus_alpha_retrieved():
    torch.manual_seed(0)
    V, alpha = 7, 0.1
    logits = torch.randn(1, 6, V)
    ids = torch.tensor([[1, 3, 4, 5, 2, 6]])
    weights = torch.tensor([[0.0, alpha, alpha, 1.0, 1.0, 0.0]])  # bos, 2 retrieved, 2 main, a weight-0 sentinel
    main = torch.tensor([[False, False, False, True, True, True]])
    lp = torch.log_softmax(logits, -1)[0]
    nll = [-float(lp[t, ids[0, t + 1]]) for t in range(5)]  # predicting ids[1..5]
    expected = (nll[2] + nll[3]) / 2 + alpha * (nll[0] + nll[1]) / 2
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    parts = ra_cm3_loss(ce, weights, main)
    assert math.isclose(float(parts["loss"]), expected, rel_tol=1e-5)
    assert math.isclose(float(parts["retrieved"]), (nll[0] + nll[1]) / 2, rel_tol=1e-5)


def test_a_padded_batch_scores_each_sequence_as_it_scores_alone(trained):
    """token_nll passes no padding mask (collate pads on the right; causal attention keeps real tokens off the
    pads): every real token's NLL in a batch of different lengths equals that sequence's NLL on its own, and
    the NLL the model gives with the batch's real padding mask."""
    from racm3.generator.data import batch
    from racm3.generator.loss import token_nll

    root, _, mt, model = trained
    docs = tokenize_documents(shape_documents(), mt)
    bank = ExampleBank(docs, max_len=model.racm3["generator"]["max_len"])
    rng = np.random.default_rng(0)
    seqs = [bank.sample(bank.ids[i], mt.vocab, RECIPES["v1"], rng) for i in (0, 3, 5)]
    lengths = [len(s) for s in seqs]
    assert len(set(lengths)) > 1, lengths  # the batch really is padded
    args = (mt.vocab, model.racm3["generator"]["image_base"], mt.tokens_per_image)
    with torch.no_grad():
        b_all = batch(seqs, *args)
        together = token_nll(model, b_all)
        masked = model(input_ids=b_all["input_ids"], attention_mask=b_all["attention_mask"],
                       position_ids=b_all["position_ids"], use_cache=False, per_token_nll=True).loss
        real = b_all["attention_mask"][:, 1:].bool()
        torch.testing.assert_close(together[real], masked[real], rtol=1e-4, atol=1e-4)
        for b, s in enumerate(seqs):
            alone = token_nll(model, batch([s], *args))[0]
            torch.testing.assert_close(together[b, : len(s) - 1], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.3, 0.6, 4.0])  # nuclei of a few ids to thousands (the full sort)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(temperature):
    from racm3.generator.decode import NUCLEUS_FIRST_TRY, filter_top

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * 3 / temperature
    logits[:, :500] = float("-inf")  # disallowed ids (another modality) never enter the nucleus
    logp = torch.log_softmax(logits, -1)
    kept = ~torch.isinf(filter_top(logp, 0, 0.9))
    probs = logp.exp()
    for b in range(6):  # the reference: sort everything, keep ids while the mass before them is below p
        p, order = torch.sort(probs[b], descending=True)
        n = int(((p.cumsum(0) - p) < 0.9).sum())
        assert set(order[:n].tolist()) == set(kept[b].nonzero().flatten().tolist())
        assert probs[b][kept[b]].sum() >= 0.9 - 1e-5 and not kept[b, :500].any()
    sizes = kept.sum(-1)
    assert (sizes.max() > NUCLEUS_FIRST_TRY) == (temperature == 4.0), sizes  # both paths are exercised


def test_training_lowers_the_loss_well_below_chance(trained):
    root, cfg, mt, _ = trained
    log = [json.loads(line) for line in (root / "run" / "train_log.jsonl").read_text().splitlines()]
    chance = math.log(mt.vocab.size)
    assert log[0]["main"] > 0.8 * chance
    # Captions and the VQ codes of a few shapes are very predictable: 80 steps take the loss far below chance.
    assert log[-1]["main"] < 0.6 * chance, (log[0]["main"], log[-1]["main"], chance)
    assert "context_benefit" in log[-1]


def test_resume_continues_from_the_checkpoint_under_its_recipe(trained, tmp_path):
    root, cfg, _, _ = trained
    run = root / "run"
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    assert ckpt["step"] == STEPS and ckpt["recipe"] == asdict(cfg.recipe) == asdict(RECIPES["v1"])
    assert {p.name for p in run.glob("step-*")} == {"step-40", "step-80"}  # snapshots for curves
    assert load_generator(run / "step-40").racm3 == load_generator(run).racm3
    started = (run / "train_config.json").read_text()
    log = (run / "train_log.jsonl").read_text()
    # a finished run trains nothing and returns its final metrics (what `racm3 train all` reports)
    assert train(replace(cfg, resume=True)) == json.loads(log.splitlines()[-1])
    assert (run / "train_log.jsonl").read_text() == log
    # a v1 run resumed under the v2 default is refused, in one line naming the folder and both recipes
    with pytest.raises(ValueError) as refused:
        train(replace(cfg, steps=STEPS + 5, resume=True, recipe=Recipe()))
    assert str(refused.value).startswith(f"{run}: its checkpoint was trained with recipe v1 (copy_rate 0.35, ")
    assert "this run asks for v2 (copy_rate 0.15, " in str(refused.value) and "\n" not in str(refused.value)
    # a checkpoint saved before checkpoints held the recipe is checked against the run's train_config.json
    old = tmp_path / "old"
    old.mkdir()
    save_checkpoint({k: v for k, v in ckpt.items() if k != "recipe"}, old / "checkpoint.safetensors")
    (old / "train_config.json").write_text(started)
    with pytest.raises(ValueError, match=f"{old}: its checkpoint was trained with recipe v1 .* asks for a custom"):
        train(replace(cfg, out=old, resume=True, recipe=replace(cfg.recipe, copy_rate=0.3)))

    last = train(replace(cfg, steps=STEPS + 5, resume=True))
    assert last["step"] == STEPS + 5
    assert (run / "train_config.json").read_text() == started  # the configuration the run started with


def test_init_from_starts_a_new_run_from_a_trained_generator(trained, tmp_path):
    root, cfg, mt, _ = trained
    fresh = train(replace(cfg, out=tmp_path / "fresh", steps=5, snapshot_every=0, eval_every=5))
    tuned = train(replace(cfg, out=tmp_path / "tuned", steps=5, snapshot_every=0, eval_every=5, init_from=root / "run",
                          lr=1e-4))
    chance = math.log(mt.vocab.size)
    assert fresh["main"] > 0.8 * chance  # 5 steps from scratch learn little
    assert tuned["main"] < 0.6 * chance, (tuned["main"], chance)  # it starts where the trained generator ended
    # another architecture is refused in one line, before anything trains
    other = tmp_path / "wide.json"
    other.write_text(json.dumps({"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 96,
                                 "max_len": 512}))
    with pytest.raises(ValueError, match=r"tensor .* preset .*wide.json") as refused:
        train(replace(cfg, out=tmp_path / "wide", steps=5, init_from=root / "run", preset=str(other)))
    assert "\n" not in str(refused.value) and not (tmp_path / "wide" / "checkpoint.safetensors").exists()
    # the same shapes under another position rule: refused too, for a fine-tuning run and for a resume
    aligned = tmp_path / "aligned.json"
    tiny = {k: v for k, v in asdict(get_preset("tiny")).items() if k != "image_base"}
    aligned.write_text(json.dumps({**tiny, "text_after_image": "aligned"}))
    with pytest.raises(ValueError, match=r"trained with text_after_image 'plain', but preset .*aligned.json has 'aligned'"):
        train(replace(cfg, out=tmp_path / "aligned", steps=5, init_from=root / "run", preset=str(aligned)))
    with pytest.raises(ValueError, match=r"checkpoint.safetensors: trained with text_after_image 'plain'"):
        train(replace(cfg, out=tmp_path / "tuned", steps=10, resume=True, preset=str(aligned)))


def test_a_checkpoint_from_before_text_weight_resumes_as_text_weight_1(trained, tmp_path):
    root, cfg, _, _ = trained
    ckpt = load_checkpoint(root / "run" / "checkpoint.safetensors")
    old = tmp_path / "old"
    old.mkdir()
    ckpt["recipe"] = {k: v for k, v in ckpt["recipe"].items() if k != "text_weight"}
    save_checkpoint(ckpt, old / "checkpoint.safetensors")
    (old / "train_config.json").write_text((root / "run" / "train_config.json").read_text())
    step = ckpt["step"]  # the session's run, perhaps resumed by another test
    assert train(replace(cfg, out=old, steps=step + 1, resume=True, snapshot_every=0))["step"] == step + 1
    with pytest.raises(ValueError, match="text_weight 1.0"):
        train(replace(cfg, out=old, steps=step + 2, resume=True, recipe=replace(cfg.recipe, text_weight=2.0)))


def _prompts(mt, model, caption: str, context_docs=()):
    vocab = mt.vocab
    docs = {d.id: d for d in shape_documents()}
    toks = tokenize_documents([docs[i] for i in context_docs], mt) if context_docs else {}
    prompt = [vocab.bos_id]
    for i in context_docs:
        prompt += [vocab.doc_id, *toks[i].ids(text_first=True), vocab.doc_end_id]
    prompt += [*vocab.text_to_vocab(mt.text.encode(caption)), vocab.img_id]
    return prompt


def test_kv_cache_decoding_equals_full_recompute(trained):
    _, _, mt, model = trained
    base = model.racm3["generator"]["image_base"]
    n = mt.tokens_per_image
    one, other = _prompts(mt, model, "red circle", ["filled-red-circle"]), _prompts(mt, model, "blue bar")
    prompts = [one, other, one]  # a repeated prompt is prefilled once and its cache rows copied: same codes
    greedy = Sampling(temperature=0)
    cached = generate_image_codes(model, mt.vocab, prompts, n, base, greedy, use_cache=True)
    full = generate_image_codes(model, mt.vocab, prompts, n, base, greedy, use_cache=False)
    assert torch.equal(cached, full) and torch.equal(cached[0], cached[2])
    # and for text, after an image, with a retrieved document before it (two prompts of different lengths)
    v = mt.vocab
    img = [v.img_id, *v.image_to_vocab(cached[0].tolist()), v.img_end_id]
    ctx = [v.doc_id, *img, *v.text_to_vocab(mt.text.encode("red circle")), v.doc_end_id]
    text_prompts = [[v.bos_id, *img], [v.bos_id, *ctx, *img]]
    t_cached = generate_text_ids(model, v, text_prompts, n, base, greedy, max_new_tokens=6, use_cache=True)
    t_full = generate_text_ids(model, v, text_prompts, n, base, greedy, max_new_tokens=6, use_cache=False)
    assert t_cached == t_full and all(len(t) >= 1 for t in t_cached)


def test_decoding_puts_text_after_an_image_where_training_does(trained):
    from racm3.generator.decode import allowed_ids
    from racm3.generator.model import build_model
    from racm3.tokenizers.sequence import position_ids

    _, _, mt, _ = trained
    v, n = mt.vocab, mt.tokens_per_image
    img = [v.img_id, *v.image_to_vocab([c % v.image_size for c in range(n)]), v.img_end_id]
    ctx = [v.doc_id, *img, *v.text_to_vocab(mt.text.encode("red circle")), v.doc_end_id]
    prompts = [[v.bos_id, *img], [v.bos_id, *ctx, *img]]
    allowed = allowed_ids(v, "text", torch.device("cpu"))
    for rule in ("plain", "aligned"):
        torch.manual_seed(0)
        model = build_model(replace(get_preset("tiny"), text_after_image=rule), v, n).eval()
        with torch.no_grad():  # sharp attention, so what the model writes depends on the positions it is given
            for name, w in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                    w.mul_(30)
        base = model.racm3["generator"]["image_base"]
        for use_cache in (True, False):
            out = generate_text_ids(model, v, prompts, n, base, Sampling(temperature=0), max_new_tokens=5,
                                    use_cache=use_cache)
            for prompt, written in zip(prompts, out):
                full = prompt + written  # one forward pass at the positions training gives this sequence
                pos = position_ids(full, v, base, n, rule)
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([full]), position_ids=pos[None]).logits[0]
                for k, tok in enumerate(written):
                    step = logits[len(prompt) - 1 + k].masked_fill(~allowed, float("-inf"))
                    if k == 0:
                        step[v.eos_id] = float("-inf")
                    assert int(step.argmax()) == tok, (rule, use_cache, k)


def test_image_spans_hold_exactly_n_image_codes(trained):
    _, _, mt, model = trained
    base, n, vocab = model.racm3["generator"]["image_base"], mt.tokens_per_image, mt.vocab
    g = torch.Generator().manual_seed(0)
    codes = generate_image_codes(model, vocab, [_prompts(mt, model, "green triangle")] * 3, n, base,
                                 Sampling(temperature=1.5, top_k=50), generator=g)
    assert codes.shape == (3, n)
    assert int(codes.min()) >= 0 and int(codes.max()) < vocab.image_size
    texts = generate_text_ids(model, vocab, [[vocab.bos_id, vocab.img_id, *vocab.image_to_vocab(codes[0].tolist()),
                                              vocab.img_end_id]], n, base, Sampling(temperature=1.5), generator=g)
    assert all(bool(vocab.is_text(t)) for t in texts[0])


def test_guidance_one_equals_unguided_and_guidance_changes_output(trained):
    _, _, mt, model = trained
    vocab, base, n = mt.vocab, model.racm3["generator"]["image_base"], mt.tokens_per_image
    prompt = _prompts(mt, model, "red square", ["filled-red-square"])
    uncond = _prompts(mt, model, "red square", ["filled-red-square"])
    cut = uncond.index(vocab.img_id)
    uncond = [vocab.bos_id, *uncond[1:cut - len(mt.text.encode("red square"))], vocab.mask_id(0), vocab.img_id]

    def run(guidance, with_uncond):
        g = torch.Generator().manual_seed(7)
        return generate_image_codes(model, vocab, [prompt] * 2, n, base, Sampling(guidance=guidance),
                                    uncond_prompts=[uncond] * 2 if with_uncond else None, generator=g)

    assert torch.equal(run(1.0, True), run(1.0, False))
    # with no drawing to copy (a copy in context is drawn alike either way), guidance changes what is drawn
    bare, bare_uncond = _prompts(mt, model, "red square"), [vocab.bos_id, vocab.mask_id(0), vocab.img_id]
    greedy_plain = generate_image_codes(model, vocab, [bare], n, base, Sampling(temperature=0))
    greedy_guided = generate_image_codes(model, vocab, [bare], n, base, Sampling(temperature=0, guidance=5.0),
                                         uncond_prompts=[bare_uncond])
    assert not torch.equal(greedy_plain, greedy_guided)


def test_save_load_round_trip_and_vocab_check(trained, tmp_path):
    _, _, mt, model = trained
    save_generator(model, tmp_path / "g")
    again = load_generator(tmp_path / "g")
    ids = torch.tensor([[mt.vocab.bos_id, mt.vocab.img_id]])
    assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits)
    from racm3.tokenizers.vocab import Vocab

    with pytest.raises(ValueError, match="tokenizers it was trained with"):
        check_vocab(again, Vocab(mt.vocab.text_size + 1, mt.vocab.image_size), mt.tokens_per_image)
    with pytest.raises(FileNotFoundError, match="not a racm3 generator folder"):
        load_generator(tmp_path)


def test_generator_refuses_an_image_tokenizer_whose_codes_mean_other_pictures(trained):
    from racm3.tokenizers.image import ImageTokenizer

    _, _, mt, model = trained
    assert model.racm3["image_codes"] == mt.image.code_fingerprint()
    check_vocab(model, mt.vocab, mt.tokens_per_image, image_codes=mt.image.code_fingerprint())  # its own: fine
    torch.manual_seed(123)
    other = ImageTokenizer(mt.image.config)  # same shapes, other weights: the same ids would be other codes
    with pytest.raises(ValueError, match="retrain the generator"):
        check_vocab(model, mt.vocab, mt.tokens_per_image, image_codes=other.code_fingerprint())
    # a float16 copy (what the shipped model stores) keeps the fingerprint
    half = ImageTokenizer(mt.image.config)
    half.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in mt.image.state_dict().items()})
    assert half.code_fingerprint() == mt.image.code_fingerprint()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_one_and_two_processes_give_the_same_loss_curve(tmp_path):
    """torchrun with 2 gloo processes of 8 sequences each trains like 1 process of 16 (same global batch)."""
    write_shape_dataset(tmp_path / "data")
    write_tiny_tokenizers(tmp_path / "tok")
    steps = 40

    def run(name: str, batch_size: int, procs: int) -> list[dict]:
        script = (
            "from pathlib import Path; from racm3.generator.train import TrainConfig, train; "
            f"train(TrainConfig(dataset=Path('{tmp_path / 'data'}'), out=Path('{tmp_path / name}'), "
            f"tokenizers=Path('{tmp_path / 'tok'}'), preset='tiny', steps={steps}, batch_size={batch_size}, lr=3e-3, "
            f"warmup=5, log_every=5, eval_every={steps}, eval_docs=4, progress=False, threads=1))"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
                str(free_port()), "--no-python", sys.executable, "-c", script] if procs > 1 else [sys.executable, "-c", script])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((tmp_path / name / "train_config.json").read_text())["world_size"] == procs
        return [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    one, two = run("one", 16, 1), run("two", 8, 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(5, steps + 1, 5))
    a, b = np.array([r["main"] for r in one]), np.array([r["main"] for r in two])
    print("1 process:", a.round(3).tolist(), "\n2 processes:", b.round(3).tolist())
    assert a[-1] < 0.75 * a[0] and b[-1] < 0.75 * b[0]  # both learn...
    assert np.abs(a - b).max() < 0.15 * a[0]  # ...along the same curve, within the noise of different batches


def test_training_retrieval_never_returns_heldout_or_self(tiny_model_dir):
    """The memory holds held-out documents too; training candidates come from the train split only."""
    from racm3.generator.train import retrieval_candidates

    model_dir, memory_dir = tiny_model_dir
    docs = shape_documents()
    train_docs = [d for d in docs if d.split == "train"]
    heldout_ids = {d.id for d in docs if d.split == "heldout"}
    cands = retrieval_candidates(train_docs, memory_dir, model_dir / "encoder", k=4)
    assert set(cands) == {d.id for d in train_docs}
    found = [c for i, q in cands.items() for kind in ("text", "image") for c in q[kind]]
    assert found and not heldout_ids & set(found)
    assert all(i not in q["text"] + q["image"] for i, q in cands.items())


def test_presets_are_json_files_and_a_path_works_too(tmp_path):
    from racm3.generator.model import GeneratorConfig, get_preset, list_presets

    assert {"tiny", "emoji-small", "medium"} <= set(list_presets())
    assert get_preset("emoji-small") == GeneratorConfig()  # the shipped architecture, as data
    (tmp_path / "mine.json").write_text(json.dumps({"hidden_size": 64, "num_layers": 3, "num_heads": 4,
                                                    "intermediate_size": 128, "max_len": 512}))
    mine = get_preset(tmp_path / "mine.json")
    assert (mine.hidden_size, mine.num_layers, mine.max_len) == (64, 3, 512)
    (tmp_path / "typo.json").write_text(json.dumps({"hidden": 64}))
    with pytest.raises(ValueError, match=r"typo.json: unknown fields \['hidden'\]"):
        get_preset(tmp_path / "typo.json")
    with pytest.raises(ValueError, match="unknown generator preset 'huge'; choose a preset from .*emoji-small"):
        get_preset("huge")
    with pytest.raises(ValueError, match="missing.json: no such file"):
        get_preset(tmp_path / "missing.json")


def test_training_batches_are_built_off_the_step_in_loader_workers(trained):
    from racm3.generator.data import TrainingBatches, batch

    _, _, mt, _ = trained
    bank = ExampleBank(tokenize_documents([d for d in shape_documents() if d.split == "train"], mt), max_len=384)
    stream = TrainingBatches(bank, mt.vocab, Recipe(), 6, 2048, mt.tokens_per_image, seed=3)

    def take(workers: int, n: int = 4) -> list[dict]:
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    inline, again, pooled = take(0), take(0), take(2)
    for b in inline + pooled:
        assert b["input_ids"].shape[0] == 6 and int(b["tokens"]) == int(b["attention_mask"].sum())
        assert set(b) == set(batch([bank.sample(bank.ids[0], mt.vocab, Recipe(), np.random.default_rng(0))],
                                   mt.vocab, 2048, mt.tokens_per_image)) | {"tokens"}
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(inline, again))  # one seed, one stream
    # two workers interleave batches from two streams of their own
    assert not torch.equal(pooled[0]["input_ids"], pooled[1]["input_ids"])
