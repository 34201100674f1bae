"""The training recipe: each lesson's sequence is what its docstring says, so that one use of the context is
necessary (generator/data.py, docs/design.md "Teaching a small generator to read its memory"), and the context
benefits are logged for each kind while training."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from racm3.documents import Document
from racm3.generator.data import LESSONS, RECIPES, ExampleBank, Recipe, get_recipe, tokenize_documents
from racm3.generator.train import BENEFITS, benefit_probes

sys.path.insert(0, str(Path(__file__).parent))
from generator_fixtures import parts, shape_documents  # noqa: E402

SAMPLES = 8  # sequences drawn per document where a test wants both orders, both styles, both tasks


def only(lesson: str, **fields) -> Recipe:
    """A recipe of one lesson, unmasked (so the sequences can be read as documents)."""
    return Recipe(**{f"{n}_rate": float(n == lesson) for n in LESSONS}, mask_rate=0.0, **fields)


@pytest.fixture(scope="module")
def bank(trained):
    _, _, mt, _ = trained
    return ExampleBank(tokenize_documents([d for d in shape_documents() if d.split == "train"], mt), max_len=384)


def test_shares_are_validated_and_v1_stays_the_shipped_recipe():
    with pytest.raises(ValueError, match=r"lesson shares copy_rate \+ .* style_rate = 1.10 > 1"):
        Recipe(copy_rate=0.5, style_rate=0.5, relabel_rate=0.1, sibling_rate=0, cross_style_rate=0, distractor_rate=0)
    for name in ("style_rate", "extra_distractor_rate", "mask_rate"):
        with pytest.raises(ValueError, match=f"{name} must lie in"):
            Recipe(**{name: -0.1})
    for bad in (0.0, float("nan"), float("inf")):  # refused when the recipe is made, before any precomputation
        with pytest.raises(ValueError, match="text_weight must be a finite number > 0"):
            Recipe(text_weight=bad)
    with pytest.raises(ValueError, match="unknown recipe 'v9'; choose one of v1, v2"):
        get_recipe("v9")
    v2 = get_recipe("v2")
    assert v2 == Recipe() and sum(getattr(v2, f"{n}_rate") for n in LESSONS) <= 1
    assert all(getattr(v2, f"{n}_rate") > 0 for n in LESSONS) and v2.extra_distractor_rate == 0
    # a uniform draw picks each lesson with its share, the rest is retrieval
    draws = [v2.lesson(r) for r in np.linspace(0, 1, 10_000, endpoint=False)]
    for n in LESSONS:
        assert draws.count(n) / len(draws) == pytest.approx(getattr(v2, f"{n}_rate"), abs=1e-3)
    # The shipped model's recipe (before the v2 lessons), which its reproduction script asks for by name.
    assert RECIPES["v1"] == Recipe(copy_rate=0.35, sibling_rate=0.2, cross_style_rate=0.2, relabel_rate=0.0,
                                   distractor_rate=0.0, style_rate=0.0, extra_distractor_rate=0.25)
    from racm3.pipelines import read_pipeline

    script = (Path(__file__).parents[1] / "scripts" / "train_emoji_small.sh").read_text()
    assert [line.split()[-2:] for line in script.splitlines() if line.startswith("racm3 train all ")] == \
        [["emoji-small", '"$@"']]
    assert read_pipeline("emoji-small")["generator"]["recipe"] == read_pipeline("emoji-small")["generator_k0"]["recipe"] == "v1"


def test_copy_sibling_and_cross_style_contexts(bank):
    rng = np.random.default_rng(0)
    recipe = only("copy")
    assert all(bank.context(i, "copy", recipe, rng) == [i] for i in bank.ids)
    for i in bank.ids:
        (other,) = bank.context(i, "cross_style", recipe, rng)
        assert bank.docs[other].concept == bank.docs[i].concept and bank.docs[other].style != bank.docs[i].style
    assert bank.context(bank.ids[0], "copy", Recipe(k=0), rng) == []


def test_caption_lessons_name_the_image_only_in_context(bank, trained):
    v = trained[2].vocab
    rng = np.random.default_rng(0)
    for i in bank.ids:
        d = bank.docs[i]
        ctx, main = parts(bank.sample(i, v, only("relabel"), rng), v)
        assert main[:len(d.image)] == list(d.image)  # image first: this document's drawing...
        caption = main[len(d.image):]
        assert caption and all(v.is_text(t) for t in caption)
        # ...named as no training document with this drawing is: recalling the memorised caption is wrong
        assert all(list(o.text) != caption for o in bank.docs.values() if o.image == d.image)
        owners = [o for o in bank.docs.values() if list(o.text) == caption]
        assert owners and all(o.concept != d.concept for o in owners)
        assert ctx == [main]  # the only place it is said: the relabelled copy in context


def test_distractor_lessons_hold_the_right_document_and_a_distractor_in_both_orders(bank, trained):
    v = trained[2].vocab
    rng = np.random.default_rng(0)
    seen = set()
    for i in bank.ids:
        d = bank.docs[i]
        for _ in range(SAMPLES):
            ctx, main = parts(bank.sample(i, v, only("distractor"), rng), v)
            text_first = main[0] != v.img_id
            assert main == d.ids(text_first)  # the main document is the right one, in either task
            assert len(ctx) == 2 and ctx.count(main) == 1
            (other,) = [o for o in bank.docs.values() if o.ids(text_first) == next(c for c in ctx if c != main)]
            assert other.concept != d.concept and other.text != d.text
            seen.add((ctx.index(main), other.style == d.style, text_first))
    # right document first and second, distractor of the same and of the other style, caption->image and image->caption
    assert seen == {(pos, same, tf) for pos in (0, 1) for same in (True, False) for tf in (True, False)}


def test_style_lessons_demonstrate_the_style_with_other_concepts(bank, trained):
    v = trained[2].vocab
    rng = np.random.default_rng(0)
    by_ids = {tuple(o.ids(True)): o for o in bank.docs.values()}
    for i in bank.ids:
        d = bank.docs[i]
        ctx, main = parts(bank.sample(i, v, only("style"), rng), v)
        assert main == d.ids(True)  # caption -> image: the query concept, drawn in style S
        demos = [by_ids[tuple(c)] for c in ctx]
        assert len(demos) == 2 and all(o.style == d.style and o.concept != d.concept for o in demos)
    # a concept drawn in one style only: its caption alone says the style, so it gets no style lesson
    lone = bank.ids[0]
    partner = bank.other_styles(lone)
    one_style = ExampleBank({i: t for i, t in bank.docs.items() if i not in partner})
    assert one_style.style_demos(lone, bank.docs[lone].style, 2, rng) is None
    assert parts(one_style.sample(lone, v, only("style"), rng), v)[0] == []  # fell back to retrieval (none here)


def test_documents_without_metadata_take_lessons_from_their_memory_neighbours(tiny_model_dir, trained):
    from racm3.generator.train import retrieval_candidates

    v = trained[2].vocab
    model_dir, memory_dir = tiny_model_dir
    bare = [Document(d.id, d.segments, {"split": d.split}) for d in shape_documents() if d.split == "train"]
    cands = retrieval_candidates(bare, memory_dir, model_dir / "encoder", k=4)
    bank = ExampleBank(tokenize_documents(bare, trained[2]), cands)
    rng = np.random.default_rng(0)
    for i in bank.ids:
        assert bank.docs[i].concept == bank.docs[i].style == ""
        near = {by: bank.neighbours(i, by) for by in ("text", "image")}
        assert len(near["text"]) == len(near["image"]) == 4 and i not in near["text"] + near["image"]
        assert bank.siblings(i) == near["image"][:1]  # the nearest drawing stands in for a same-concept sibling
        assert set(bank.other_styles(i)) == set(near["text"]) - set(near["image"])
        assert bank.context(i, "sibling", only("sibling"), rng)[0] == near["image"][0]
        # another concept: outside both neighbour lists, with another caption
        ctx, main = parts(bank.sample(i, v, only("distractor"), rng), v)
        assert len(ctx) == 2 and main in ctx
        other = bank.distractor_context(i, 2, rng)
        assert other is not None and not (set(other) - {i}) & bank.related(i)
        assert parts(bank.sample(i, v, only("relabel"), rng), v)[1] != bank.docs[i].ids(False)
        assert bank.style_demos(i, "", 2, rng) is None  # no style, no style lesson
        assert all(bank.sample(i, v, Recipe(), rng).ids for _ in range(SAMPLES))  # the whole v2 recipe runs


def test_benefit_probes_pair_each_lesson_with_its_control(trained):
    _, cfg, mt, _ = trained
    heldout = ExampleBank(tokenize_documents([d for d in shape_documents() if d.split == "heldout"], mt))
    probes = benefit_probes(heldout, mt.vocab, cfg.recipe, n=4)
    assert set(probes) == {nll for pair in BENEFITS.values() for nll in pair}
    assert all(len(s) == 4 for s in probes.values())
    for seq, control in zip(probes["choose_nll"], probes["choose_nll_distractor"]):
        ctx, main = parts(seq, mt.vocab)
        assert main in ctx and parts(control, mt.vocab)[0] == [c for c in ctx if c != main]  # the distractor alone
    style = {tuple(t.ids(True)): t.style for t in heldout.docs.values()}
    for seq, control in zip(probes["style_nll"], probes["style_nll_other"]):
        main_style = style[tuple(parts(seq, mt.vocab)[1])]
        assert {style[tuple(c)] for c in parts(seq, mt.vocab)[0]} == {main_style}
        assert main_style not in {style[tuple(c)] for c in parts(control, mt.vocab)[0]}


@pytest.fixture(scope="module")
def v2_run(trained, tiny_model_dir):
    """A tiny generator trained a few steps with the v2 recipe, contexts retrieved from the shapes memory."""
    from racm3.generator.train import TrainConfig, train

    root, _, _, _ = trained
    model_dir, memory_dir = tiny_model_dir
    cfg = TrainConfig(dataset=root / "data", out=root / "v2", memory=memory_dir, tokenizers=root / "tok",
                      encoder=model_dir / "encoder", preset="tiny", steps=40, batch_size=16, lr=3e-3, warmup=5,
                      log_every=5, eval_every=10, eval_docs=4, progress=False, threads=1, recipe=RECIPES["v2"])
    train(cfg)
    return cfg, [json.loads(line) for line in (cfg.out / "train_log.jsonl").read_text().splitlines()]


def test_a_tiny_v2_training_lowers_the_loss_and_logs_one_benefit_per_kind(v2_run):
    cfg, log = v2_run
    assert log[-1]["main"] < 0.75 * log[0]["main"], [r["main"] for r in log]
    evaluated = [r for r in log if "context_benefit" in r]
    assert [r["step"] for r in evaluated] == list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
    for r in evaluated:
        assert all(math.isfinite(r[name]) for name in BENEFITS)  # one number per kind, on every evaluation
        assert r["choose_benefit"] == pytest.approx(r["choose_nll_distractor"] - r["choose_nll"])
        assert 0 < r["benefit_s"] < 10
    recorded = json.loads((cfg.out / "train_config.json").read_text())["config"]["recipe"]
    assert Recipe(**recorded) == cfg.recipe  # the run folder says which recipe trained it


def test_the_default_recipe_is_v2_and_options_change_single_shares(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from racm3.cli import app
    from racm3.generator.train import TrainConfig

    assert TrainConfig(dataset=tmp_path, out=tmp_path).recipe == RECIPES["v2"] != RECIPES["v1"]
    asked = []
    monkeypatch.setattr("racm3.generator.train.train", lambda cfg: asked.append(cfg) or {})  # the command, untrained

    def recipe(*options: str) -> Recipe:
        result = CliRunner().invoke(app, ["train", "generator", str(tmp_path), str(tmp_path), str(tmp_path / "g"),
                                          *options])
        assert result.exit_code == 0, result.output
        return asked.pop().recipe

    assert recipe() == RECIPES["v2"]
    assert recipe("--recipe", "v1") == RECIPES["v1"]
    assert recipe("--recipe", "v1", "--copy-rate", "0.1") == replace(RECIPES["v1"], copy_rate=0.1)
    assert recipe("--recipe", "v1", "--extra-distractor-rate", "0", "--k", "0") == replace(
        RECIPES["v1"], extra_distractor_rate=0.0, k=0)


def test_the_training_curve_plots_every_logged_benefit(v2_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import training_curve

    cfg, log = v2_run
    one_style = [{k: v for k, v in r.items() if "cross_style" not in k} for r in log]  # data drawn in one style
    (tmp_path / "one-style").mkdir()
    (tmp_path / "one-style" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one_style))
    training_curve.main([str(cfg.out), str(tmp_path / "one-style"), "--out", str(tmp_path / "curve")])
    assert (tmp_path / "curve" / "training_curve.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "curve" / "training_curve.json").read_text())
    assert summary == {name: [r for r in records if "nll_none" in r]  # the evaluated lines
                       for name, records in (("v2", log), ("one-style", one_style))}
    printed = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert all(name in printed["v2"] for name in BENEFITS)  # each logged benefit is plotted (and printed)
    assert all((name in printed["one-style"]) == (name != "cross_style_benefit") for name in BENEFITS)
