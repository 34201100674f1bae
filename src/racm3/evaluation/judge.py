"""Judge accuracy: does a generated image's nearest concept name under the encoder, or a generated caption, name the right concept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from racm3.evaluation.text import words

SKIN_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


@dataclass
class JudgeResult:
    """accuracy over all items; predictions[i]: the concept name the judge read from item i; correct[i]: it is right."""

    accuracy: float
    predictions: list[str]
    correct: list[bool]


def concept_words(caption: str) -> str:
    """A caption's normalised words with its skin-tone modifiers removed: the concept it names.

    Emoji concepts group a base and its skin-tone variants ("thumbs up: dark skin tone" -> "thumbs up",
    "man: light skin tone, red hair" -> "man red hair"), matching the data set's `concept` field.
    """
    w = words(caption)
    out, i = [], 0
    while i < len(w):
        if w[i] in SKIN_TONES and w[i + 1:i + 3] == ["skin", "tone"]:
            i += 3
            continue
        out.append(w[i])
        i += 1
    return " ".join(out)


def name_match(generated: str, true_caption: str, concept: str | None = None) -> bool:
    """A generated caption names the right concept.

    Both sides are normalised (lowercase, punctuation and extra spaces dropped). It counts when it equals the
    true caption, or, given the concept, when it names that concept up to skin tone: "thumbs up" and
    "thumbs up: light skin tone" both count for a "thumbs up: dark skin tone" image (concept "thumbs up"),
    as the image judge also works at the concept level. A caption that merely contains the name
    ("thumbs up and down") does not count.
    """
    gen = words(generated)
    if gen and gen == words(true_caption):
        return True
    return concept is not None and bool(gen) and concept_words(generated) == concept_words(concept)


def name_accuracy(generated: Sequence[str], true_captions: Sequence[str],
                  concepts: Sequence[str | None] | None = None) -> JudgeResult:
    """name_match over a list; predictions are the generated captions themselves."""
    if len(generated) != len(true_captions) or (concepts is not None and len(concepts) != len(generated)):
        raise ValueError("generated, true_captions and concepts must have the same length")
    concepts = concepts if concepts is not None else [None] * len(generated)
    correct = [name_match(g, t, c) for g, t, c in zip(generated, true_captions, concepts)]
    return JudgeResult(float(np.mean(correct)) if correct else 0.0, list(generated), correct)


def image_judge(encoder, images: Sequence[Image.Image], true_concepts: Sequence[str],
                concept_names: Sequence[str], name_vectors: np.ndarray | None = None) -> JudgeResult:
    """Each image's nearest concept name under the encoder (argmax of image . name cosine) is its true concept.

    concept_names: the candidate set (for the knowledge benchmark: every concept of the data set, train and
    held-out). name_vectors: encoder.embed_text(concept_names), when the caller already has it.
    """
    if len(images) != len(true_concepts):
        raise ValueError(f"{len(images)} images but {len(true_concepts)} true concepts")
    names = list(concept_names)
    unknown = sorted(set(true_concepts) - set(names))
    if unknown:
        raise ValueError(f"true concepts missing from the candidate names, so never judged right: {unknown[:5]}")
    if not images:
        return JudgeResult(0.0, [], [])
    t = encoder.embed_text(names) if name_vectors is None else np.asarray(name_vectors)  # (C, D)
    if len(t) != len(names):
        raise ValueError(f"name_vectors has {len(t)} rows for {len(names)} names")
    im = encoder.embed_image(list(images))  # (N, D)
    best = np.argmax(im @ t.T, axis=1)  # (N,)
    predictions = [names[j] for j in best]
    correct = [p == c for p, c in zip(predictions, true_concepts)]
    return JudgeResult(float(np.mean(correct)), predictions, correct)


def drawing_judge(encoder, images: Sequence[Image.Image], true_concepts: Sequence[str],
                  reference_vectors: np.ndarray, reference_concepts: Sequence[str]) -> JudgeResult:
    """Each image's nearest real drawing (cosine of the encoder's image vectors) belongs to its true concept.

    image_judge needs an image tower that can *name* a drawing; the shipped one never saw held-out concepts
    and names real held-out drawings right 31% of the time (held-out flags: 0%; train drawings: 98%).
    Image-to-image neighbours generalise far better, so this judge reads a generated image's concept from
    the closest drawing among reference_vectors (every drawing of the data set, both styles and splits;
    reference_vectors = encoder.embed_image(those drawings), rows aligned with reference_concepts).
    """
    if len(images) != len(true_concepts):
        raise ValueError(f"{len(images)} images but {len(true_concepts)} true concepts")
    if len(reference_vectors) != len(reference_concepts):
        raise ValueError(f"{len(reference_vectors)} reference vectors for {len(reference_concepts)} concepts")
    if not images:
        return JudgeResult(0.0, [], [])
    im = encoder.embed_image(list(images))  # (N, D)
    best = np.argmax(im @ np.asarray(reference_vectors).T, axis=1)  # (N,)
    predictions = [reference_concepts[j] for j in best]
    correct = [p == c for p, c in zip(predictions, true_concepts)]
    return JudgeResult(float(np.mean(correct)), predictions, correct)
