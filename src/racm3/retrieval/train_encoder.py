"""Train the EmojiEncoder's image tower into the frozen MiniLM text space (LiT: locked text, contrastive image tower).

Two terms. LiT pulls each drawing towards its caption's frozen vector. Alone it leaves drawings whose captions
MiniLM embeds almost alike (skin-tone siblings: "medium-dark skin tone" vs "dark skin tone") nearly on top of
each other, so asking the memory with one drawing ties with its siblings. An instance-discrimination term
(Wu et al. 2018, a memory bank of every train drawing's last embedding; `instance_weight` > 0) pulls a drawing
towards its own bank row and away from every other drawing's, siblings included. Positives besides its own row:
drawings that are the same picture (PSNR above `same_image_psnr`), which no encoder should be asked to tell
apart, and the other style's drawing of the same caption, so that asking with one style still finds the other.
Off by default: on the emoji set it helps held-out drawings and captions but not image -> own document overall,
and costs some held-out cross-modal recall (README, Retrieval).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from racm3.documents import Document
from racm3.retrieval.encoder import (EmojiEncoder, ImageTowerConfig, MiniLMTextTower, build_image_tower,
                                     images_to_tensor)
from racm3.training import atomic_torch_save, warmup_cosine


@dataclass(frozen=True)
class TrainEncoderConfig:
    epochs: int = 24
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    init_temperature: float = 0.07  # CLIP / LiT initial softmax temperature; learnt from there
    max_shift: float = 0.08  # random translation, fraction of the side (about 5 px at 64)
    scale_range: tuple[float, float] = (0.9, 1.1)  # random zoom; no flips or colour jitter: both change meaning
    # instance discrimination against the memory bank (see the module docstring); 0 turns it off
    instance_weight: float = 0.0
    instance_temperature: float = 0.1
    bank_momentum: float = 0.5  # a bank row keeps this share of its old value at each visit
    same_image_psnr: float = 40.0  # two drawings this close are one picture (rasterisation noise only)
    # the other style's drawing of the same caption is a positive too: without this the term pushes the two
    # styles of one emoji apart, and asking with one style stops finding the other
    instance_same_caption: bool = True
    seed: int = 0
    threads: int = 1
    # "train" for the retriever. "all" (both splits) only for an evaluation judge: a tower that has seen every
    # concept can name a held-out drawing, as a large CLIP judges the paper's outputs; never retrieve with it.
    split: str = "train"
    tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(f"bad training config: epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}")
        if not 0 <= self.max_shift < 0.5 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"bad augmentation: max_shift={self.max_shift}, scale_range={self.scale_range}")
        if self.instance_weight < 0 or self.instance_temperature <= 0 or not 0 <= self.bank_momentum < 1:
            raise ValueError(f"bad instance term: weight={self.instance_weight}, "
                             f"temperature={self.instance_temperature}, momentum={self.bank_momentum}")
        if self.split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all', got {self.split!r}")


def read_dataset(path: str | os.PathLike, split: str | None = None) -> list[Document]:
    """Every document of a dataset folder (any format the readers take), optionally one split only."""
    from racm3.readers import read_documents

    docs = list(read_documents(path))
    if split is not None:
        docs = [d for d in docs if d.meta.get("split") == split]
    return docs


def cached_text_embeddings(tower: MiniLMTextTower, captions: Sequence[str], cache_dir: Path) -> np.ndarray:
    """The frozen tower's embeddings of captions, computed once and kept in cache_dir (keyed by the captions)."""
    key = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    path = cache_dir / f"text-embeddings-{key}.npy"
    if path.exists():
        return np.load(path)
    emb = tower(list(captions))  # (n, 384)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), emb)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return emb


def augment(x, cfg: TrainEncoderConfig, gen):
    """Random zoom and shift per image, filling with white: x (B, 3, S, S) in [-1, 1] -> same shape."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    lo, hi = cfg.scale_range
    scale = lo + (hi - lo) * torch.rand(b, generator=gen)  # (B,)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.max_shift * 2  # grid units span [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0, so shift white (1.0) to 0 first: the emoji background stays white.
    return F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1


def lit_loss(img, caption_idx, text_table, logit_scale):
    """Image -> all train captions (full softmax) + caption -> in-batch images (every image of that caption positive).

    img: (B, D) normalised; caption_idx: (B,) rows of text_table (C, D), normalised; returns (loss, parts).
    """
    import torch

    scale = logit_scale.exp().clamp(max=100)
    logits_i2t = scale * img @ text_table.T  # (B, C)
    loss_i2t = torch.nn.functional.cross_entropy(logits_i2t, caption_idx)
    # text -> image over the batch; two styles share one caption, so all same-caption images are positives
    logits_t2i = scale * text_table[caption_idx] @ img.T  # (B, B)
    positive = caption_idx[:, None] == caption_idx[None, :]  # (B, B)
    log_all = torch.logsumexp(logits_t2i, dim=1)
    log_pos = torch.logsumexp(logits_t2i.masked_fill(~positive, float("-inf")), dim=1)
    loss_t2i = (log_all - log_pos).mean()
    loss = (loss_i2t + loss_t2i) / 2
    return loss, {"i2t": loss_i2t.item(), "t2i": loss_t2i.item(), "scale": scale.item()}


def same_image_mask(images, psnr: float, chunk: int = 1024):
    """Which drawings are the same picture (PSNR >= psnr on [0, 1] pixels), as a sparse (N, N) scipy CSR matrix.

    images: (N, 3, S, S) in [-1, 1]. Squared distances by matmul, a chunk of rows at a time; float32 rounding
    (~1e-3) is far below the threshold (~1 for 64x64 RGB at 40 dB).
    """
    from scipy.sparse import csr_matrix

    x = images.flatten(1).float() / 2  # [0, 1] scale differences
    sq = (x * x).sum(1)
    max_sse = x.shape[1] * 10 ** (-psnr / 10)  # MSE <= 10^(-psnr/10) over every pixel value
    rows, cols = [], []
    for s in range(0, len(x), chunk):
        r, c = ((sq[s:s + chunk, None] + sq[None, :] - 2 * x[s:s + chunk] @ x.T) <= max_sse).nonzero(as_tuple=True)
        rows.append(r + s)
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    return csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(len(x), len(x)))


def same_caption_mask(caption_idx: np.ndarray):
    """Sparse (N, N) bool: drawings that share a caption (an emoji's two styles)."""
    from scipy.sparse import csr_matrix

    order = np.argsort(caption_idx, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(caption_idx[order]) != 0, True])
    rows, cols = [], []
    for a, b in zip(starts[:-1], starts[1:]):
        members = order[a:b]
        rows.append(np.repeat(members, len(members)))
        cols.append(np.tile(members, len(members)))
    r, c = np.concatenate(rows), np.concatenate(cols)
    n = len(caption_idx)
    return csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(n, n))


def instance_loss(img, idx, bank, same, temperature: float):
    """Each drawing against the whole bank: positives are the rows `same` marks (its own, and those counted as it).

    img: (B, D) normalised, rows idx of bank (N, D); same: a sparse (N, N) bool matrix (same_image_mask, maybe
    with same_caption_mask added); returns the mean -log p(positive).
    """
    import torch

    logits = img @ bank.T / temperature  # (B, N)
    positive = torch.from_numpy(same[idx.numpy()].toarray())  # (B, N) bool
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - log_pos).mean()


def train_encoder(dataset: str | os.PathLike | Sequence[Document], out_dir: str | os.PathLike,
                  config: TrainEncoderConfig | None = None, text_tower: MiniLMTextTower | None = None,
                  progress: bool = True, log=print) -> EmojiEncoder:
    """Train on the dataset's train split (split == "train"; all documents when none carries a split, or with
    config.split == "all").

    Checkpoints every epoch to out_dir/checkpoint.pt and resumes from it; writes the final tower with
    save_pretrained(out_dir). Returns the trained encoder.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = config or TrainEncoderConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    docs = read_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else list(dataset)
    if cfg.split == "train" and any(d.meta.get("split") is not None for d in docs):
        docs = [d for d in docs if d.meta.get("split") == "train"]
    docs = [d for d in docs if d.text is not None and d.image is not None]
    if len(docs) < 2:
        raise ValueError(f"{dataset}: needs at least 2 train documents holding both a caption and an image")

    text_tower = text_tower or MiniLMTextTower()
    captions = sorted({d.text for d in docs})
    caption_index = {c: i for i, c in enumerate(captions)}
    t0 = time.time()
    text_table = torch.from_numpy(cached_text_embeddings(text_tower, captions, out / "cache"))  # (C, 384)
    log(f"{len(docs)} train documents, {len(captions)} captions; text embeddings in {time.time() - t0:.1f}s")
    images = images_to_tensor([d.image for d in docs], cfg.tower.image_size)  # (N, 3, S, S) in [-1, 1]
    targets = torch.tensor([caption_index[d.text] for d in docs])

    torch.manual_seed(cfg.seed)
    tower = build_image_tower(cfg.tower)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
    decay = [p for n, p in tower.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in tower.named_parameters() if p.ndim <= 1] + [logit_scale]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(docs) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 0
        return warmup_cosine(step, total, cfg.lr, cfg.warmup_steps)

    use_bank = cfg.instance_weight > 0
    same = same_image_mask(images, cfg.same_image_psnr) if use_bank else None
    if use_bank:
        from scipy.sparse.csgraph import connected_components

        groups, _ = connected_components(same, directed=False)
        log(f"{groups} distinct pictures among {len(docs)} train drawings (PSNR >= {cfg.same_image_psnr} dB)")
        if cfg.instance_same_caption:
            same = (same + same_caption_mask(targets.numpy())).tocsr()
    # The bank fills during the first epoch (each row set at its first visit); the term starts from the second.
    bank = torch.zeros(len(docs), cfg.tower.dim) if use_bank else None

    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, step = 0, 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] == asdict(cfg):
            tower.load_state_dict(state["tower"])
            logit_scale.data.fill_(state["logit_scale"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            bank = state["bank"]
            start_epoch, step = state["epoch"], state["step"]
            log(f"resumed from {ckpt} at epoch {start_epoch}")
        else:
            log(f"{ckpt} was written with another config; starting over")

    for epoch in range(start_epoch, cfg.epochs):
        tower.train()
        order = torch.randperm(len(docs), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   mininterval=5)
        running, t_epoch = 0.0, time.time()
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = augment(images[idx], cfg, gen)
            img = F.normalize(tower(x), dim=-1)  # (B, 384)
            loss, parts = lit_loss(img, targets[idx], text_table, logit_scale)
            if use_bank and epoch > 0:
                loss = loss + cfg.instance_weight * instance_loss(img, idx, bank, same, cfg.instance_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_bank:  # after backward: the loss above read the bank
                keep = cfg.bank_momentum if epoch > 0 else 0.0
                bank[idx] = F.normalize(keep * bank[idx] + (1 - keep) * img.detach(), dim=-1)
            step += 1
            running += (value := loss.item())
            bar.set_postfix(loss=f"{value:.3f}", scale=f"{parts['scale']:.1f}", refresh=False)
        acc = _train_accuracy(tower, images, targets, text_table)
        log(f"epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}, temperature "
            f"{1 / parts['scale']:.4f}, train i->t top-1 {acc:.3f}, {time.time() - t_epoch:.0f}s")
        atomic_torch_save({"config": asdict(cfg), "tower": tower.state_dict(), "logit_scale": logit_scale.item(),
                           "opt": opt.state_dict(), "gen": gen.get_state(), "bank": bank, "epoch": epoch + 1, "step": step}, ckpt)

    tower.eval()
    encoder = EmojiEncoder(tower, cfg.tower, text_tower)
    encoder.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "documents": len(docs),
                                                   "captions": len(captions)}, indent=2, default=str) + "\n")
    # The saved weights are fp16; reload so the returned encoder (and its name) is exactly what was saved.
    return EmojiEncoder.from_pretrained(out, text_tower)


def _train_accuracy(tower, images, targets, text_table, batch: int = 512) -> float:
    """Share of (un-augmented) train images whose nearest caption is their own."""
    import torch
    import torch.nn.functional as F

    tower.eval()
    hits = 0
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            img = F.normalize(tower(images[s:s + batch]), dim=-1)
            hits += int(((img @ text_table.T).argmax(1) == targets[s:s + batch]).sum())
    return hits / len(images)
