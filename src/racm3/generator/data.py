"""Retrieval-augmented training sequences: which documents go in a training document's context, and how.

The paper (Sec. 3.3) retrieves with the training document's text or image part, drops 20% of the query,
skips near-duplicates (score > 0.9) and trains on [retrieved][main] with the CM3 objective. At our scale a
generator trained only that way memorizes its training set and ignores its context (docs/design.md, "Teaching a small
generator to use its memory"), so the context also holds *lessons*: the document itself (learn to copy), a
same-concept sibling in the same style (a skin-tone variant: copy and adapt), the other style's drawing of
the concept (transfer), and distractors (another concept's drawing: learn to check the caption first).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from racm3.tokenizers.sequence import Sequence, build_sequence, cm3_mask, collate
from racm3.tokenizers.vocab import Vocab


@dataclass(frozen=True)
class Recipe:
    """How training contexts are drawn; shares are per training sequence and are checked to sum to <= 1.

    With k = 0 (the no-retrieval baseline) every context is empty, so the lesson shares have no effect.
    """

    k: int = 2  # at most k documents in context (the paper's K)
    alpha: float = 0.1  # loss weight of retrieved tokens (L = L_main + alpha * L_retrieved)
    copy_rate: float = 0.35  # context = the document itself; 0 = the paper's rule (never retrieve yourself)
    sibling_rate: float = 0.2  # a same-concept, same-style sibling (skin-tone variant)
    cross_style_rate: float = 0.2  # the other art style's drawing of the same concept
    distractor_rate: float = 0.25  # add another concept's drawing where the context has room
    mask_rate: float = 0.25  # share of sequences CM3-masked; the rest are plain causal (the generation tasks)
    text_first_rate: float = 0.5  # caption-then-image (caption->image) vs image-then-caption (image->caption)
    # Relabel lessons: image first, the document's caption swapped for another concept's, in the main document
    # and in its copy in context. Only the context says what this image is called, so the model must copy the
    # caption rather than recall the one it memorised for the image (see ExampleBank.relabel).
    relabel_rate: float = 0.0

    def __post_init__(self) -> None:
        lessons = self.copy_rate + self.sibling_rate + self.cross_style_rate
        for name in ("copy_rate", "sibling_rate", "cross_style_rate", "distractor_rate", "mask_rate", "text_first_rate",
                     "relabel_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if lessons > 1.0:
            raise ValueError(f"copy_rate + sibling_rate + cross_style_rate = {lessons:.2f} > 1")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")


@dataclass(frozen=True)
class DocTokens:
    """One document as vocabulary ids: its caption and its image (<img> codes </img>)."""

    text: tuple[int, ...]
    image: tuple[int, ...]
    concept: str
    style: str

    def ids(self, text_first: bool) -> list[int]:
        return list(self.text + self.image) if text_first else list(self.image + self.text)


def document_tokens(docs, mt, batch_size: int = 256) -> list[DocTokens]:
    """Each document's caption ids and <img> codes </img> ids (either may be empty), the VQ run once per image.

    The one document -> ids conversion of training and inference alike; DocTokens.ids puts the two parts in the
    task's order.
    """
    vocab = mt.vocab
    out = []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        drawn = [d.image for d in chunk if d.image is not None]
        codes = iter(mt.encode_images(drawn).tolist() if drawn else [])
        for d in chunk:
            text = tuple(vocab.text_to_vocab(mt.text.encode(d.text))) if d.text else ()
            image = (vocab.img_id, *vocab.image_to_vocab(next(codes)), vocab.img_end_id) if d.image is not None else ()
            out.append(DocTokens(text, image, d.concept or d.id, d.style or ""))
    return out


def tokenize_documents(docs, mt, batch_size: int = 256) -> dict[str, DocTokens]:
    """document_tokens keyed by document id (a training set's ids are unique)."""
    return {d.id: t for d, t in zip(docs, document_tokens(docs, mt, batch_size))}


class ExampleBank:
    """Token ids of every training document plus its ranked retrieval candidates (precomputed once).

    candidates[doc_id] = {"text": [...], "image": [...]}: ids found by querying the memory with the document's
    caption or image (with query dropout), near-duplicates and other splits already removed.
    """

    def __init__(self, docs: dict[str, DocTokens], candidates: dict[str, dict[str, list[str]]] | None = None,
                 max_len: int | None = None):
        if not docs:
            raise ValueError("no training documents")
        self.docs, self.max_len = docs, max_len  # max_len: the generator's context (GeneratorConfig.max_len)
        self.ids = sorted(docs)
        self.candidates = candidates or {}
        self.by_concept_style: dict[tuple[str, str], list[str]] = defaultdict(list)
        for i in self.ids:
            self.by_concept_style[(docs[i].concept, docs[i].style)].append(i)

    def __len__(self) -> int:
        return len(self.ids)

    def siblings(self, doc_id: str) -> list[str]:
        d = self.docs[doc_id]
        return [i for i in self.by_concept_style[(d.concept, d.style)] if i != doc_id]

    def other_styles(self, doc_id: str) -> list[str]:
        """The same caption drawn in another style first, then any same-concept document in another style."""
        d = self.docs[doc_id]
        same = [i for (c, s), ids in self.by_concept_style.items() if c == d.concept and s != d.style for i in ids]
        return sorted(same, key=lambda i: self.docs[i].text != d.text)

    def context(self, doc_id: str, recipe: Recipe, rng: np.random.Generator) -> list[str]:
        """The ids placed in the document's context for one training sequence (see the module docstring)."""
        if recipe.k == 0:
            return []
        d = self.docs[doc_id]
        r = rng.random()
        lesson: str | None = None
        if r < recipe.copy_rate:
            lesson = doc_id
        elif r < recipe.copy_rate + recipe.sibling_rate:
            pool = self.siblings(doc_id) or self.other_styles(doc_id)
            lesson = pool[int(rng.integers(len(pool)))] if pool else doc_id
        elif r < recipe.copy_rate + recipe.sibling_rate + recipe.cross_style_rate:
            pool = self.other_styles(doc_id)  # same caption first; None falls through to retrieval
            lesson = pool[0] if pool else None
        ctx: list[str]
        cands = self.candidates.get(doc_id, {})
        query = "text" if rng.random() < 0.5 else "image"
        retrieved = [c for c in cands.get(query, []) if c != doc_id]
        if lesson is not None:
            # A lesson shares the context with a retrieved neighbour half the time: real contexts hold both.
            ctx = [lesson]
            if recipe.k > 1 and retrieved and retrieved[0] != lesson and rng.random() < 0.5:
                ctx.append(retrieved[0])
        else:
            n = int(rng.integers(0, recipe.k + 1))  # k ~ U{0..K}: the model also learns to work without retrieval
            ctx = retrieved[:n]
        if len(ctx) < recipe.k and rng.random() < recipe.distractor_rate:
            # A distractor: another concept's drawing, placed anywhere; the caption decides what to copy.
            for _ in range(8):
                other = self.ids[int(rng.integers(len(self.ids)))]
                if self.docs[other].concept != d.concept and other not in ctx:
                    ctx.insert(int(rng.integers(len(ctx) + 1)), other)
                    break
        return ctx[: recipe.k]

    def sequence(self, doc_id: str, context: list[str], vocab: Vocab, recipe: Recipe, text_first: bool) -> Sequence:
        """[<doc> c1 </doc>]...[main]: every document in the same order (caption first or image first)."""
        return build_sequence(self.docs[doc_id].ids(text_first), [self.docs[c].ids(text_first) for c in context],
                              vocab, alpha=recipe.alpha, max_len=self.max_len)

    def relabel(self, doc_id: str, vocab: Vocab, recipe: Recipe, rng: np.random.Generator) -> Sequence:
        """A relabel lesson: [<doc> image, other caption </doc>] (+ a retrieved neighbour, in random order)
        [image, other caption], where the other caption is a different concept's."""
        d = self.docs[doc_id]
        for _ in range(8):
            other = self.docs[self.ids[int(rng.integers(len(self.ids)))]]
            if other.concept != d.concept:
                break
        main = list(d.image + other.text)
        ctx = [main]
        cands = self.candidates.get(doc_id, {}).get("image", [])
        neighbour = next((c for c in cands if c != doc_id), None)
        if recipe.k > 1 and neighbour is not None and rng.random() < 0.5:
            ctx.insert(int(rng.integers(2)), self.docs[neighbour].ids(text_first=False))
        return build_sequence(main, ctx, vocab, alpha=recipe.alpha, max_len=self.max_len)

    def sample(self, doc_id: str, vocab: Vocab, recipe: Recipe, rng: np.random.Generator) -> Sequence:
        if recipe.k and recipe.relabel_rate and rng.random() < recipe.relabel_rate:
            seq = self.relabel(doc_id, vocab, recipe, rng)
        else:
            seq = self.sequence(doc_id, self.context(doc_id, recipe, rng), vocab, recipe,
                                text_first=bool(rng.random() < recipe.text_first_rate))
        return cm3_mask(seq, vocab, rng, mask_rate=recipe.mask_rate)


def batch(seqs: list[Sequence], vocab: Vocab, image_base: int, tokens_per_image: int) -> dict[str, torch.Tensor]:
    """collate + main_mask [B, T]: True on the main document's tokens (for L_main vs L_retrieved)."""
    out = collate(seqs, vocab, image_base=image_base, tokens_per_image=tokens_per_image)
    main = torch.zeros_like(out["attention_mask"], dtype=torch.bool)
    for b, s in enumerate(seqs):
        k = max(s.doc_index)
        main[b, : len(s)] = torch.tensor([d == k for d in s.doc_index])
    out["main_mask"] = main
    return out


class TrainingBatches(torch.utils.data.IterableDataset):
    """Endless collated training batches drawn by the recipe, each epoch a fresh permutation of the documents.

    Run through a DataLoader: with workers, contexts, CM3 masking, positions and collation are built in other
    processes while the step runs (what a GPU needs); with none, inline (what a 2-core CPU wants: building is
    under 1% of a CPU step, and a worker would take a core from the matrix multiplies). Each worker draws from
    its own stream, seeded by (seed, rank, start step, worker). Each batch carries "tokens": its real
    (non-padding) token count, counted here so the step never syncs with the device to count them.
    """

    def __init__(self, bank: ExampleBank, vocab: Vocab, recipe: Recipe, batch_size: int, image_base: int,
                 tokens_per_image: int, seed: int | list[int]):
        super().__init__()
        self.bank, self.vocab, self.recipe, self.batch_size = bank, vocab, recipe, batch_size
        self.image_base, self.tokens_per_image, self.seed = image_base, tokens_per_image, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed if info is None else [*np.atleast_1d(self.seed).tolist(), info.id]
        rng = np.random.default_rng(seed)
        order: list[int] = []
        while True:
            if len(order) < self.batch_size:
                order += rng.permutation(len(self.bank)).tolist()
            picks, order = order[:self.batch_size], order[self.batch_size:]
            seqs = [self.bank.sample(self.bank.ids[i], self.vocab, self.recipe, rng) for i in picks]
            out = batch(seqs, self.vocab, self.image_base, self.tokens_per_image)
            out["tokens"] = torch.tensor(sum(len(s) for s in seqs))
            yield out
