"""RACM3 end to end on the tiny model: retrieval feeds the context, demos replace it, outputs carry sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from generator_fixtures import draw, shape_documents
from racm3.cli import app
from racm3.documents import Document
from racm3.pipeline import RACM3
from racm3.retrieval.memory import Memory


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return RACM3.from_pretrained(tiny_model_dir[0])


def test_generate_image_retrieves_the_caption_and_returns_the_best_sample(model, tiny_model_dir):
    with Memory.open(tiny_model_dir[1]) as memory:
        out = model.generate_image("red circle", memory=memory, k=2, num_samples=3, guidance=2.0)
    assert out.image.size == (16, 16) and len(out.samples) == 3
    assert out.scores == sorted(out.scores, reverse=True)
    # the caption's own document comes first; the second is another document (the diversity rule may skip the
    # other style's "red circle" when the untrained test encoder makes the two near-identical)
    assert out.sources[0].document.text == "red circle"
    assert len({h.id for h in out.sources}) == 2 and out.sources[0].score >= out.sources[1].score


def test_demos_replace_retrieval(model, tiny_model_dir):
    demos = [d for d in shape_documents() if d.id in ("outline-blue-bar", "filled-green-circle")]
    with Memory.open(tiny_model_dir[1]) as memory:
        out = model.generate_image("red circle", memory=memory, k=2, num_samples=2, demos=demos)
    assert [h.id for h in out.sources] == [d.id for d in demos]
    assert all(h.score is None for h in out.sources)


def test_no_retrieval_and_generate_text(model, tiny_model_dir):
    out = model.generate_image("blue square", memory=None, k=2, num_samples=2)
    assert out.sources == []
    with Memory.open(tiny_model_dir[1]) as memory:
        cap = model.generate_text(draw("blue", "square", "filled"), memory=memory, k=1, num_samples=2)
    assert len(cap.sources) == 1 and cap.text == cap.samples[0]
    assert cap.scores == sorted(cap.scores, reverse=True) and all(isinstance(c, str) and c for c in cap.samples)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate_image("   ", memory=None)


def test_cli_generate_image_json(tiny_model_dir, tmp_path):
    model_dir, memory_dir = tiny_model_dir
    png = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["generate", "image", "red circle", "--model", str(model_dir), "--memory",
                                      str(memory_dir), "--samples", "2", "--out", str(png), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["image"] == str(png) and png.exists()
    assert payload["sources"][0]["text"] == "red circle" and payload["seconds"] > 0


def test_cli_generate_text_rejects_a_corrupt_image(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = CliRunner().invoke(app, ["generate", "text", str(bad), "--model", str(tiny_model_dir[0])])
    assert result.exit_code != 0 and "not a readable image" in result.output


def test_infill_image_keeps_the_visible_rows_and_redraws_the_hole(model):
    image = draw("green", "triangle", "filled")
    codes = model.tokenizer.encode_images([image])[0]
    grid_w = model.tokenizer.image.grid[1]
    out = model.infill_image(image, rows=(2, 4), caption="green triangle", memory=None, num_samples=2)
    assert out.image.size == (16, 16) and out.codes.shape == (2, codes.numel())
    first, last = 2 * grid_w, 4 * grid_w
    for sample in out.codes:  # only the hidden rows change; the rest are the original codes
        assert torch.equal(sample[:first], codes[:first]) and torch.equal(sample[last:], codes[last:])
        assert int(sample.min()) >= 0 and int(sample.max()) < model.vocab.image_size
    with pytest.raises(ValueError, match="code grid"):
        model.infill_image(image, rows=(3, 9))


def test_infill_text_fills_between_the_given_words(model):
    out = model.infill_text(draw("red", "bar", "outline"), before="red", num_samples=2, max_new_tokens=4)
    assert out.text.startswith("red") and len(out.samples) == 2


def test_demo_writes_a_page_with_sources_and_outputs(tiny_model_dir, tmp_path):
    """`racm3 demo` on a data set and memory of one's own (--dataset, --memory), as after `racm3 train all`."""
    from generator_fixtures import write_shape_dataset

    model_dir, memory_dir = tiny_model_dir
    data = write_shape_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--model", str(model_dir),
                                      "--samples", "2", "--dataset", str(data), "--memory", str(memory_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    index = Path(result.stdout.strip().splitlines()[-1])
    alone = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo2"), "--dataset", str(data)])
    assert alone.exit_code != 0 and "--dataset and --memory together" in alone.output
    assert not (tmp_path / "demo2").exists()
    assert index == (tmp_path / "demo" / "index.html").resolve()
    page = index.read_text()
    assert page.count("<tr>") == 2 + 8 + 8  # two header rows, 8 captions, 8 images
    assert "heldout" in page and "train" in page
    images = list((tmp_path / "demo" / "images").glob("*.png"))
    assert len([p for p in images if p.name.endswith("-out.png")]) == 8  # one generated image per caption
    assert (tmp_path / "demo" / "summary.png").exists()


def test_demo_prompts_need_no_names_for_captions():
    """Captions that are not concept names (an icon's "document print preview" for document-print-preview, or no
    concept at all) still give prompts, half train and half held-out; a split with fewer gives fewer."""
    from racm3.demo import pick_prompts

    docs = [Document(d.id, (d.image, d.text.upper()), {"split": d.split}) for d in shape_documents()]
    picked = pick_prompts(docs, n=8)
    assert len(picked) == 8 and [d.split for d in picked] == ["train"] * 4 + ["heldout"] * 4
    few = [d for d in docs if d.split == "train"] + [d for d in docs if d.split == "heldout"][:2]
    assert [d.split for d in pick_prompts(few, n=8)] == ["train"] * 4 + ["heldout"] * 2
    with pytest.raises(ValueError, match="no captioned image documents"):
        pick_prompts([Document("x", ("text only",), {"split": "train"})])


def test_source_reranking_scores_against_the_matching_source(model):
    """rerank='source' anchors on the demo whose caption matches the prompt, whatever its position."""
    demos = [d for d in shape_documents() if d.id in ("filled-blue-bar", "filled-red-circle")]
    target = model._rerank_target("red circle", [model._context(None, None, 2, demos)[i] for i in (0, 1)], "source")
    red = model.encoder.embed_image([next(d for d in demos if d.id == "filled-red-circle").image])[0]
    assert np.allclose(target, red)
    caption = model._rerank_target("red circle", [], "source")  # no sources: the caption's own vector
    assert np.allclose(caption, model.encoder.embed_text(["red circle"])[0])
    with pytest.raises(ValueError, match="rerank"):
        model.generate_image("red circle", rerank="best")


def test_caption_source_reranking_anchors_on_the_source_drawn_like_the_query(model):
    """generate_text(rerank='source') scores captions against the caption of the source whose image matches."""
    docs = {d.id: d for d in shape_documents()}
    demos = [docs["filled-blue-bar"], docs["filled-red-circle"]]
    sources = [model._context(None, None, 2, demos)[i] for i in (0, 1)]
    target = model._caption_target(docs["filled-red-circle"].image, sources, "source")
    assert np.allclose(target, model.encoder.embed_text([docs["filled-red-circle"].text])[0])
    own = model._caption_target(docs["filled-red-circle"].image, sources, "image")  # the paper's: the image's
    assert np.allclose(own, model.encoder.embed_image([docs["filled-red-circle"].image])[0])
    out = model.generate_text(docs["filled-red-circle"].image, demos=demos, num_samples=2, rerank="source")
    assert out.text and len(out.scores) == 2 and out.scores[0] >= out.scores[1]
    with pytest.raises(ValueError, match="rerank"):
        model.generate_text(docs["filled-red-circle"].image, rerank="caption")


def _captured_prompts(monkeypatch, name: str) -> list:
    """Record the prompts the pipeline hands to racm3.pipeline.<name> (the real function still runs)."""
    import racm3.pipeline as pipeline

    seen, real = [], getattr(pipeline, name)

    def spy(model, vocab, prompts, *args, **kwargs):
        seen.append((prompts, kwargs.get("uncond_prompts")))
        return real(model, vocab, prompts, *args, **kwargs)

    monkeypatch.setattr(pipeline, name, spy)
    return seen


@pytest.mark.parametrize("task", ["caption->image", "image->caption"])
def test_the_inference_prompt_is_the_training_sequence_up_to_the_part_to_generate(model, monkeypatch, task):
    from racm3.generator.data import ExampleBank, Recipe, tokenize_documents

    docs = {d.id: d for d in shape_documents()}
    main, context = "filled-red-circle", ["outline-red-circle", "filled-blue-bar"]
    demos = [docs[i] for i in context]
    v, text_first = model.vocab, task == "caption->image"
    seen = _captured_prompts(monkeypatch, "generate_image_codes" if text_first else "generate_text_ids")
    if text_first:
        out = model.generate_image(docs[main].text, demos=demos, num_samples=2, guidance=2.0)
    else:
        out = model.generate_text(docs[main].image, demos=demos, num_samples=2, guidance=2.0)
    (prompts, uncond), = seen
    bank = ExampleBank(tokenize_documents(list(docs.values()), model.tokenizer), max_len=model.max_len)
    training = bank.sequence(main, context, v, Recipe(), text_first=text_first).ids
    prompt = prompts[0]
    assert training[:len(prompt)] == prompt  # token for token what training showed, up to...
    rest = training[len(prompt):]
    if text_first:  # ...the image the model now draws: N codes, </img>, <eos>
        assert prompt[-1] == v.img_id and len(rest) == model.tokenizer.tokens_per_image + 2
    else:  # ...the caption it now writes, then <eos>
        assert prompt[-1] == v.img_end_id and all(v.is_text(t) for t in rest[:-1]) and rest[-1] == v.eos_id
    assert [h.id for h in out.sources] == context
    # guidance's unconditional stream: the same documents, the query masked
    context_end = len(prompt) - prompt[::-1].index(v.doc_end_id)
    assert uncond[0][:context_end] == prompt[:context_end]
    assert v.mask_id(0) in uncond[0] and v.mask_id(0) not in prompt


def test_documents_that_do_not_fit_the_context_are_dropped_worst_first_and_not_listed(model, monkeypatch):
    docs = shape_documents()
    seen = _captured_prompts(monkeypatch, "generate_image_codes")
    out = model.generate_image("red circle", demos=docs, num_samples=1)  # 48 documents: far past max_len
    (prompts, _), = seen
    n = model.tokenizer.tokens_per_image
    assert 0 < len(out.sources) < len(docs)
    assert [h.id for h in out.sources] == [d.id for d in docs[:len(out.sources)]]  # the first (best) ones kept
    assert len(prompts[0]) + n + 2 <= model.max_len  # prompt + codes + </img> + <eos> fits what training used
    assert prompts[0].count(model.vocab.doc_id) == len(out.sources)
    with pytest.raises(ValueError, match="shorten the caption"):
        model.generate_image("red circle " * 400)
