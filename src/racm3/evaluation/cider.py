"""CIDEr-D (Vedantam et al. 2015) with pycocoevalcap's pure-Python scorer on captions tokenised here (no Java)."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np

from racm3.evaluation.text import normalize


def cider_scores(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """Per-item CIDEr-D scores {id: float} of each candidate against its references.

    The idf weights come from the references of all items given together, as in the COCO evaluation, so a score
    depends on the whole set: score captions in one call. Values are on pycocoevalcap's scale (papers print x100).
    """
    from pycocoevalcap.cider.cider import Cider

    if set(candidates) != set(references):
        missing = set(candidates) ^ set(references)
        raise ValueError(f"candidates and references must have the same ids; differing: {sorted(map(str, missing))[:5]}")
    if not candidates:
        raise ValueError("CIDEr needs at least one caption")
    ids = list(candidates)
    res, gts = {}, {}
    for i in ids:
        refs = [normalize(r) for r in references[i]]
        if not refs:
            raise ValueError(f"item {i!r} has no reference captions")
        res[i] = [normalize(candidates[i])]
        gts[i] = refs
    _, per_item = Cider().compute_score(gts, res)
    return {i: float(s) for i, s in zip(ids, np.atleast_1d(per_item))}


def cider(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of the per-item scores (pycocoevalcap's scale; the paper's 89.1 is 0.891 here)."""
    scores = cider_scores(candidates, references)
    return float(np.mean(list(scores.values())))
