"""Retrieval recall, in one place: recall@k of a right answer (from an id matrix I, or from the rank of each query's
first right answer), and the neighbour recall of an approximate index against exact search (faiss's intersection
measure, contrib/evaluation)."""

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
    for k in ks:
        if k > I.shape[1]:
            raise ValueError(f"recall@{k} asked of results holding only {I.shape[1]} ids per query")
    # hit[q, j]: result j of query q is one of q's correct ids (padding never counts).
    hit = (I[:, :, None] == gt[:, None, :]).any(axis=2) & (I >= 0)  # (n, K)
    first = [int(np.argmax(row)) if row.any() else None for row in hit]
    return recall_from_ranks(first, ks)


def recall_from_ranks(hit_ranks: Sequence[int | None], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k from each query's rank (0-based) of its first correct result, None when none was found."""
    n = max(len(hit_ranks), 1)
    return {f"recall@{k}": sum(r is not None and r < k for r in hit_ranks) / n for k in ks}


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k neighbours that the approximate top-k holds: found, truth (Q, k) ids."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))
