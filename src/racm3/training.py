"""Pieces every trainer here shares: the learning-rate schedule and crash-safe checkpoint writes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch


def warmup_cosine(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to peak over `warmup` steps, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
