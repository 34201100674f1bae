"""RA-CM3 sequences: weights and document indices, max_len rules, CM3 masking round trip, positions, batching."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from racm3.tokenizers import Vocab, build_sequence, cm3_mask, cm3_unmask, collate, position_ids
from racm3.tokenizers.sequence import apply_spans, maskable_runs, sample_spans, weigh_main_text

V = Vocab(text_size=40, image_size=30)
N = 4  # codes per image in these tests
BASE = 512


@st.composite
def doc_ids(draw, max_segments: int = 3) -> list[int]:
    """A document's ids: text runs and `<img> N codes </img>` blocks in any order."""
    ids: list[int] = []
    for _ in range(draw(st.integers(1, max_segments))):
        if draw(st.booleans()):
            ids += V.text_to_vocab(draw(st.lists(st.integers(0, V.text_size - 1), min_size=1, max_size=6)))
        else:
            codes = draw(st.lists(st.integers(0, V.image_size - 1), min_size=N, max_size=N))
            ids += [V.img_id, *V.image_to_vocab(codes), V.img_end_id]
    return ids


sequences = st.builds(lambda m, r, a: build_sequence(m, r, V, alpha=a),
                      doc_ids(), st.lists(doc_ids(), max_size=3), st.sampled_from([0.1, 0.5]))


@settings(max_examples=80, deadline=None)
@given(doc_ids(), st.lists(doc_ids(), max_size=3), st.floats(0.0, 1.0))
def test_weights_are_zero_alpha_one(main, retrieved, alpha):
    s = build_sequence(main, retrieved, V, alpha=alpha)
    k = len(retrieved)
    assert s.ids[0] == V.bos_id and s.weights[0] == 0.0 and s.doc_index[0] == -1
    assert s.ids[-1] == V.eos_id and s.weights[-1] == 1.0 and s.doc_index[-1] == k
    t = 1
    for j, r in enumerate(retrieved):
        block = [V.doc_id, *r, V.doc_end_id]
        assert s.ids[t:t + len(block)] == block
        assert s.weights[t:t + len(block)] == [alpha] * len(block) and set(s.doc_index[t:t + len(block)]) == {j}
        t += len(block)
    assert s.ids[t:-1] == main and set(s.weights[t:]) == {1.0} and set(s.doc_index[t:]) == {k}


@settings(max_examples=40, deadline=None)
@given(doc_ids(), st.lists(doc_ids(), max_size=2), st.sampled_from([0.5, 4.0]), st.integers(0, 2**32 - 1))
def test_text_weight_weighs_only_the_main_documents_text_after_masking(main, retrieved, text_weight, seed):
    masked = cm3_mask(build_sequence(main, retrieved, V, alpha=0.1), V, np.random.default_rng(seed))
    s = weigh_main_text(masked, V, text_weight)
    assert s.ids == masked.ids and s.doc_index == masked.doc_index
    k = len(retrieved)
    for t, w, d, w0 in zip(s.ids, s.weights, s.doc_index, masked.weights):
        main_text = d == k and bool(V.is_text(t))  # sentinels, specials and image codes keep their weight
        assert w == (w0 * text_weight if main_text else w0), (t, d)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="text_weight must be a finite number > 0"):
            weigh_main_text(masked, V, bad)


def test_max_len_drops_retrieved_last_first_then_truncates_main_outside_images():
    main = V.text_to_vocab([1, 2]) + [V.img_id, *V.image_to_vocab([0, 1, 2, 3]), V.img_end_id] + V.text_to_vocab([3])
    r1, r2 = V.text_to_vocab([5] * 4), V.text_to_vocab([6] * 4)
    full = build_sequence(main, [r1, r2], V)
    assert len(full) == 1 + 6 + 6 + 9 + 1
    one = build_sequence(main, [r1, r2], V, max_len=len(full) - 1)
    assert one.ids[1:7] == [V.doc_id, *r1, V.doc_end_id] and max(one.doc_index) == 1  # r2 (last) went first
    bare = build_sequence(main, [r1, r2], V, max_len=11)
    assert bare.ids == [V.bos_id, *main, V.eos_id]
    cut = build_sequence(main, [r1], V, max_len=9)  # main without its last text token, and no <eos>
    assert cut.ids == [V.bos_id, *main[:-1]]
    inside = build_sequence(main, [], V, max_len=6)  # the cut would split the image: the image goes whole
    assert inside.ids == [V.bos_id, *main[:2]]
    image_first = [V.img_id, *V.image_to_vocab([0, 1, 2, 3]), V.img_end_id]
    with pytest.raises(ValueError, match="max_len"):
        build_sequence(image_first, [], V, max_len=5)


@settings(max_examples=150, deadline=None)
@given(sequences, st.integers(0, 2**32 - 1))
def test_mask_then_unmask_recovers_the_sequence(seq, seed):
    masked = cm3_mask(seq, V, np.random.default_rng(seed))
    assert cm3_unmask(masked.ids, V) == seq.ids
    assert cm3_unmask(torch.tensor(masked.ids), V) == seq.ids
    sentinels = [t for t in masked.ids if V.is_mask(t)]
    n = len(sentinels) // 2
    assert n >= 1 and sorted(sentinels) == sorted([V.mask_id(i) for i in range(n)] * 2)  # each <mask:i> twice
    assert len(masked) == len(seq) + 2 * n  # masking only adds the sentinels


@settings(max_examples=150, deadline=None)
@given(sequences, st.integers(0, 2**32 - 1), st.booleans())
def test_spans_respect_document_and_modality_boundaries(seq, seed, main_only):
    spans = sample_spans(seq, V, np.random.default_rng(seed), main_only=main_only)
    assert 1 <= len(spans) <= 16
    images_hit = []
    for s, e in spans:
        toks = seq.ids[s:e]
        assert e > s and len(set(seq.doc_index[s:e])) == 1  # one document
        assert all(V.is_text(t) for t in toks) or all(V.is_image(t) for t in toks)  # one modality, no wrappers
        if main_only:
            assert seq.doc_index[s] == max(seq.doc_index)
        if V.is_image(toks[0]):
            opening = max(t for t in range(s) if seq.ids[t] == V.img_id)
            images_hit.append(opening)
    assert len(images_hit) == len(set(images_hit))  # at most one span per image
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # sorted, non-overlapping
    runs = maskable_runs(seq, V)
    assert all(any(rs <= s and e <= re for rs, re in runs) for s, e in spans)


@settings(max_examples=100, deadline=None)
@given(sequences, st.integers(0, 2**32 - 1))
def test_masked_weights_sentinel_zero_moved_tokens_keep_theirs(seq, seed):
    spans = sample_spans(seq, V, np.random.default_rng(seed))
    masked = apply_spans(seq, spans, V)
    holes = [t for t, tok in enumerate(masked.ids) if V.is_mask(tok)][: len(spans)]
    assert [masked.ids[t] for t in holes] == [V.mask_id(i) for i in range(len(spans))]
    assert all(masked.weights[t] == 0.0 for t in holes)
    # The tail re-emits span i after its sentinel with the span's own weights and documents, before <eos>.
    t = masked.ids.index(V.mask_id(0), holes[0] + 1)
    for i, (s, e) in enumerate(spans):
        assert masked.ids[t] == V.mask_id(i) and masked.weights[t] == seq.weights[s]
        assert masked.ids[t + 1:t + 1 + e - s] == seq.ids[s:e]
        assert masked.weights[t + 1:t + 1 + e - s] == seq.weights[s:e]
        assert masked.doc_index[t + 1:t + 1 + e - s] == seq.doc_index[s:e]
        t += 1 + e - s
    assert masked.ids[t:] == [V.eos_id] and masked.weights[-1] == 1.0 and masked.weights[0] == 0.0


def test_mask_rate_zero_is_plain_causal():
    seq = build_sequence(V.text_to_vocab([1, 2, 3]), [], V)
    assert all(cm3_mask(seq, V, seed, mask_rate=0.0) is seq for seed in range(20))
    assert any(cm3_mask(seq, V, seed, mask_rate=1.0).ids != seq.ids for seed in range(5))


def _cells(seq_ids):
    """(position, token) pairs of the image codes of ids, as position_ids gives them."""
    pos = position_ids(seq_ids, V, image_base=BASE, tokens_per_image=N).tolist()
    return sorted((p, t) for p, t in zip(pos, seq_ids) if V.is_image(t))


@settings(max_examples=100, deadline=None)
@given(sequences, st.integers(0, 2**32 - 1))
def test_image_aligned_positions_survive_masking_and_are_causal(seq, seed):
    pos = position_ids(seq.ids, V, image_base=BASE).tolist()
    for t, tok in enumerate(seq.ids):
        if V.is_image(tok):
            k = t - max(u for u in range(t) if seq.ids[u] == V.img_id) - 1
            assert pos[t] == BASE + k  # the k-th code of any image sits at base + k
        else:
            assert pos[t] == t
    masked = cm3_mask(seq, V, np.random.default_rng(seed))
    assert _cells(masked.ids) == _cells(seq.ids)  # every code keeps its cell, in place or in the tail
    full = position_ids(masked.ids, V, image_base=BASE, tokens_per_image=N)
    inside, depth = [], 0
    for tok in masked.ids:
        depth = 1 if tok == V.img_id else 0 if tok == V.img_end_id else depth
        inside.append(depth)
    for p in range(1, len(masked) + 1):
        if not inside[p - 1] or masked.ids[p - 1] == V.img_id:
            assert position_ids(masked.ids[:p], V, image_base=BASE, tokens_per_image=N).tolist() == full[:p].tolist()


@settings(max_examples=100, deadline=None)
@given(sequences, st.integers(0, 2**32 - 1))
def test_aligned_text_after_an_image_continues_its_cells_and_stays_causal(seq, seed):
    plain = position_ids(seq.ids, V, image_base=BASE, tokens_per_image=N).tolist()
    pos = position_ids(seq.ids, V, image_base=BASE, tokens_per_image=N, text_after_image="aligned").tolist()
    after = None  # index of the last </img> when every token since it is text
    for t, tok in enumerate(seq.ids):
        if tok == V.img_end_id:
            after = t
            assert pos[t] == BASE + N
        elif V.is_text(tok) and after is not None:
            assert pos[t] == BASE + N + (t - after)  # caption token j of any image-first document: BASE + N + 1 + j
        else:
            after = None
            assert pos[t] == plain[t]  # everything else: the plain rule (image cells, text before images)
    masked = cm3_mask(seq, V, np.random.default_rng(seed))
    full = position_ids(masked.ids, V, image_base=BASE, tokens_per_image=N, text_after_image="aligned")
    inside, depth = [], 0
    for tok in masked.ids:
        depth = 1 if tok == V.img_id else 0 if tok == V.img_end_id else depth
        inside.append(depth)
    for p in range(1, len(masked) + 1):  # decoding with a KV cache sees the positions a full pass gives
        if not inside[p - 1] or masked.ids[p - 1] == V.img_id:
            prefix = position_ids(masked.ids[:p], V, image_base=BASE, tokens_per_image=N, text_after_image="aligned")
            assert prefix.tolist() == full[:p].tolist()
    with pytest.raises(ValueError, match="text_after_image must be one of"):
        position_ids(seq.ids, V, image_base=BASE, text_after_image="caption")


def test_collate_pads_right_with_zero_weight():
    a = build_sequence(V.text_to_vocab([1, 2]), [], V)
    b = build_sequence(V.text_to_vocab([1]), [V.text_to_vocab([4, 4, 4])], V)
    batch = collate([a, b], V, image_base=BASE)
    assert batch["input_ids"].shape == (2, len(b)) and batch["input_ids"][0, len(a):].eq(V.pad_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    assert batch["loss_weights"][0, len(a):].eq(0).all()
    assert batch["loss_weights"][1].tolist() == pytest.approx(b.weights)
    assert batch["position_ids"][1].tolist() == list(range(len(b)))
    with pytest.raises(ValueError, match="image_base"):
        position_ids([V.bos_id] * 20, V, image_base=10)
