"""Train the EmojiEncoder's image tower into the frozen MiniLM text space (LiT: locked text, contrastive image tower).

LiT (Zhai et al. 2022) pulls each drawing towards its caption's frozen vector: image -> every train caption (full
softmax), and caption -> the batch's images, every image of that caption a positive (an emoji's two styles share
one). Runs on the runtime's device and precision, and under torchrun (DDP: each process takes its share of every
batch, rank 0 evaluates and saves). Objective variants measured and not shipped (an instance-discrimination term
with a memory bank, a document term, a full-resolution stem) are in the README's Retrieval section; their code is
in git history.
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
from racm3.runtime import (CHECKPOINT_FILE, check_resume, init_distributed, load_checkpoint, resolve_precision,
                           save_checkpoint)
from racm3.training import adamw, decay_groups, warmup_cosine


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
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: torch's choice (all cores)
    device: str = "auto"
    precision: str = "auto"  # the shipped tower was trained in fp32 (scripts/train_emoji_small.sh says so)
    # "train" for the retriever. "all" (both splits) only for an evaluation judge: a tower that has seen every
    # concept can name a held-out drawing, as a large CLIP judges the paper's outputs; never retrieve with it.
    split: str = "train"
    tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(f"bad training config: epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}")
        if not 0 <= self.max_shift < 0.5 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"bad augmentation: max_shift={self.max_shift}, scale_range={self.scale_range}")
        if self.split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all', got {self.split!r}")


def read_dataset(path: str | os.PathLike, split: str | None = None) -> list[Document]:
    """Every document of a dataset (any format the readers take), optionally one split only (racm3.splits)."""
    from racm3.readers import read_documents
    from racm3.splits import in_split

    return list(in_split(read_documents(path), split))


def cached_text_embeddings(tower: MiniLMTextTower, captions: Sequence[str], cache_dir: Path) -> np.ndarray:
    """The frozen tower's embeddings of captions, computed once and kept in cache_dir (keyed by the captions)."""
    key = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    path = cache_dir / f"text-embeddings-{key}.npy"
    if path.exists():
        return np.load(path)
    emb = tower(list(captions))  # (n, 384)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")  # each process its own: ranks may race here
    np.save(tmp, emb)
    os.replace(tmp, path)
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
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)  # drawn on the host: reproducible
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


def train_encoder(dataset: str | os.PathLike | Sequence[Document], out_dir: str | os.PathLike,
                  config: TrainEncoderConfig | None = None, text_tower: MiniLMTextTower | None = None,
                  progress: bool = True, log=print, resume: bool = False) -> EmojiEncoder:
    """Train on the dataset's train split (split == "train"; all documents when none carries a split, or with
    config.split == "all").

    Checkpoints every epoch to out_dir/checkpoint.safetensors; resume=True continues from it, up to config.epochs
    (a checkpoint of another recipe is refused); writes the final tower with save_pretrained(out_dir). Returns the
    trained encoder.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = config or TrainEncoderConfig()
    dist = init_distributed(cfg.device)
    device, precision = dist.device, resolve_precision(cfg.precision, dist.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_FILE
    state = load_checkpoint(ckpt) if check_resume(ckpt, resume) else None
    # A resumed run may train longer or elsewhere (as the other trainers may), not on other data or another recipe.
    free = ("epochs", "threads", "device")
    if state is not None and {k: v for k, v in state["config"].items() if k not in free} != \
            {k: v for k, v in asdict(cfg).items() if k not in free}:
        raise ValueError(f"{ckpt} was written with another training config; resume with the same options "
                         f"(only {', '.join(free)} may change), or choose another OUT_DIR")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from racm3.splits import in_split

    docs = read_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else list(dataset)
    docs = [d for d in in_split(docs, cfg.split) if d.text is not None and d.image is not None]
    if len(docs) < 2:
        raise ValueError(f"{dataset}: needs at least 2 train documents holding both a caption and an image")

    text_tower = text_tower or MiniLMTextTower()
    captions = sorted({d.text for d in docs})
    caption_index = {c: i for i, c in enumerate(captions)}
    t0 = time.time()
    text_table = torch.from_numpy(cached_text_embeddings(text_tower, captions, out / "cache")).to(device)  # (C, 384)
    if dist.is_main:
        log(f"{len(docs)} train documents, {len(captions)} captions; text embeddings in {time.time() - t0:.1f}s")
    images = images_to_tensor([d.image for d in docs], cfg.tower.image_size)  # (N, 3, S, S) in [-1, 1], on the host
    targets = torch.tensor([caption_index[d.text] for d in docs])

    class LiT(torch.nn.Module):
        """What trains, and what DDP wraps: the tower and the learnt temperature, so both are averaged."""

        def __init__(self, tower: torch.nn.Module):
            super().__init__()
            self.tower = tower
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

        def forward(self, x):  # (B, 3, S, S) -> normalised (B, D) and the logit scale
            return F.normalize(self.tower(x).float(), dim=-1), self.logit_scale

    torch.manual_seed(cfg.seed)
    tower = build_image_tower(cfg.tower)
    lit = LiT(tower).to(device)
    opt = adamw(decay_groups(lit, cfg.weight_decay), cfg.lr, (0.9, 0.999), device)  # the scale is 0-D: no decay
    scaler = precision.grad_scaler()
    steps_per_epoch = math.ceil(len(docs) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 0
        return warmup_cosine(step, total, cfg.lr, cfg.warmup_steps)

    # One order for every rank (the same seed), its own augmentation per rank.
    gen = torch.Generator().manual_seed(cfg.seed)
    aug = torch.Generator().manual_seed(cfg.seed + 1 + dist.rank)
    start_epoch, step = 0, 0
    if state is not None:
        tower.load_state_dict(state["tower"])
        lit.logit_scale.data.fill_(state["logit_scale"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        aug.set_state(state["aug"])
        start_epoch, step = state["epoch"], state["step"]
        log(f"resumed from {ckpt} at epoch {start_epoch}")
    ddp = dist.wrap(lit)

    for epoch in range(start_epoch, cfg.epochs):
        tower.train()
        order = torch.randperm(len(docs), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress or not dist.is_main, mininterval=5)
        running, t_epoch = 0.0, time.time()
        for i in bar:
            batch = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if len(batch) // dist.world < 2:  # every rank decides alike: a rank skipping alone would hang DDP
                continue
            idx = batch[dist.rank::dist.world]  # this rank's share
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = augment(images[idx].to(device, non_blocking=True), cfg, aug)
            with precision.autocast():
                img, logit_scale = ddp(x)  # (B, 384) normalised
            loss, parts = lit_loss(img, targets[idx].to(device), text_table, logit_scale)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            running += (value := loss.item())
            bar.set_postfix(loss=f"{value:.3f}", scale=f"{parts['scale']:.1f}", refresh=False)
        if dist.is_main:
            acc = _train_accuracy(tower, images, targets, text_table)
            log(f"epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}, temperature "
                f"{1 / parts['scale']:.4f}, train i->t top-1 {acc:.3f}, {time.time() - t_epoch:.0f}s")
            save_checkpoint({"config": asdict(cfg), "tower": tower.state_dict(), "logit_scale": lit.logit_scale.item(),
                             "opt": opt.state_dict(), "gen": gen.get_state(), "aug": aug.get_state(),
                             "epoch": epoch + 1, "step": step}, ckpt)

    dist.close()
    tower.eval().cpu()
    encoder = EmojiEncoder(tower, cfg.tower, text_tower)
    if not dist.is_main:
        return encoder
    encoder.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "documents": len(docs),
                                                   "captions": len(captions), "device": str(device),
                                                   "precision": precision.name, "world_size": dist.world},
                                                  indent=2, default=str) + "\n")
    # The saved weights are fp16; reload so the returned encoder (and its name) is exactly what was saved.
    return EmojiEncoder.from_pretrained(out, text_tower)


def _train_accuracy(tower, images, targets, text_table, batch: int = 512) -> float:
    """Share of (un-augmented) train images whose nearest caption is their own."""
    import torch
    import torch.nn.functional as F

    tower.eval()
    device = text_table.device
    hits = 0
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            img = F.normalize(tower(images[s:s + batch].to(device)).float(), dim=-1)
            hits += int(((img @ text_table.T).argmax(1).cpu() == targets[s:s + batch]).sum())
    return hits / len(images)
