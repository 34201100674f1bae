"""The one sequence format of RA-CM3, for training and inference: documents in context + main document, the
length rule, CM3 causal masking, positions and batching.

Layout (RA-CM3, Yasunaga et al. 2023, Sec. 3.3):

    <bos> [<doc> r_1 </doc>] ... [<doc> r_k </doc>] main <eos>

At inference the prompt is this sequence cut where the part to generate begins (task_prompt), so the generator
sees, token for token, what it saw in training. The length rule is the same on both sides: documents in context
are dropped, the last (worst ranked) first, before the main document or the prompt is ever cut.

weights[t] is the loss weight of *predicting* ids[t] from ids[:t] (the generator shifts by one):
0 on <bos>, alpha on every token of a retrieved document (its <doc> wrappers included), 1 on the main
document and <eos>. doc_index[t] is -1 for <bos>, j for the j-th retrieved document (0-based, wrappers
included) and k for the main document and <eos>.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch

from racm3.tokenizers.vocab import NUM_MASKS, Vocab

# Image token k of any image gets position IMAGE_BASE + k (see position_ids); text positions must stay below.
DEFAULT_IMAGE_BASE = 2048


@dataclass(frozen=True)
class Sequence:
    """One training sequence: token ids, per-token loss weights and the document each token belongs to."""

    ids: list[int]
    weights: list[float]
    doc_index: list[int]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.weights) == len(self.doc_index)):
            raise ValueError(f"Sequence fields differ in length: ids {len(self.ids)}, weights {len(self.weights)}, "
                             f"doc_index {len(self.doc_index)}")

    def __len__(self) -> int:
        return len(self.ids)


def _image_spans(ids: Seq[int], vocab: Vocab) -> list[tuple[int, int]]:
    """(index of <img>, index of its </img>) for every image in ids; </img> index = len(ids) if unclosed."""
    spans, start = [], None
    for t, tok in enumerate(ids):
        if tok == vocab.img_id:
            start = t
        elif tok == vocab.img_end_id and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, len(ids)))
    return spans


def truncate_main(main: list[int], budget: int, vocab: Vocab) -> list[int]:
    """The longest prefix of main within budget that never cuts an image (an image is kept whole or dropped).

    Raises ValueError when not even the first token / first whole image fits: a main document is never
    shown to the generator with half an image.
    """
    if len(main) <= budget:
        return main
    cut = budget
    for start, end in _image_spans(main, vocab):
        if start < cut <= end:  # the cut would fall inside this image: cut before its <img>
            cut = start
            break
    if cut <= 0:
        raise ValueError(f"the main document ({len(main)} tokens) cannot fit max_len: its first image needs more "
                         f"than the {budget} tokens left; raise max_len or use an image tokenizer with fewer tokens")
    return main[:cut]


def fit_documents(doc_lengths: Seq[int], rest: int, max_len: int | None) -> int:
    """How many of the documents (best first) fit: <bos> + sum(len + 2 for <doc> </doc>) + rest <= max_len."""
    kept = len(doc_lengths)
    if max_len is not None:
        while kept and 1 + sum(n + 2 for n in doc_lengths[:kept]) + rest > max_len:
            kept -= 1
    return kept


def context_ids(documents: Seq[Seq[int]], vocab: Vocab) -> list[int]:
    """<bos> [<doc> d_1 </doc>] ... [<doc> d_k </doc>]: how every sequence of the format begins."""
    ids = [vocab.bos_id]
    for d in documents:
        ids += [vocab.doc_id, *d, vocab.doc_end_id]
    return ids


def build_sequence(main: list[int], retrieved: list[list[int]], vocab: Vocab, alpha: float = 0.1,
                   max_len: int | None = None) -> Sequence:
    """<bos> [<doc> r1 </doc>] ... main <eos>, with weights (0 / alpha / 1) and doc_index.

    Over max_len, retrieved documents are dropped, the last first (the retriever ranks best first), until
    the sequence fits. Only when no retrieved document is left is the main document truncated: at the end,
    never inside an image (see truncate_main), and then without <eos>, since the document did not end there.
    """
    if not main:
        raise ValueError("the main document has no tokens")
    if not 0.0 <= alpha:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    main = list(main)
    retrieved = [list(r) for r in retrieved[:fit_documents([len(r) for r in retrieved], len(main) + 1, max_len)]]
    eos = True
    if max_len is not None and 1 + sum(len(r) + 2 for r in retrieved) + len(main) + 1 > max_len:
        main = truncate_main(main, max_len - 1, vocab)  # no document left in context (fit_documents)
        eos = False

    k = len(retrieved)
    ids = context_ids(retrieved, vocab)
    weights, doc_index = [0.0], [-1]
    for j, r in enumerate(retrieved):
        weights += [alpha] * (len(r) + 2)  # the <doc> wrappers belong to their document
        doc_index += [j] * (len(r) + 2)
    ids += main
    weights += [1.0] * len(main)
    doc_index += [k] * len(main)
    if eos:
        ids.append(vocab.eos_id)
        weights.append(1.0)
        doc_index.append(k)
    return Sequence(ids, weights, doc_index)


def weigh_main_text(seq: Sequence, vocab: Vocab, text_weight: float) -> Sequence:
    """seq with the main document's text tokens weighing text_weight in the loss (its image codes, specials and
    mask sentinels keep theirs). A caption is ~10 tokens beside an image's 256 codes, so at 1 captions carry ~4%
    of the main loss. Applied after CM3 masking, so a masked caption span's tokens are weighed wherever they sit."""
    if not (0.0 < text_weight < math.inf):
        raise ValueError(f"text_weight must be a finite number > 0, got {text_weight}")
    if text_weight == 1.0:
        return seq
    main = max(seq.doc_index)
    weights = [w * text_weight if d == main and vocab.is_text(t) else w
               for t, w, d in zip(seq.ids, seq.weights, seq.doc_index)]
    return Sequence(seq.ids, weights, seq.doc_index)


@dataclass(frozen=True)
class Prompt:
    """An inference prompt and how many of the offered documents it holds (the first ones, best ranked)."""

    ids: list[int]
    documents: int


def task_prompt(documents: Seq[Seq[int]], query: Seq[int], vocab: Vocab, generate: int,
                max_len: int | None) -> Prompt:
    """<bos> [<doc> d </doc>] ... query: the training sequence up to the `generate` tokens the model now writes.

    The length rule of build_sequence: the prompt, the generated tokens and the <eos> after them must fit
    max_len; documents are dropped, the last first, and the query is never cut (too long alone: ValueError).
    The query is the main document's beginning: a caption and <img> (caption -> image), an image (image ->
    caption), or a document with a <mask:i> hole followed by the <mask:i> that opens its tail (infilling).
    """
    rest = len(query) + generate + 1
    if max_len is not None and 1 + rest > max_len:
        raise ValueError(f"the prompt needs {len(query)} tokens and {generate} more to generate, beyond the "
                         f"generator's {max_len}-token context even with no document in it: shorten the caption")
    kept = fit_documents([len(d) for d in documents], rest, max_len)
    return Prompt(context_ids(documents[:kept], vocab) + list(query), kept)


# ---------------------------------------------------------------------------------------------
# CM3 causal masking (Aghajanyan et al. 2022, "CM3", Sec. 2.1)
# ---------------------------------------------------------------------------------------------


def maskable_runs(seq: Sequence, vocab: Vocab, main_only: bool = False) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of text ids, or of one image's codes, inside one document.

    Spans are drawn inside these runs only, so a span never crosses a document boundary, never mixes text
    and image, never spans two images and never covers a special token (<bos>, <eos>, <doc>, </doc>,
    <img>, </img>): the wrappers stay in place and the masked sequence still parses.
    """
    ids = torch.as_tensor(seq.ids)
    kind = torch.zeros_like(ids)  # 1 = text id, 2 = image code, 0 = special
    kind[vocab.is_text(ids)] = 1
    kind[vocab.is_image(ids)] = 2
    main_doc = max(seq.doc_index) if seq.doc_index else -1
    runs, start = [], None
    kinds, docs = kind.tolist(), seq.doc_index
    for t in range(len(kinds) + 1):
        same = (start is not None and t < len(kinds) and kinds[t] == kinds[start] and docs[t] == docs[start])
        if start is not None and not same:
            runs.append((start, t))
            start = None
        if start is None and t < len(kinds) and kinds[t] != 0 and (not main_only or docs[t] == main_doc):
            start = t
    return runs


def sample_spans(seq: Sequence, vocab: Vocab, rng: np.random.Generator, max_spans: int = NUM_MASKS,
                 main_only: bool = False, max_tries: int = 20) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) spans, sorted, drawn as CM3 does.

    n ~ clamp(Poisson(1), 1, max_spans). Each span: a run chosen with probability proportional to its
    length, a length uniform in 1..len(run) (so a whole image or caption is sometimes masked: that is
    the caption->image and image->caption task), a start uniform among those that fit. A span that
    overlaps an earlier one is redrawn (max_tries); an image holds at most one span, so the number of
    codes a sentinel hides is N minus the codes still visible in its image (see position_ids).
    """
    runs = maskable_runs(seq, vocab, main_only)
    if not runs:
        return []
    n = int(np.clip(rng.poisson(1.0), 1, min(max_spans, NUM_MASKS)))
    lengths = np.array([e - s for s, e in runs], dtype=float)
    probs = lengths / lengths.sum()
    spans: list[tuple[int, int]] = []
    used_images: set[int] = set()
    for _ in range(n):
        for _ in range(max_tries):
            r = int(rng.choice(len(runs), p=probs))
            s0, e0 = runs[r]
            is_image = vocab.is_image(seq.ids[s0])
            if is_image and r in used_images:
                continue
            length = int(rng.integers(1, e0 - s0 + 1))
            start = int(rng.integers(s0, e0 - length + 1))
            if all(start >= e or start + length <= s for s, e in spans):
                spans.append((start, start + length))
                if is_image:
                    used_images.add(r)
                break
    return sorted(spans)


def apply_spans(seq: Sequence, spans: list[tuple[int, int]], vocab: Vocab) -> Sequence:
    """Replace span i (in order) by <mask:i> in place and re-emit `<mask:i> span` at the end, before <eos>.

    CM3 moves the masked spans to the end of the document so that a left-to-right model sees both sides
    of the hole before filling it. The tail goes before <eos> (when the sequence has one), so <eos> still
    means "all spans filled". The in-place sentinel has weight 0 (where a hole is cannot be predicted);
    the tail sentinel and the moved tokens keep the weight and doc_index of the span's document.
    """
    if len(spans) > NUM_MASKS:
        raise ValueError(f"{len(spans)} spans, but the vocabulary has only {NUM_MASKS} mask sentinels")
    if any(vocab.is_mask(t) for t in seq.ids):
        raise ValueError("the sequence is already masked (holds <mask:i>); masking applies to plain sequences")
    has_eos = bool(seq.ids) and seq.ids[-1] == vocab.eos_id
    body_end = len(seq.ids) - 1 if has_eos else len(seq.ids)
    ids, w, d = [], [], []
    tail_ids, tail_w, tail_d = [], [], []
    starts = {s: (i, e) for i, (s, e) in enumerate(spans)}
    t = 0
    while t < body_end:
        if t in starts:
            i, e = starts[t]
            if not (t < e <= body_end):
                raise ValueError(f"span {(t, e)} is empty or runs past the end of the document")
            ids.append(vocab.mask_id(i)); w.append(0.0); d.append(seq.doc_index[t])
            tail_ids += [vocab.mask_id(i), *seq.ids[t:e]]
            tail_w += [seq.weights[t], *seq.weights[t:e]]
            tail_d += [seq.doc_index[t], *seq.doc_index[t:e]]
            t = e
        else:
            ids.append(seq.ids[t]); w.append(seq.weights[t]); d.append(seq.doc_index[t])
            t += 1
    # Tail spans come out in sentinel order because spans are sorted by start.
    ids += tail_ids + seq.ids[body_end:]
    w += tail_w + seq.weights[body_end:]
    d += tail_d + seq.doc_index[body_end:]
    return Sequence(ids, w, d)


def cm3_mask(seq: Sequence, vocab: Vocab, rng: np.random.Generator | int | None = None, max_spans: int = NUM_MASKS,
             mask_rate: float = 1.0, main_only: bool = False) -> Sequence:
    """The CM3 causal-masked version of seq; with probability 1 - mask_rate the plain causal sequence.

    Spans may fall in any document (main_only=True restricts them to the main document); see
    sample_spans for how they are drawn and apply_spans for the layout.
    """
    if not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"mask_rate must be in [0, 1], got {mask_rate}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if mask_rate == 0.0 or rng.random() >= mask_rate:
        return seq
    return apply_spans(seq, sample_spans(seq, vocab, rng, max_spans, main_only), vocab)


def _parse_tail(ids: list[int], vocab: Vocab) -> tuple[dict[int, int], int, dict[int, tuple[int, int]]]:
    """(in-place position of each sentinel i, index where the tail starts, tail [start, end) of span i).

    The first <mask:i> is the hole, the second opens span i in the tail; a span runs until the next
    sentinel, <eos>, <pad> or the end. Without masks the tail starts at len(ids).
    """
    first: dict[int, int] = {}
    tail: dict[int, tuple[int, int]] = {}
    tail_start = len(ids)
    open_span = None
    for t, tok in enumerate(ids):
        if vocab.is_mask(tok):
            i = vocab.mask_index(tok)
            if open_span is not None:
                tail[open_span] = (tail[open_span][0], t)
                open_span = None
            if i not in first:
                if tail:
                    raise ValueError(f"<mask:{i}> opens a hole after the tail of masked spans began")
                first[i] = t
            elif i in tail:
                raise ValueError(f"<mask:{i}> appears more than twice")
            else:
                tail_start = min(tail_start, t)
                tail[i] = (t + 1, len(ids))
                open_span = i
        elif open_span is not None and tok in (vocab.eos_id, vocab.pad_id):
            tail[open_span] = (tail[open_span][0], t)
            open_span = None
    return first, tail_start, tail


def cm3_unmask(ids: Seq[int] | torch.Tensor, vocab: Vocab) -> list[int]:
    """Put every masked span back in its hole and drop the tail: the inverse of cm3_mask on ids."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    first, tail_start, tail = _parse_tail(ids, vocab)
    if not first:
        return ids
    missing = sorted(set(first) - set(tail))
    if missing:
        raise ValueError(f"<mask:{missing[0]}> has a hole but no span in the tail; the sequence is incomplete")
    out: list[int] = []
    for t in range(tail_start):
        tok = ids[t]
        if vocab.is_mask(tok):
            s, e = tail[vocab.mask_index(tok)]
            out += ids[s:e]
        else:
            out.append(tok)
    # After the last span: <eos> and padding, if any.
    last_end = max(e for _, e in tail.values())
    return out + ids[last_end:]


# ---------------------------------------------------------------------------------------------
# Image-aligned positions (docs/design.md, "The one sequence format")
# ---------------------------------------------------------------------------------------------


TEXT_AFTER_IMAGE = ("plain", "aligned")  # the rules for the text that follows an image (position_ids)


def position_ids(ids: Seq[int] | torch.Tensor, vocab: Vocab, image_base: int = DEFAULT_IMAGE_BASE,
                 tokens_per_image: int | None = None, text_after_image: str = "plain") -> torch.Tensor:
    """RoPE positions [T] where the same image cell has the same position in every image.

    Rule: a non-image token (text, special, sentinel) at index t gets position t, its plain position.
    An image code gets image_base + c, where c is its cell (row-major index in the code grid) in its
    image: the k-th code after <img> has c = k. So a retrieved image's cell c and the main image's cell c
    sit at one fixed relative offset, 0, and copying a cell is easy to learn. image_base must exceed every
    text position (len(ids) <= image_base is checked); the model's RoPE must allow image_base + N.

    Masked images: a sentinel inside an image hides N - (codes visible in that image) cells (cm3_mask puts at
    most one span per image), so the codes after it keep their true cells; the span's codes re-emitted in
    the tail get the cells they came from. N is tokens_per_image, or, if None, the tail span's length.
    With tokens_per_image given, positions of a prefix never depend on tokens past the end of the current
    image, so decoding with a KV cache sees the same positions as a full forward pass.

    text_after_image="aligned" extends the image's rule to the text right after it (an image-first caption):
    </img> gets image_base + N and the j-th token of the text run that follows (text tokens and in-text
    sentinels, up to any other token) image_base + N + 1 + j, so copying a retrieved document's caption is the
    same one-step lookup as copying its image; a masked span of that run re-emitted in the tail continues from
    its sentinel's position, and the text after the hole from the sentinel's + 1 (unlike an image's, a text
    span's length is not known while decoding, so it cannot be skipped). Text before an image (caption ->
    image) keeps its plain positions, which tell the documents apart.
    """
    if text_after_image not in TEXT_AFTER_IMAGE:
        raise ValueError(f"text_after_image must be one of {TEXT_AFTER_IMAGE}, got {text_after_image!r}")
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if len(ids) > image_base:
        raise ValueError(f"sequence of {len(ids)} tokens is longer than image_base={image_base}: text positions "
                         "would collide with image positions; raise image_base")
    first, tail_start, tail = _parse_tail(ids, vocab)
    pos = list(range(len(ids)))
    start_cell: dict[int, int] = {}
    cells: dict[int, int] = {}  # each image's cell count, by the index of its </img>
    images = _image_spans(ids[:tail_start], vocab)
    for open_t, close_t in images:
        inner = range(open_t + 1, close_t)
        visible = sum(1 for t in inner if vocab.is_image(ids[t]))
        holes = [t for t in inner if vocab.is_mask(ids[t])]
        if len(holes) > 1:
            raise ValueError(f"an image holds {len(holes)} masked spans; position_ids supports at most one per image")
        c = 0
        for t in inner:
            if vocab.is_image(ids[t]):
                pos[t] = image_base + c
                c += 1
            elif vocab.is_mask(ids[t]):
                i = vocab.mask_index(ids[t])
                start_cell[i] = c
                if tokens_per_image is not None:
                    c += tokens_per_image - visible
                elif i in tail:
                    c += tail[i][1] - tail[i][0]
                else:
                    raise ValueError(f"<mask:{i}> inside an image: pass tokens_per_image to place the codes after it")
        cells[close_t] = c
    for i, (s, e) in tail.items():
        if i in start_cell:
            for j, t in enumerate(range(s, e)):
                if vocab.is_image(ids[t]):
                    pos[t] = image_base + start_cell[i] + j
    if text_after_image == "aligned":
        _align_text_after_images(ids, pos, vocab, image_base, tokens_per_image, tail_start, tail, cells)
    return torch.tensor(pos, dtype=torch.long)


def _align_text_after_images(ids: list[int], pos: list[int], vocab: Vocab, image_base: int,
                             tokens_per_image: int | None, tail_start: int, tail: dict[int, tuple[int, int]],
                             cells: dict[int, int]) -> None:
    """text_after_image="aligned", in place (see position_ids); cells: each image's cell count by its </img>."""
    sentinel_at: dict[int, int] = {}  # sentinel i of an aligned text run: its position
    for close_t, counted in cells.items():
        if close_t >= tail_start:
            continue  # an image still being written: no text after it yet
        n = tokens_per_image if tokens_per_image is not None else counted
        pos[close_t] = image_base + n
        t = close_t + 1
        while t < tail_start and (vocab.is_text(ids[t]) or vocab.is_mask(ids[t])):
            pos[t] = image_base + n + 1 + (t - close_t - 1)
            if vocab.is_mask(ids[t]):
                sentinel_at[vocab.mask_index(ids[t])] = pos[t]
            t += 1
    for i, (s, e) in tail.items():
        if i in sentinel_at:
            for j, t in enumerate(range(s, e)):
                if vocab.is_text(ids[t]):
                    pos[t] = sentinel_at[i] + j


def collate(seqs: list[Sequence], vocab: Vocab, image_base: int = DEFAULT_IMAGE_BASE,
            tokens_per_image: int | None = None, text_after_image: str = "plain") -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids [B, T] (pad_id), attention_mask [B, T], loss_weights [B, T] (0 on pads),
    position_ids [B, T] (image-aligned; 0 on pads)."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), vocab.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_weights = torch.zeros((B, T), dtype=torch.float32)
    positions = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_weights[b, :n] = torch.tensor(s.weights, dtype=torch.float32)
        positions[b, :n] = position_ids(s.ids, vocab, image_base, tokens_per_image, text_after_image)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_weights": loss_weights,
            "position_ids": positions}
