"""What every trainer here shares besides the runtime: the learning-rate schedule and the optimizer policy."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to peak over `warmup` steps, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices and convolution kernels decay; norms, biases and embeddings do not.

    nanoGPT's rule (decay only >= 2-D weights), with embeddings moved to no-decay as in GPT-2/LLaMA practice:
    a row of an embedding table is only updated when its token occurs, so decay would shrink rare tokens.
    With tied input/output embeddings the shared matrix counts as an embedding.
    """
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in module.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW for every trainer, with the fused kernel: one pass over all parameters, on CUDA and on CPUs alike
    (the generator's training step was 5-13% faster with it on this CPU: benchmarks/training_speed.py)."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
