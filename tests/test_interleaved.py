"""Interleaved documents (text and images in any order, any number of each): document -> ids -> document is exact,
a document's memory vector is the renormalised mean of its segments' vectors, the generator trains on them, and
RACM3.continue_document continues an interleaved prompt in the training sequence format."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from racm3.documents import Document, write_jsonl_dataset
from racm3.generator.data import LESSONS, RECIPES, DocTokens, ExampleBank, Recipe, batch, document_tokens
from racm3.retrieval.encoder import EmojiEncoder, ImageTowerConfig, l2_normalize
from racm3.tokenizers.sequence import build_sequence

sys.path.insert(0, str(Path(__file__).parent))
from generator_fixtures import draw, parts, shape_documents, write_tiny_tokenizers  # noqa: E402

STEPS = 80
PAIRS = [("red", "circle", "blue", "square"), ("green", "bar", "orange", "circle"), ("blue", "triangle", "red", "bar"),
         ("black", "square", "green", "triangle"), ("orange", "bar", "purple", "circle"),
         ("purple", "square", "black", "triangle")]


def interleaved_documents() -> list[Document]:
    """Three layouts over train concepts: text, image, text, image; image first; two images after one caption."""
    docs = []
    for j, (c1, s1, c2, s2) in enumerate(PAIRS):
        a, b = f"{c1} {s1}", f"{c2} {s2}"
        im_a, im_b = draw(c1, s1, "filled"), draw(c2, s2, "filled")
        docs.append(Document(f"titi-{j}", (a, im_a, b, im_b), {"style": "filled", "split": "train"}))
        docs.append(Document(f"itit-{j}", (im_a, a, im_b, b), {"style": "filled", "split": "train"}))
        docs.append(Document(f"tii-{j}", (a, im_a, draw(c1, s1, "outline")), {"split": "train"}))
    return docs


def kinds(segments) -> list[str]:
    return ["text" if isinstance(s, str) else "image" for s in segments]


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    from racm3.generator.train import load_tokenizers

    return load_tokenizers(write_tiny_tokenizers(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def encoder():
    return EmojiEncoder.untrained(ImageTowerConfig(image_size=16, widths=(8, 16)))


# --- document -> ids -> document ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["titi", "itit", "tii"])
def test_interleaved_documents_round_trip_through_ids(mt, layout):
    v = mt.vocab
    for doc in [d for d in interleaved_documents() if d.id.startswith(f"{layout}-")]:
        ids = mt.document_to_ids(doc)
        assert ids.count(v.img_id) == ids.count(v.img_end_id) == len(doc.images)
        back = mt.ids_to_document(ids, id=doc.id)
        assert kinds(back.segments) == kinds(doc.segments) and back.texts == doc.texts  # text exact, in order
        assert all(im.size == (16, 16) and im.mode == "RGB" for im in back.images)
        segments = mt.ids_to_segments(ids)  # images exact through their codes, each in its place
        codes = mt.encode_images(doc.images)
        assert torch.equal(torch.stack([s for s in segments if isinstance(s, torch.Tensor)]), codes)
        assert mt.codes_document_to_ids(segments) == ids  # ids -> document -> ids exact too
        # training and inference take the tokenizer's ids, in the document's order whatever the task
        (tokens,) = document_tokens([doc], mt)
        assert tokens.interleaved and tokens.ids(text_first=True) == tokens.ids(text_first=False) == ids
        assert tokens.starts_with_text == isinstance(doc.segments[0], str) and len(tokens) == len(ids)
        assert DocTokens.from_dict(json.loads(json.dumps(asdict(tokens)))) == tokens  # the JSON cache's record


def test_a_caption_and_an_image_keep_their_ids(mt):
    v = mt.vocab
    docs = shape_documents()[:6] + [Document("t", ("red circle",)), Document("i", (draw("red", "bar", "filled"),)),
                                    Document("tt", ("red", "circle", draw("red", "circle", "outline")))]
    for d, tokens in zip(docs, document_tokens(docs, mt)):
        # what document_tokens gave before documents could be interleaved: the caption's ids, <img> codes </img>
        text = tuple(v.text_to_vocab(mt.text.encode(d.text))) if d.text else ()
        image = (v.img_id, *v.image_to_vocab(mt.encode_images([d.image])[0].tolist()), v.img_end_id) if d.image else ()
        assert tokens == DocTokens(text, image, d.concept or "", d.style or "") and not tokens.interleaved
        assert tokens.ids(text_first=True) == list(text + image) and tokens.ids(text_first=False) == list(image + text)
        assert DocTokens.from_dict({k: val for k, val in asdict(tokens).items() if k != "segments"}) == tokens


def test_training_sequences_show_an_interleaved_document_whole_and_in_order(mt):
    v = mt.vocab
    inter = {d.id: d for d in interleaved_documents()}
    docs = [d for d in shape_documents() if d.split == "train"] + list(inter.values())
    tokens = dict(zip([d.id for d in docs], document_tokens(docs, mt)))
    bank = ExampleBank(tokens, max_len=384)
    rng = np.random.default_rng(0)
    recipes = [RECIPES["v1"], RECIPES["v2"], *[Recipe(**{f"{n}_rate": float(n == lesson) for n in LESSONS})
                                                for lesson in LESSONS]]
    mains = set()
    for recipe in recipes:
        recipe = Recipe(**{**asdict(recipe), "mask_rate": 0.0})  # unmasked: the sequences read as documents
        for doc_id in bank.ids:
            ctx, main = parts(bank.sample(doc_id, v, recipe, rng), v)
            if doc_id in inter:  # its segments, in order, parsed back exactly
                got = mt.ids_to_segments(main)
                assert kinds(got) == kinds(inter[doc_id].segments)
                assert [s for s in got if isinstance(s, str)] == inter[doc_id].texts
                assert main == mt.document_to_ids(inter[doc_id])
                mains.add(doc_id)
                # in context: whole documents, a caption + image one in the order the main document begins with
                in_order = {tuple(t.ids(isinstance(inter[doc_id].segments[0], str))) for t in tokens.values()}
                assert all(tuple(c) in in_order for c in ctx)
            else:
                # no lesson borrows an interleaved document as a distractor, a caption or a demonstration (and
                # this bank has no retrieval candidates: nothing else could put one in context)
                assert not any(c == tokens[i].ids(True) for c in ctx for i in inter)
    assert mains == set(inter)
    # the lessons built from "the" caption and "the" image skip an interleaved document (generator.data's docstring)
    for doc_id in inter:
        assert bank.relabel(doc_id, Recipe(), rng) is None and bank.distractor_context(doc_id, 2, rng) is None
        assert bank.style_demos(doc_id, "filled", 2, rng) is None
    assert all(bank.other_concept(i, rng) not in inter for i in bank.ids for _ in range(3))


def test_build_sequence_holds_any_number_of_segments(mt):
    v = mt.vocab
    docs = interleaved_documents()
    main, ctx = mt.document_to_ids(docs[0]), [mt.document_to_ids(docs[1]), mt.document_to_ids(docs[2])]
    seq = build_sequence(main, ctx, v)
    assert seq.ids.count(v.img_id) == sum(len(d.images) for d in docs[:3])
    got_ctx, got_main = parts(seq, v)
    assert got_main == main and got_ctx == ctx


# --- memory vectors ------------------------------------------------------------------------------------------


def test_a_documents_vector_is_the_renormalised_mean_of_its_segments(encoder):
    for doc in interleaved_documents()[:3]:
        rows = [encoder.embed_text([s])[0] if isinstance(s, str) else encoder.embed_image([s])[0]
                for s in doc.segments]
        expected = l2_normalize(np.mean(rows, axis=0))
        got = encoder.embed_documents([doc])[0]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert abs(float(np.linalg.norm(got)) - 1) < 1e-6
        # not just the first caption and the first image: the other segments count
        first = l2_normalize(encoder.embed_text([doc.texts[0]])[0] + encoder.embed_image([doc.images[0]])[0])
        assert float(np.abs(got - first).max()) > 1e-3
    # in one batch beside other documents, each document gets the vector it gets alone
    mixed = shape_documents()[:4] + interleaved_documents()[:3]
    alone = np.stack([encoder.embed_documents([d])[0] for d in mixed])
    np.testing.assert_allclose(encoder.embed_documents(mixed), alone, atol=1e-6)


def test_a_caption_and_an_image_keep_their_vector_bit_for_bit(encoder):
    docs = shape_documents()[:8] + [Document("t", ("red circle",)), Document("i", (draw("red", "bar", "filled"),)),
                                    Document("tt", ("red", "circle", draw("red", "circle", "filled")))]
    # the rule before documents could be interleaved: the caption's vector plus the image's, renormalised
    acc = np.zeros((len(docs), encoder.dim), dtype=np.float32)
    text_rows = [i for i, d in enumerate(docs) if d.text is not None]
    image_rows = [i for i, d in enumerate(docs) if d.image is not None]
    acc[text_rows] += encoder.embed_text([docs[i].text for i in text_rows])
    acc[image_rows] += encoder.embed_image([docs[i].image for i in image_rows])
    assert np.array_equal(encoder.embed_documents(docs), l2_normalize(acc))


# --- training and generation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_interleaved(tmp_path_factory, mt, encoder):
    """(the run folder, RACM3, memory): a tiny generator trained (v2 recipe) on the shapes and the interleaved
    documents, and a memory of both."""
    from racm3.generator.model import load_generator
    from racm3.generator.train import TrainConfig, train
    from racm3.pipeline import RACM3
    from racm3.retrieval.memory import Memory

    root = tmp_path_factory.mktemp("inter")
    docs = shape_documents() + interleaved_documents()
    write_jsonl_dataset(docs, root / "data")
    mt.save_pretrained(root / "tok")
    cfg = TrainConfig(dataset=root / "data", out=root / "run", tokenizers=root / "tok", preset="tiny", steps=STEPS,
                      batch_size=16, lr=3e-3, warmup=5, log_every=5, eval_every=40, save_every=STEPS, eval_docs=4,
                      progress=False, save_dtype="float32", threads=1, recipe=RECIPES["v2"])
    train(cfg)
    memory = Memory.create(root / "memory", encoder.name, encoder.dim)
    memory.add_documents(docs, encoder)
    yield root / "run", RACM3(mt, load_generator(root / "run"), encoder), memory
    memory.close()


def test_the_generator_trains_on_interleaved_documents(trained_interleaved, mt):
    from racm3.generator.loss import ra_cm3_loss, token_nll

    run, model, _ = trained_interleaved
    # the run trained on them whole: its precomputed ids (cache.json) are each document's segments in order
    cached = json.loads((run / "cache.json").read_text())["train"]
    for doc in interleaved_documents():
        assert DocTokens.from_dict(cached[doc.id]).ids(text_first=True) == mt.document_to_ids(doc)
    # and a resumed run, which reads that cache instead of tokenizing again, sees the same segments
    from racm3.generator.train import _read_cache

    key = json.loads((run / "cache.json").read_text())["key"]
    again = _read_cache(run / "cache.json", key)["train"]
    assert all(again[d.id].segments and again[d.id].ids(True) == mt.document_to_ids(d) for d in interleaved_documents())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    chance = math.log(mt.vocab.size)
    assert log[0]["main"] > 0.8 * chance and log[-1]["main"] < 0.6 * chance, (log[0]["main"], log[-1]["main"])

    def nll(docs) -> float:  # per main token, each document alone in its sequence
        seqs = [build_sequence(t.ids(True), [], mt.vocab) for t in document_tokens(docs, mt)]
        b = batch(seqs, mt.vocab, model.image_base, mt.tokens_per_image)
        with torch.no_grad():
            return float(ra_cm3_loss(token_nll(model.generator.eval(), b), b["loss_weights"], b["main_mask"])["main"])

    # the interleaved documents themselves are learnt: far below chance, as well as the caption + image ones
    inter, plain = nll(interleaved_documents()), nll([d for d in shape_documents() if d.split == "train"])
    assert inter < 0.6 * chance and inter < 1.1 * plain, (inter, plain, chance)


def _spy(monkeypatch, name):
    from racm3 import pipeline

    seen, real = [], getattr(pipeline, name)

    def spy(model, vocab, prompts, *args, **kwargs):
        seen.append(prompts)
        return real(model, vocab, prompts, *args, **kwargs)

    monkeypatch.setattr(pipeline, name, spy)
    return seen


def test_continue_document_draws_an_image_after_text_image_text(trained_interleaved, mt, encoder, monkeypatch):
    from racm3.retrieval.retriever import Retriever, RetrieverConfig

    _, model, memory = trained_interleaved
    v, n = mt.vocab, mt.tokens_per_image
    doc = interleaved_documents()[0]  # red circle, its drawing, blue square, its drawing
    prompt_segments = list(doc.segments[:3])
    seen = _spy(monkeypatch, "generate_image_codes")
    out = model.continue_document(prompt_segments, output="image", memory=memory, k=2, num_samples=3)
    assert out.image is not None and out.text is None and out.image.size == (16, 16)
    assert out.codes.shape == (3, n) and len(out.samples) == 3 and out.scores == sorted(out.scores, reverse=True)
    # the query is the prompt as a document: the renormalised mean of its segments' vectors
    query = l2_normalize(sum(encoder.embed_text([s])[0] if isinstance(s, str) else encoder.embed_image([s])[0]
                             for s in prompt_segments))
    expected = Retriever(memory, encoder, RetrieverConfig(k=2)).retrieve_vectors(query[None], 2, [set()])[0]
    assert [h.id for h in out.sources] == [h.id for h in expected] and len(out.sources) == 2
    assert out.sources[0].id in ("titi-0", "itit-0")  # the document it was cut from (the other: same segments)
    # the prompt is the training format: the sources in context, then the segments in order, then <img>
    (prompts,) = seen
    context = [t.ids(text_first=True) for t in document_tokens([h.document for h in out.sources], mt)]
    query_ids = mt.document_to_ids(Document("p", tuple(prompt_segments)))
    assert prompts[0] == build_sequence(query_ids + [v.img_id], context, v).ids[:-1]
    # the best sample is the decoding of its codes, and every sample is scored with the prompt's vector
    with torch.no_grad():
        best = mt.image.to_pil(mt.image.decode(out.codes[:1]))[0]
    assert np.array_equal(np.asarray(out.image), np.asarray(best))
    np.testing.assert_allclose(out.scores, encoder.embed_image(out.samples) @ query, atol=1e-5)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < v.image_size


@pytest.mark.parametrize("layout, cut", [("titi", 2), ("titi", 3), ("itit", 2)])
def test_continue_document_writes_text(trained_interleaved, mt, encoder, monkeypatch, layout, cut):
    """After an image a new text (text, image -> text); after text its continuation (text, image, text -> text;
    image, text -> text)."""
    _, model, memory = trained_interleaved
    v = mt.vocab
    doc = next(d for d in interleaved_documents() if d.id == f"{layout}-0")
    segments = list(doc.segments[:cut])
    seen = _spy(monkeypatch, "generate_text_ids")
    out = model.continue_document(segments, output="text", memory=memory, k=2, num_samples=2, seed=1)
    assert out.image is None and out.codes is None and isinstance(out.text, str) and out.text
    assert out.text == out.samples[0] and len(out.samples) == 2 and len(out.sources) == 2
    (prompts,) = seen
    context = [t.ids(text_first=layout == "titi") for t in document_tokens([h.document for h in out.sources], mt)]
    query_ids = mt.document_to_ids(Document("p", tuple(segments)))
    assert prompts[0] == build_sequence(query_ids, context, v).ids[:-1]  # the sequence up to where the text goes on
    target = encoder.embed_documents([Document("p", tuple(segments))])[0]
    np.testing.assert_allclose(out.scores, encoder.embed_text(out.samples) @ target, atol=1e-5)
    assert all("?" == t or t == t.strip() for t in out.samples)


def test_text_after_text_is_what_follows_it(trained_interleaved, mt, monkeypatch):
    from racm3 import pipeline

    _, model, _ = trained_interleaved
    v, image = mt.vocab, draw("red", "circle", "filled")
    written = {"after text": " circle", "after an image": "red circle"}
    for where, prompt in (("after text", [image, "red"]), ("after an image", ["red", image])):
        made = v.text_to_vocab(mt.text.encode(written[where]))  # what the generator is made to write
        monkeypatch.setattr(pipeline, "generate_text_ids",
                            lambda _m, _v, prompts, *a, made=made, **kw: [made] * len(prompts))
        out = model.continue_document(prompt, output="text", num_samples=2)
        assert out.text == written[where].strip() and out.samples == [out.text] * 2 and out.sources == []


def test_continue_document_refuses_bad_prompts(trained_interleaved):
    _, model, _ = trained_interleaved
    image = draw("red", "circle", "filled")
    with pytest.raises(ValueError, match="output must be 'image' or 'text'"):
        model.continue_document(["red circle", image], output="video")
    with pytest.raises(ValueError, match="non-empty list"):
        model.continue_document([])
    with pytest.raises(ValueError, match="non-empty list"):
        model.continue_document("red circle")
    with pytest.raises(TypeError, match="got int"):
        model.continue_document(["red circle", 3])
    with pytest.raises(ValueError, match="non-empty"):
        model.continue_document(["red circle", "  "])
    with pytest.raises(ValueError, match="drop a segment"):
        model.continue_document(["red circle", image] * 40)
