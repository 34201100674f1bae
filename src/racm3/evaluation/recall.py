"""Retrieval recall@k from a search result's id matrix I (n, k) against ground-truth ids, as faiss contrib/evaluation does."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def recall_at_k(I: np.ndarray, ground_truth: np.ndarray | Sequence, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Share of queries with a correct id among their first k results, for each k.

    I: (n, K) result ids, best first, -1 for padding (FAISS's "no result"); D is not needed.
    ground_truth: (n,) one correct id per query, or (n, g) several (any of them counts; -1 pads rows).
    """
    I = np.asarray(I)
    gt = np.asarray(ground_truth)
    if gt.ndim == 1:
        gt = gt[:, None]  # (n, 1)
    if I.ndim != 2 or gt.ndim != 2 or len(I) != len(gt):
        raise ValueError(f"I must be (n, K) and ground truth (n,) or (n, g); got {I.shape} and {np.shape(ground_truth)}")
    if len(I) == 0:
        raise ValueError("recall needs at least one query")
    # hit[q, j]: result j of query q is one of q's correct ids (padding never counts).
    hit = (I[:, :, None] == gt[:, None, :]).any(axis=2) & (I >= 0)  # (n, K)
    out = {}
    for k in ks:
        if k > I.shape[1]:
            raise ValueError(f"recall@{k} asked of results holding only {I.shape[1]} ids per query")
        out[f"recall@{k}"] = float(hit[:, :k].any(axis=1).mean())
    return out
