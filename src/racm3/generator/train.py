"""Retrieval-augmented training of the generator: precompute codes and retrievals once, then train with checkpoints.

Runs in one process or under `torchrun --nproc-per-node N` (DDP on gloo: each rank draws its own sequences,
rank 0 evaluates, logs and saves).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from racm3.documents import Document
from racm3.generator.data import DocTokens, ExampleBank, Recipe, batch
from racm3.generator.loss import ra_cm3_loss
from racm3.generator.model import build_model, get_preset, save_generator
from racm3.tokenizers.multimodal import MultimodalTokenizer
from racm3.training import atomic_torch_save, warmup_cosine


@dataclass
class TrainConfig:
    dataset: Path
    out: Path
    memory: Path | None = None  # None: contexts hold only lessons and distractors (no retrieved candidates)
    tokenizers: Path | None = None  # a model folder with text_tokenizer/ and image_tokenizer/; None = shipped
    encoder: Path | None = None  # the encoder that filled the memory; None = shipped
    preset: str = "emoji-small"
    steps: int = 1500
    batch_size: int = 24
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    snapshot_every: int = 0  # > 0: also keep a generator folder OUT/step-N every N steps (training curves)
    eval_docs: int = 48
    bf16: bool = True  # autocast: ~1.7x faster on this CPU (AVX512-BF16); weights and optimizer stay float32
    threads: int | None = None
    resume: bool = False
    save_dtype: str = "bfloat16"
    progress: bool = True
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"steps, batch_size and lr must be positive and warmup >= 0: {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.warmup}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        get_preset(self.preset)  # an unknown preset fails here, not after the precomputation


# ---------------------------------------------------------------------------------------------
# Precomputation: image codes and retrieval candidates, cached next to the run
# ---------------------------------------------------------------------------------------------


def load_tokenizers(path: Path | None) -> MultimodalTokenizer:
    from racm3.pretrained import shipped_model_dir
    from racm3.tokenizers.image import ImageTokenizer
    from racm3.tokenizers.text import TextTokenizer

    root = Path(path) if path is not None else shipped_model_dir()
    return MultimodalTokenizer(TextTokenizer.from_pretrained(root / "text_tokenizer"),
                               ImageTokenizer.from_pretrained(root / "image_tokenizer"))


def tokenize_documents(docs: list[Document], mt: MultimodalTokenizer, batch_size: int = 256) -> dict[str, DocTokens]:
    """Every document's caption ids and <img> codes </img> ids, the VQ encoder run once per image."""
    vocab = mt.vocab
    out = {}
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        codes = mt.encode_images([d.image for d in chunk])  # [b, N]
        for d, c in zip(chunk, codes):
            text = tuple(vocab.text_to_vocab(mt.text.encode(d.text)))
            image = (vocab.img_id, *vocab.image_to_vocab(c.tolist()), vocab.img_end_id)
            out[d.id] = DocTokens(text, image, d.concept or d.id, d.style or "")
    return out


def retrieval_candidates(train_docs: list[Document], memory_dir: Path, encoder_path: Path | None,
                         k: int = 8, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """The paper's training retrieval: query with the caption and with the image, 20% query dropout,
    near-duplicates (> 0.9) skipped, from the *train split only* (a temporary memory of the train documents,
    their vectors copied from the given memory), so no held-out document ever enters a training sequence."""
    from racm3.retrieval.encoder import load_encoder
    from racm3.retrieval.memory import Memory
    from racm3.retrieval.retriever import Retriever, RetrieverConfig

    encoder = load_encoder(encoder_path)
    with Memory.open(memory_dir) as full, tempfile.TemporaryDirectory() as tmp:
        full.require_encoder(encoder.name)
        ids = [d.id for d in train_docs if d.id in full]
        by_id = {d.id: d for d in train_docs}
        train_mem = Memory.create(Path(tmp) / "train", encoder.name, full.dim)
        train_mem.add([by_id[i] for i in ids], full.vectors(ids))
        retriever = Retriever(train_mem, encoder, RetrieverConfig(k=k, max_similarity=0.9, query_dropout=0.2))
        rng = random.Random(seed)
        docs = [by_id[i] for i in ids]
        text_hits = retriever.retrieve_batch([d.text for d in docs], exclude_ids=[[d.id] for d in docs], rng=rng)
        image_hits = retriever.retrieve_batch([d.image for d in docs], exclude_ids=[[d.id] for d in docs], rng=rng)
        train_mem.close()
    return {d.id: {"text": [h.id for h in th], "image": [h.id for h in ih]}
            for d, th, ih in zip(docs, text_hits, image_hits)}


# ---------------------------------------------------------------------------------------------
# The context benefit: does the model read its context? (DESIGN.md)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def main_nll(model, seqs, vocab, image_base: int, tokens_per_image: int, text_base: int | None = None,
             modality: str = "image") -> float:
    """Mean NLL per token of the main document's image codes or caption tokens (unmasked sequences)."""
    b = batch(seqs, vocab, image_base, tokens_per_image, text_base)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=b["position_ids"]).logits.float()
    targets = b["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    kind = vocab.is_image(targets) if modality == "image" else vocab.is_text(targets)
    keep = kind & b["main_mask"][:, 1:]
    return float((ce * keep).sum() / keep.sum())


def context_benefit(model, bank: ExampleBank, eval_ids: list[str], vocab, recipe: Recipe, image_base: int,
                    tokens_per_image: int, text_base: int | None = None) -> dict[str, float]:
    """Held-out per-code NLL (caption first) with no context, with the document's own drawing, with the other
    style's; and per caption token (image first) with no context and with the document itself."""
    was_training = model.training
    model.eval()
    out = {}
    for name, ctx in (("none", lambda i: []), ("self", lambda i: [i]),
                      ("cross_style", lambda i: bank.other_styles(i)[:1])):
        seqs = [bank.sequence(i, ctx(i), vocab, recipe, text_first=True) for i in eval_ids]
        out[f"nll_{name}"] = main_nll(model, seqs, vocab, image_base, tokens_per_image, text_base)
    for name, ctx in (("none", lambda i: []), ("self", lambda i: [i])):
        seqs = [bank.sequence(i, ctx(i), vocab, recipe, text_first=False) for i in eval_ids]
        out[f"caption_nll_{name}"] = main_nll(model, seqs, vocab, image_base, tokens_per_image, text_base, "text")
    out["context_benefit"] = out["nll_none"] - out["nll_self"]
    out["cross_style_benefit"] = out["nll_none"] - out["nll_cross_style"]
    out["caption_benefit"] = out["caption_nll_none"] - out["caption_nll_self"]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)


def _load_split_documents(dataset: Path) -> tuple[list[Document], list[Document]]:
    from racm3.readers import read_documents

    train, heldout = [], []
    for d in read_documents(dataset):
        if d.image is None or d.text is None:
            continue
        if d.split in (None, "train"):  # documents without a split train; any other split is held out
            train.append(d)
        elif d.split == "heldout":
            heldout.append(d)
    return train, heldout


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a generator in cfg.out; returns the final metrics."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1000 * rank)

    mt = load_tokenizers(cfg.tokenizers)
    vocab, n_img = mt.vocab, mt.tokens_per_image
    gen_cfg = get_preset(cfg.preset)
    recipe = cfg.recipe
    if recipe.max_len > gen_cfg.max_len:
        raise ValueError(f"recipe max_len {recipe.max_len} exceeds the preset's {gen_cfg.max_len}")

    train_docs, heldout_docs = _load_split_documents(cfg.dataset)
    if not train_docs:
        raise ValueError(f"{cfg.dataset} holds no training documents with both an image and a caption")
    cache = out / "cache.pt"
    # The cache is only valid for the inputs it was computed from: anything else recomputes it.
    image_codes = mt.image_code_fingerprint()  # what the image ids mean: keys the cache, recorded in the model
    key = {"dataset": str(Path(cfg.dataset).resolve()), "memory": str(cfg.memory) if recipe.k else None,
           "tokenizers": str(cfg.tokenizers), "encoder": str(cfg.encoder), "documents": len(train_docs),
           "vocab": (vocab.text_size, vocab.image_size, n_img), "image_codes": image_codes}
    cached = torch.load(cache, weights_only=False) if cache.exists() else None
    if cached is None or cached.get("key") != key:
        cached = {"train": tokenize_documents(train_docs, mt), "heldout": tokenize_documents(heldout_docs, mt),
                  "candidates": (retrieval_candidates(train_docs, cfg.memory, cfg.encoder, seed=cfg.seed)
                                 if cfg.memory is not None and recipe.k > 0 else {}), "key": key}
        if rank == 0:
            atomic_torch_save(cached, cache)
    bank = ExampleBank(cached["train"], cached["candidates"])
    eval_bank = ExampleBank({**cached["heldout"]}) if cached["heldout"] else None
    eval_ids = []
    if eval_bank is not None:
        # held-out documents whose concept is drawn in the other style too, a fixed sample
        eligible = [i for i in eval_bank.ids if eval_bank.other_styles(i)]
        eval_ids = sorted(random.Random(cfg.seed).sample(eligible, min(cfg.eval_docs, len(eligible))))

    model = build_model(gen_cfg, vocab, n_img)
    model.racm3["image_codes"] = image_codes  # checked at load (check_vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        rng = np.random.default_rng([cfg.seed, rank, step])
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another OUT_DIR")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    model.train()

    log_path = out / "train_log.jsonl"
    if step == 0 and rank == 0 and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
    meta = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "parameters": sum(p.numel() for p in model.parameters()), "world_size": world}
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(meta, indent=2, default=str))
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    tokens_seen, t0, last = 0, time.perf_counter(), {}
    order: list[int] = []
    while step < cfg.steps:
        if len(order) < cfg.batch_size:
            order += rng.permutation(len(bank)).tolist()
        picks, order = order[:cfg.batch_size], order[cfg.batch_size:]
        seqs = [bank.sample(bank.ids[i], vocab, recipe, rng) for i in picks]
        b = batch(seqs, vocab, gen_cfg.image_base, n_img, gen_cfg.text_base)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = ddp(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         position_ids=b["position_ids"]).logits
        parts = ra_cm3_loss(logits, b["input_ids"], b["loss_weights"], b["main_mask"])
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += int(b["attention_mask"].sum()) * world
        if rank != 0:
            continue
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            tps = tokens_seen / (time.perf_counter() - t0)
            last = {"step": step, "loss": float(parts["loss"].detach()), "main": float(parts["main"]),
                    "retrieved": float(parts["retrieved"]), "lr": lr_at(step - 1, cfg), "tokens_per_s": tps}
            if eval_ids and (step % cfg.eval_every == 0 or step == cfg.steps):
                last.update(context_benefit(model, eval_bank, eval_ids, vocab, recipe, gen_cfg.image_base, n_img,
                                            gen_cfg.text_base))
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:.0f}",
                            **({"ctx_benefit": f"{last['context_benefit']:.2f}",
                                "caption_benefit": f"{last['caption_benefit']:.2f}"} if "context_benefit" in last else {}))
        if step % cfg.save_every == 0 or step == cfg.steps:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, ckpt_path)
            save_generator(model, out, dtype=getattr(torch, cfg.save_dtype))
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_generator(model, out / f"step-{step}", dtype=getattr(torch, cfg.save_dtype))
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last
