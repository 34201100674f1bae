"""Retrieval-augmented training of the generator: precompute codes and retrievals once, then train with checkpoints.

Runs on any device the runtime gives (`device`, `precision`), in one process or under `torchrun --nproc-per-node N`
(DDP: NCCL on CUDA, gloo on CPU; each rank draws its own sequences, rank 0 builds the precompute cache once, evaluates,
logs and saves).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from racm3.documents import Document
from racm3.generator.data import DocTokens, ExampleBank, Recipe, TrainingBatches, batch, tokenize_documents
from racm3.generator.loss import ra_cm3_loss
from racm3.generator.model import build_model, get_preset, save_generator
from racm3.tokenizers.multimodal import MultimodalTokenizer
from racm3.runtime import check_resume, init_distributed, load_checkpoint, resolve_precision, save_checkpoint
from racm3.training import adamw, decay_groups, warmup_cosine


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
    device: str = "auto"  # auto = CUDA when present (runtime.resolve_device)
    precision: str = "auto"  # auto = bf16 autocast where supported (~1.7x faster on AVX512-BF16 CPUs); weights fp32
    threads: int | None = None
    loader_workers: int | None = None  # processes building batches; None: 2 on CUDA, 0 (inline) on a CPU
    resume: bool = False
    save_dtype: str = "bfloat16"
    progress: bool = True
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"steps, batch_size and lr must be positive and warmup >= 0: {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.warmup}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
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
# The context benefit: does the model read its context? (docs/design.md)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def main_nll(model, seqs, vocab, image_base: int, tokens_per_image: int, modality: str = "image") -> float:
    """Mean NLL per token of the main document's image codes or caption tokens (unmasked sequences)."""
    device = next(model.parameters()).device
    b = {k: t.to(device) for k, t in batch(seqs, vocab, image_base, tokens_per_image).items()}
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=b["position_ids"]).logits.float()
    targets = b["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    kind = vocab.is_image(targets) if modality == "image" else vocab.is_text(targets)
    keep = kind & b["main_mask"][:, 1:]
    return float((ce * keep).sum() / keep.sum())


def context_benefit(model, bank: ExampleBank, eval_ids: list[str], vocab, recipe: Recipe, image_base: int,
                    tokens_per_image: int) -> dict[str, float]:
    """Held-out per-code NLL (caption first) with no context, with the document's own drawing, with the other
    style's; and per caption token (image first) with no context and with the document itself."""
    was_training = model.training
    model.eval()
    out = {}
    for name, ctx in (("none", lambda i: []), ("self", lambda i: [i]),
                      ("cross_style", lambda i: bank.other_styles(i)[:1])):
        seqs = [bank.sequence(i, ctx(i), vocab, recipe, text_first=True) for i in eval_ids]
        out[f"nll_{name}"] = main_nll(model, seqs, vocab, image_base, tokens_per_image)
    for name, ctx in (("none", lambda i: []), ("self", lambda i: [i])):
        seqs = [bank.sequence(i, ctx(i), vocab, recipe, text_first=False) for i in eval_ids]
        out[f"caption_nll_{name}"] = main_nll(model, seqs, vocab, image_base, tokens_per_image, "text")
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
    """(train, held-out) documents holding both a caption and an image, by the one split rule (racm3.splits)."""
    from racm3.readers import read_documents
    from racm3.splits import HELDOUT, is_train

    docs = [d for d in read_documents(dataset) if d.image is not None and d.text is not None]
    return [d for d in docs if is_train(d)], [d for d in docs if d.meta.get("split") == HELDOUT]


def _write_cache(cache: dict, path: Path) -> None:
    """The precompute cache as JSON (ids, concepts, candidates): no pickle, so a planted file cannot run code."""
    docs = {split: {i: asdict(t) for i, t in cache[split].items()} for split in ("train", "heldout")}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": cache["key"], **docs, "candidates": cache["candidates"]}))
    os.replace(tmp, path)


def _read_cache(path: Path, key: dict) -> dict | None:
    """The cache if it exists and was computed from the same inputs (key); None otherwise (recompute)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a truncated or foreign file: recompute and overwrite it
    if not isinstance(raw, dict) or raw.get("key") != json.loads(json.dumps(key)):
        return None
    tokens = {split: {i: DocTokens(tuple(t["text"]), tuple(t["image"]), t["concept"], t["style"])
                      for i, t in raw[split].items()} for split in ("train", "heldout")}
    return {**tokens, "candidates": raw["candidates"], "key": key}


def precompute(cfg: TrainConfig, mt: MultimodalTokenizer, train_docs: list[Document], heldout_docs: list[Document],
               dist) -> dict:
    """Image codes and retrieval candidates, cached in OUT/cache.json: computed by rank 0 alone, read by all."""
    cache = Path(cfg.out) / "cache.json"
    vocab = mt.vocab
    # The cache is only valid for the inputs it was computed from: anything else recomputes it.
    key = {"dataset": str(Path(cfg.dataset).resolve()), "memory": str(cfg.memory) if cfg.recipe.k else None,
           "tokenizers": str(cfg.tokenizers), "encoder": str(cfg.encoder), "documents": len(train_docs),
           "vocab": [vocab.text_size, vocab.image_size, mt.tokens_per_image], "image_codes": mt.image_code_fingerprint()}
    cached = _read_cache(cache, key) if dist.is_main else None
    if dist.is_main and cached is None:
        cached = {"train": tokenize_documents(train_docs, mt), "heldout": tokenize_documents(heldout_docs, mt),
                  "candidates": (retrieval_candidates(train_docs, cfg.memory, cfg.encoder, seed=cfg.seed)
                                 if cfg.memory is not None and cfg.recipe.k > 0 else {}), "key": key}
        _write_cache(cached, cache)
    dist.barrier()  # the other ranks read what rank 0 wrote
    return cached if dist.is_main else _read_cache(cache, key)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a generator in cfg.out; returns the final metrics."""
    dist = init_distributed(cfg.device)
    device, rank, world = dist.device, dist.rank, dist.world
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.safetensors"
    resuming = check_resume(ckpt_path, cfg.resume)
    torch.manual_seed(cfg.seed)

    mt = load_tokenizers(cfg.tokenizers)
    vocab, n_img = mt.vocab, mt.tokens_per_image
    gen_cfg = get_preset(cfg.preset)
    recipe = cfg.recipe

    train_docs, heldout_docs = _load_split_documents(cfg.dataset)
    if not train_docs:
        raise ValueError(f"{cfg.dataset} holds no training documents with both an image and a caption")
    cached = precompute(cfg, mt, train_docs, heldout_docs, dist)
    bank = ExampleBank(cached["train"], cached["candidates"], max_len=gen_cfg.max_len)
    eval_bank = ExampleBank({**cached["heldout"]}, max_len=gen_cfg.max_len) if cached["heldout"] else None
    eval_ids = []
    if eval_bank is not None:
        # held-out documents whose concept is drawn in the other style too, a fixed sample
        eligible = [i for i in eval_bank.ids if eval_bank.other_styles(i)]
        eval_ids = sorted(random.Random(cfg.seed).sample(eligible, min(cfg.eval_docs, len(eligible))))

    model = build_model(gen_cfg, vocab, n_img).to(device)
    model.racm3["image_codes"] = cached["key"]["image_codes"]  # checked at load (check_vocab)
    opt = adamw(decay_groups(model, cfg.weight_decay), cfg.lr, (0.9, 0.95), device)
    scaler = precision.grad_scaler()
    step = 0
    if resuming:
        ckpt = load_checkpoint(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    ddp = dist.wrap(model)
    # each rank its own stream of sequences; a resumed run draws a new stream from where it stopped
    stream = TrainingBatches(bank, vocab, recipe, cfg.batch_size, gen_cfg.image_base, n_img,
                             seed=[cfg.seed, rank, step] if step else cfg.seed + 1000 * rank)
    workers = cfg.loader_workers if cfg.loader_workers is not None else (2 if device.type == "cuda" else 0)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                               pin_memory=device.type == "cuda",
                                               prefetch_factor=4 if workers else None))
    model.train()

    log_path = out / "train_log.jsonl"
    if step == 0 and rank == 0 and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
    meta = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "parameters": sum(p.numel() for p in model.parameters()), "world_size": world,
            "device": str(device), "precision": precision.name}
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(meta, indent=2, default=str))
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    tokens_seen, t0, last = 0, time.perf_counter(), {}
    while step < cfg.steps:
        b = next(batches)
        tokens = int(b.pop("tokens"))  # counted by the loader on the host: no device sync
        b = {name: t.to(device, non_blocking=True) for name, t in b.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with precision.autocast():
            logits = ddp(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         position_ids=b["position_ids"]).logits
        parts = ra_cm3_loss(logits, b["input_ids"], b["loss_weights"], b["main_mask"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        tokens_seen += tokens * world
        if rank != 0:
            continue
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            tps = tokens_seen / (time.perf_counter() - t0)
            last = {"step": step, "loss": float(parts["loss"].detach()), "main": float(parts["main"]),
                    "retrieved": float(parts["retrieved"]), "lr": lr_at(step - 1, cfg), "tokens_per_s": tps}
            if eval_ids and (step % cfg.eval_every == 0 or step == cfg.steps):
                last.update(context_benefit(model, eval_bank, eval_ids, vocab, recipe, gen_cfg.image_base, n_img))
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:.0f}",
                            **({"ctx_benefit": f"{last['context_benefit']:.2f}",
                                "caption_benefit": f"{last['caption_benefit']:.2f}"} if "context_benefit" in last else {}))
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, ckpt_path)
            save_generator(model, out, dtype=getattr(torch, cfg.save_dtype))
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_generator(model, out / f"step-{step}", dtype=getattr(torch, cfg.save_dtype))
    bar.close()
    dist.close()
    return last
