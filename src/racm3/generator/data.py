"""Retrieval-augmented training sequences: which documents go in a training document's context, and how.

The paper (Sec. 3.3) retrieves with the training document's text or image part, drops 20% of the query,
skips near-duplicates (score > 0.9) and trains on [retrieved][main] with the CM3 objective. At our scale a
generator trained only that way memorizes its training set and ignores its context (docs/design.md, "Teaching a
small generator to read its memory"), so a share of the sequences are *lessons*, each built so that one use of
the context is necessary (Recipe has the shares):

- copy: the document itself in context (copy the image, or the caption);
- sibling: a same-concept, same-style document (a skin-tone variant: copy and adapt);
- cross_style: the other style's drawing of the concept (transfer);
- relabel (caption lessons): image first, the caption swapped for another concept's in the main document and in
  its copy in context: only the context says what this image is called, recalling the memorised name is wrong;
- distractor: the document and 1..k-1 documents of other concepts (of its style or another), in random order:
  the caption (caption -> image) or the image (image -> caption) decides which document to copy;
- style: k demonstrations of *other* concepts, all in the document's style S, then the document caption first;
  its concept is drawn in another style too, so only the demonstrations say which style to draw.

The rest is the paper's retrieval, k ~ U{0..K}. A lesson a document cannot have (no sibling, a concept drawn in
one style only, no other concept to borrow from) falls back to retrieval.

Documents without a concept (a folder or Parquet of captioned images) take one from their nearest neighbours in
the memory (train.retrieval_candidates finds them): siblings are the nearest by image, cross-style partners the
nearest by caption that are not near by image, and "another concept" is any document outside both lists whose
caption differs. Style lessons need a style: documents without one never get them.

Interleaved documents (DocTokens.segments: e.g. text, image, text, image) take part as they are, in their order:
copy, sibling, cross-style and retrieval show them whole, as the main document or in context. The caption,
distractor and style lessons are built from *the* caption and *the* image of a document, put in a chosen order or
swapped for another's; an interleaved document has no one pair to take apart without making a sequence that is no
document, so those lessons skip it (as main document it gets the paper's retrieval instead; it is never borrowed
as another concept, a distractor or a demonstration).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields

import numpy as np
import torch

from racm3.tokenizers.sequence import Sequence, build_sequence, cm3_mask, collate, fit_documents, weigh_main_text
from racm3.tokenizers.vocab import Vocab

# The lessons, in the order a sequence's uniform draw is matched against their shares (Recipe.lesson).
LESSONS = ("copy", "sibling", "cross_style", "relabel", "distractor", "style")


@dataclass(frozen=True)
class Recipe:
    """How training sequences are drawn. Each lesson's share (`<lesson>_rate`, LESSONS) is per training sequence;
    the shares must sum to <= 1 and the rest is the paper's retrieval. The defaults are the v2 recipe;
    RECIPES["v1"] is the shipped emoji-small's (scripts/train_emoji_small.sh passes --recipe v1).

    With k = 0 (the no-retrieval baseline) every context is empty, so the lesson shares have no effect.
    """

    k: int = 2  # at most k documents in context (the paper's K)
    alpha: float = 0.1  # loss weight of retrieved tokens (L = L_main + alpha * L_retrieved)
    text_weight: float = 1.0  # loss weight of the main document's caption tokens (its image codes: 1)
    copy_rate: float = 0.15  # context = the document itself; 0 = the paper's rule (never retrieve yourself)
    sibling_rate: float = 0.1  # a same-concept, same-style sibling (skin-tone variant)
    cross_style_rate: float = 0.15  # the other art style's drawing of the same concept
    relabel_rate: float = 0.15  # caption lessons: another concept's caption on this image, its copy in context
    distractor_rate: float = 0.15  # the document among distractors: the prompt decides which to copy
    style_rate: float = 0.1  # demonstrations of other concepts in the document's style decide the style
    # v1's distractors: another concept's drawing added to any context with room (after a lesson or retrieval),
    # at this rate; v2 has them as lessons of their own (distractor_rate) instead.
    extra_distractor_rate: float = 0.0
    mask_rate: float = 0.25  # share of sequences CM3-masked; the rest are plain causal (the generation tasks)
    text_first_rate: float = 0.5  # caption-then-image (caption->image) vs image-then-caption (image->caption)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_rate") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ValueError(f"{f.name} must lie in [0, 1], got {getattr(self, f.name)}")
        total = sum(getattr(self, f"{name}_rate") for name in LESSONS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"the lesson shares {' + '.join(f'{n}_rate' for n in LESSONS)} = {total:.2f} > 1")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if not (0 < self.text_weight < math.inf):
            raise ValueError(f"text_weight must be a finite number > 0, got {self.text_weight}")

    def lesson(self, r: float) -> str | None:
        """The lesson a uniform draw r in [0, 1) picks, shares taken in LESSONS order; None: the paper's retrieval."""
        edge = 0.0
        for name in LESSONS:
            edge += getattr(self, f"{name}_rate")
            if r < edge:
                return name
        return None


RECIPES = {
    # The shipped emoji-small: copy, sibling and cross-style lessons, distractors added where there was room.
    "v1": Recipe(copy_rate=0.35, sibling_rate=0.2, cross_style_rate=0.2, relabel_rate=0.0, distractor_rate=0.0,
                 style_rate=0.0, extra_distractor_rate=0.25),
    # Every use of the context a lesson: caption, distractor and style lessons beside the copy lessons.
    "v2": Recipe(),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass(frozen=True)
class DocTokens:
    """One document as vocabulary ids: its caption and its image (<img> codes </img>); concept and style are
    "" where the document has none.

    A document of at most one caption and one image has no fixed order: each task puts the two in its own
    (caption -> image or image -> caption), and segments is (). An interleaved document (more captions or images
    than that, e.g. text, image, text, image) is its order: segments holds its runs in order (codes_document_runs),
    ids gives them so whatever the task, and text and image are its first caption and first image.
    """

    text: tuple[int, ...]
    image: tuple[int, ...]
    concept: str
    style: str
    segments: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_runs(cls, runs: list[list[int]], concept: str, style: str, img_id: int) -> "DocTokens":
        """A document's runs (MultimodalTokenizer.codes_document_runs) as DocTokens: segments kept where interleaved."""
        texts = [tuple(r) for r in runs if r[0] != img_id]
        images = [tuple(r) for r in runs if r[0] == img_id]
        segments = tuple(tuple(r) for r in runs) if len(texts) > 1 or len(images) > 1 else ()
        return cls(texts[0] if texts else (), images[0] if images else (), concept, style, segments)

    @classmethod
    def from_dict(cls, d: dict) -> "DocTokens":
        """The inverse of dataclasses.asdict (a JSON cache's record); a record without segments is not interleaved."""
        return cls(tuple(d["text"]), tuple(d["image"]), d["concept"], d["style"],
                   tuple(tuple(r) for r in d.get("segments", ())))

    @property
    def interleaved(self) -> bool:
        return bool(self.segments)

    @property
    def starts_with_text(self) -> bool | None:
        """Whether an interleaved document begins with text (None for the others, whose order the task picks)."""
        return self.segments[0] == self.text if self.segments else None

    def ids(self, text_first: bool) -> list[int]:
        if self.segments:
            return [t for run in self.segments for t in run]
        return list(self.text + self.image) if text_first else list(self.image + self.text)

    def __len__(self) -> int:
        return sum(map(len, self.segments)) if self.segments else len(self.text) + len(self.image)


def document_tokens(docs, mt, batch_size: int = 256) -> list[DocTokens]:
    """Each document's ids (DocTokens), the VQ run once per image, in batches.

    The one document -> ids conversion of training and inference alike, the tokenizer's own (codes_document_runs):
    DocTokens.ids puts a caption and an image in the task's order, an interleaved document's segments in theirs.
    """
    out = []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        drawn = [im for d in chunk for im in d.images]
        codes = iter(mt.encode_images(drawn).tolist() if drawn else [])
        for d in chunk:
            runs = mt.codes_document_runs([s if isinstance(s, str) else next(codes) for s in d.segments])
            out.append(DocTokens.from_runs(runs, d.concept or "", d.style or "", mt.vocab.img_id))
    return out


def tokenize_documents(docs, mt, batch_size: int = 256) -> dict[str, DocTokens]:
    """document_tokens keyed by document id (a training set's ids are unique)."""
    return {d.id: t for d, t in zip(docs, document_tokens(docs, mt, batch_size))}


Lesson = tuple[list[int], list[list[int]]]  # (the main document's ids, the ids of each document in its context)


class ExampleBank:
    """Token ids of every training document plus its ranked retrieval candidates (precomputed once).

    candidates[doc_id] = {"text": [...], "image": [...]}: ids found by querying the memory with the document's
    caption or image (with query dropout), near-duplicates and other splits already removed; for a document
    without a concept also "text_neighbours" and "image_neighbours": its nearest documents by caption and by
    image (no dropout, near-duplicates kept), which stand in for its concept (module docstring).
    """

    def __init__(self, docs: dict[str, DocTokens], candidates: dict[str, dict[str, list[str]]] | None = None,
                 max_len: int | None = None):
        if not docs:
            raise ValueError("no training documents")
        self.docs, self.max_len = docs, max_len  # max_len: the generator's context (GeneratorConfig.max_len)
        self.ids = sorted(docs)
        self.candidates = candidates or {}
        self.by_concept: dict[str, list[str]] = defaultdict(list)
        self.by_style: dict[str, list[str]] = defaultdict(list)
        for i in self.ids:
            if docs[i].concept:
                self.by_concept[docs[i].concept].append(i)
            self.by_style[docs[i].style].append(i)

    def __len__(self) -> int:
        return len(self.ids)

    def neighbours(self, doc_id: str, by: str) -> list[str]:
        """The nearest training documents by caption (by="text") or image (by="image"), nearest first; only
        documents without a concept have them."""
        found = self.candidates.get(doc_id, {}).get(f"{by}_neighbours", [])
        return [i for i in found if i != doc_id and i in self.docs]

    def related(self, doc_id: str) -> set[str]:
        """The documents taken to show the document's concept, itself included: by concept, else its neighbours."""
        d = self.docs[doc_id]
        if d.concept:
            return set(self.by_concept[d.concept])
        return {doc_id, *self.neighbours(doc_id, "text"), *self.neighbours(doc_id, "image")}

    def siblings(self, doc_id: str) -> list[str]:
        """Same concept, same style; without a concept, the nearest document by image (of the same style)."""
        d = self.docs[doc_id]
        if d.concept:
            return [i for i in self.by_concept[d.concept] if i != doc_id and self.docs[i].style == d.style]
        return [i for i in self.neighbours(doc_id, "image") if self.docs[i].style == d.style][:1]

    def other_styles(self, doc_id: str) -> list[str]:
        """The same caption drawn in another style first, then any same-concept document in another style.

        Without a concept: the nearest documents by caption that are not among the nearest by image (the same
        words drawn otherwise), of another style where the document has one.
        """
        d = self.docs[doc_id]
        if d.concept:
            same = [i for i in self.by_concept[d.concept] if self.docs[i].style != d.style]
            return sorted(same, key=lambda i: self.docs[i].text != d.text)
        near = set(self.neighbours(doc_id, "image"))
        return [i for i in self.neighbours(doc_id, "text")
                if i not in near and (not d.style or self.docs[i].style != d.style)]

    def other_concept(self, doc_id: str, rng: np.random.Generator, style: str | None = None,
                      exclude=()) -> str | None:
        """A random document of another concept (in `style` when given) and with another caption, not in exclude:
        a distractor, a style demonstration or the caption a relabel lesson borrows. None after 8 tries."""
        pool = self.ids if style is None else self.by_style.get(style, [])
        if not pool:
            return None
        related, text = self.related(doc_id), self.docs[doc_id].text
        for _ in range(8):
            other = pool[int(rng.integers(len(pool)))]
            if (other not in related and other not in exclude and self.docs[other].text != text
                    and not self.docs[other].interleaved):  # module docstring: never borrowed
                return other
        return None

    def _fits(self, doc_id: str, context: list[str]) -> bool:
        """Whether the document with all of context before it fits max_len (build_sequence would drop none)."""
        size = [len(self.docs[i]) for i in [doc_id, *context]]
        return fit_documents(size[1:], size[0] + 1, self.max_len) == len(context)

    def context(self, doc_id: str, lesson: str | None, recipe: Recipe, rng: np.random.Generator) -> list[str]:
        """The document ids in context for a copy, sibling or cross-style lesson, else the paper's retrieval."""
        if recipe.k == 0:
            return []
        pick: str | None = None
        if lesson == "copy":
            pick = doc_id
        elif lesson == "sibling":
            pool = self.siblings(doc_id) or self.other_styles(doc_id)
            pick = pool[int(rng.integers(len(pool)))] if pool else doc_id
        elif lesson == "cross_style":
            pool = self.other_styles(doc_id)  # same caption first; None falls through to retrieval
            pick = pool[0] if pool else None
        ctx: list[str]
        cands = self.candidates.get(doc_id, {})
        query = "text" if rng.random() < 0.5 else "image"
        retrieved = [c for c in cands.get(query, []) if c != doc_id]
        if pick is not None:
            # A lesson shares the context with a retrieved neighbour half the time: real contexts hold both.
            ctx = [pick]
            if recipe.k > 1 and retrieved and retrieved[0] != pick and rng.random() < 0.5:
                ctx.append(retrieved[0])
        else:
            n = int(rng.integers(0, recipe.k + 1))  # k ~ U{0..K}: the model also learns to work without retrieval
            ctx = retrieved[:n]
        if len(ctx) < recipe.k and rng.random() < recipe.extra_distractor_rate:
            other = self.other_concept(doc_id, rng, exclude=ctx)  # v1: placed anywhere, the caption decides
            if other is not None:
                ctx.insert(int(rng.integers(len(ctx) + 1)), other)
        return ctx[: recipe.k]

    def distractor_context(self, doc_id: str, k: int, rng: np.random.Generator) -> list[str] | None:
        """The document and 1..k-1 distractors, in random order; each distractor of the document's style or of
        another at random, so neither position nor style says which to copy. None when none can be placed, and for
        an interleaved document (module docstring)."""
        d, ctx = self.docs[doc_id], [doc_id]
        if d.interleaved:
            return None
        styles = [s for s in self.by_style if s != d.style]
        for _ in range(int(rng.integers(1, k)) if k > 1 else 0):
            style = styles[int(rng.integers(len(styles)))] if styles and rng.random() < 0.5 else d.style
            other = self.other_concept(doc_id, rng, style, exclude=ctx)
            if other is not None and self._fits(doc_id, ctx + [other]):  # never crowd out the right document
                ctx.insert(int(rng.integers(len(ctx) + 1)), other)
        return ctx if len(ctx) > 1 else None

    def style_demos(self, doc_id: str, style: str, k: int, rng: np.random.Generator) -> list[str] | None:
        """k demonstrations in `style` of other concepts than the document's. None where they would teach nothing:
        a document without a style, or whose concept is drawn in one style only (its caption alone says the style),
        and an interleaved one (module docstring)."""
        if not self.docs[doc_id].style or self.docs[doc_id].interleaved or not self.other_styles(doc_id):
            return None
        demos: list[str] = []
        for _ in range(k):
            other = self.other_concept(doc_id, rng, style, exclude=demos)
            if other is not None:
                demos.append(other)
        return demos or None

    def relabel(self, doc_id: str, recipe: Recipe, rng: np.random.Generator) -> Lesson | None:
        """A caption lesson: [<doc> image, other caption </doc>] (+ a retrieved neighbour, in random order)
        [image, other caption], where the other caption is another concept's. None when there is none, and for an
        interleaved document (module docstring)."""
        if self.docs[doc_id].interleaved:
            return None
        other = self.other_concept(doc_id, rng)
        if other is None:
            return None
        main = list(self.docs[doc_id].image + self.docs[other].text)
        ctx = [main]
        neighbour = next((c for c in self.candidates.get(doc_id, {}).get("image", []) if c != doc_id), None)
        if recipe.k > 1 and neighbour is not None and rng.random() < 0.5:
            ctx.insert(int(rng.integers(2)), self.docs[neighbour].ids(text_first=False))
        return main, ctx

    def lesson(self, doc_id: str, recipe: Recipe, rng: np.random.Generator) -> Lesson:
        """One training sequence's main document and context, as ids, drawn by the recipe (module docstring)."""
        kind = recipe.lesson(float(rng.random())) if recipe.k else None
        made: Lesson | None = None
        if kind == "relabel":
            made = self.relabel(doc_id, recipe, rng)
        elif kind == "distractor":
            ctx = self.distractor_context(doc_id, recipe.k, rng)
            text_first = bool(rng.random() < recipe.text_first_rate)
            made = None if ctx is None else self._ids(doc_id, ctx, text_first)
        elif kind == "style":
            demos = self.style_demos(doc_id, self.docs[doc_id].style, recipe.k, rng)
            made = None if demos is None else self._ids(doc_id, demos, text_first=True)  # caption -> image
        if made is not None:
            return made
        ctx = self.context(doc_id, kind, recipe, rng)
        return self._ids(doc_id, ctx, text_first=bool(rng.random() < recipe.text_first_rate))

    def _ids(self, doc_id: str, context: list[str], text_first: bool) -> Lesson:
        """The main document and its context in one order; an interleaved main document's own order decides it."""
        main = self.docs[doc_id]
        if main.interleaved:
            text_first = main.starts_with_text
        return main.ids(text_first), [self.docs[c].ids(text_first) for c in context]

    def sequence(self, doc_id: str, context: list[str], vocab: Vocab, recipe: Recipe, text_first: bool) -> Sequence:
        """[<doc> c1 </doc>]...[main]: every document in the same order (caption first or image first)."""
        return build_sequence(*self._ids(doc_id, context, text_first), vocab, alpha=recipe.alpha, max_len=self.max_len)

    def sample(self, doc_id: str, vocab: Vocab, recipe: Recipe, rng: np.random.Generator) -> Sequence:
        seq = build_sequence(*self.lesson(doc_id, recipe, rng), vocab, alpha=recipe.alpha, max_len=self.max_len)
        return weigh_main_text(cm3_mask(seq, vocab, rng, mask_rate=recipe.mask_rate), vocab, recipe.text_weight)


def batch(seqs: list[Sequence], vocab: Vocab, image_base: int, tokens_per_image: int,
          text_after_image: str = "plain") -> dict[str, torch.Tensor]:
    """collate + main_mask [B, T]: True on the main document's tokens (for L_main vs L_retrieved)."""
    out = collate(seqs, vocab, image_base=image_base, tokens_per_image=tokens_per_image,
                  text_after_image=text_after_image)
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
                 tokens_per_image: int, seed: int | list[int], text_after_image: str = "plain"):
        super().__init__()
        self.bank, self.vocab, self.recipe, self.batch_size = bank, vocab, recipe, batch_size
        self.image_base, self.tokens_per_image, self.seed = image_base, tokens_per_image, seed
        self.text_after_image = text_after_image

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
            out = batch(seqs, self.vocab, self.image_base, self.tokens_per_image, self.text_after_image)
            out["tokens"] = torch.tensor(sum(len(s) for s in seqs))
            yield out
