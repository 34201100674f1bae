"""Retrieval-augmented training of the generator: precompute codes and retrievals once, then train with checkpoints.

Runs on any device the runtime gives (`device`, `precision`), in one process or under `torchrun --nproc-per-node N`
(DDP: NCCL on CUDA, gloo on CPU; each rank draws its own sequences, rank 0 builds the precompute cache once, evaluates,
logs and saves).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from racm3.documents import Document
from racm3.generator.data import RECIPES, DocTokens, ExampleBank, Recipe, TrainingBatches, batch, tokenize_documents
from racm3.generator.loss import ra_cm3_loss, token_nll
from racm3.generator.model import build_model, get_preset, save_generator, text_after_image
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
    eval_every: int = 10  # the context benefits (BENEFITS) on each log line of a step divisible by this
    save_every: int = 100
    snapshot_every: int = 0  # > 0: also keep a generator folder OUT/step-N every N steps (training curves)
    eval_docs: int = 6  # held-out lesson sequences per NLL of BENEFITS (9 NLLs: about 54 sequences)
    device: str = "auto"  # auto = CUDA when present (runtime.resolve_device)
    precision: str = "auto"  # auto = bf16 autocast where supported (~1.7x faster on AVX512-BF16 CPUs); weights fp32
    threads: int | None = None
    loader_workers: int | None = None  # processes building batches; None: 2 on CUDA, 0 (inline) on a CPU
    resume: bool = False
    init_from: Path | None = None  # a generator folder of this preset whose weights start a fresh run (fine-tuning)
    save_dtype: str = "bfloat16"
    progress: bool = True
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"steps, batch_size and lr must be positive and warmup >= 0: {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.warmup}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.eval_every < 1 or self.eval_every % self.log_every:
            raise ValueError(f"eval_every must be a positive multiple of log_every {self.log_every} (the benefits "
                             f"are measured on log lines), got {self.eval_every}")
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
    their vectors copied from the given memory), so no held-out document ever enters a training sequence.

    A document without a concept also gets its k nearest neighbours by caption and by image ("text_neighbours",
    "image_neighbours"): the same queries without dropout and with near-duplicates kept (a sibling is one), from
    which the recipe's lessons take its siblings and cross-style partners (generator.data)."""
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
        out = {d.id: {"text": [h.id for h in th], "image": [h.id for h in ih]}
               for d, th, ih in zip(docs, text_hits, image_hits)}
        bare = [d for d in docs if not d.concept]
        if bare:
            nearest = Retriever(train_mem, encoder, RetrieverConfig(k=k, diversity=None))
            for by, queries in (("text", [d.text for d in bare]), ("image", [d.image for d in bare])):
                for d, hits in zip(bare, nearest.retrieve_batch(queries, exclude_ids=[[d.id] for d in bare])):
                    out[d.id][f"{by}_neighbours"] = [h.id for h in hits]
        train_mem.close()
    return out


# ---------------------------------------------------------------------------------------------
# The context benefit: does the model read its context? (docs/design.md)
# ---------------------------------------------------------------------------------------------


# Each context benefit is a held-out NLL of the main document's answer (the image codes after a caption, the
# caption after an image) with an empty or wrong context minus the same with the right one: near 0, the model
# does not use that context; large, it reads it.
BENEFITS = {  # logged name: (NLL with the right context, NLL with an empty or wrong one)
    "context_benefit": ("nll_self", "nll_none"),  # image copy: the document itself in context, caption -> image
    "cross_style_benefit": ("nll_cross_style", "nll_none"),  # the other style's drawing of the concept
    "caption_benefit": ("caption_nll_self", "caption_nll_none"),  # caption copy: the document itself, image -> caption
    "choose_benefit": ("choose_nll", "choose_nll_distractor"),  # the document among distractors vs the distractors alone
    "style_benefit": ("style_nll", "style_nll_other"),  # demonstrations in the document's style vs in another style
}
PROBE_K = 2  # documents in a probe's context whatever the recipe's k (the baseline's benefits are measured alike)


def benefit_probes(bank: ExampleBank, vocab, recipe: Recipe, n: int, seed: int = 0) -> dict[str, list]:
    """The fixed lesson sequences the context benefits are measured on, built once: up to n for each NLL of
    BENEFITS (fewer where fewer documents can have the lesson), a benefit's two NLLs on the same documents."""
    rng = np.random.default_rng(seed)
    order = [bank.ids[i] for i in rng.permutation(len(bank))]

    def first(make) -> list[tuple[str, object]]:
        """The first n documents that can have a lesson, each with what make(id) made for it (None: cannot)."""
        out = []
        for i in order:
            if len(out) == n:
                break
            made = make(i)
            if made is not None:
                out.append((i, made))
        return out

    def seqs(pairs, context, text_first=lambda j: True) -> list:
        return [bank.sequence(i, context(i, made), vocab, recipe, text_first(j)) for j, (i, made) in enumerate(pairs)]

    # One set of documents for the copy NLLs: those whose concept is drawn in another style too, where any are.
    cross = first(lambda i: bank.other_styles(i)[:1] or None)
    copy = cross or first(lambda i: [i])
    probes = {"nll_none": seqs(copy, lambda i, _: []), "nll_self": seqs(copy, lambda i, _: [i]),
              "caption_nll_none": seqs(copy, lambda i, _: [], lambda j: False),
              "caption_nll_self": seqs(copy, lambda i, _: [i], lambda j: False),
              "nll_cross_style": seqs(cross, lambda i, other: other)}
    # Choosing: half caption -> image (the caption picks the drawing), half image -> caption (the image, the caption).
    chosen = first(lambda i: bank.distractor_context(i, PROBE_K, rng))
    probes["choose_nll"] = seqs(chosen, lambda i, ctx: ctx, lambda j: j % 2 == 0)
    probes["choose_nll_distractor"] = seqs(chosen, lambda i, ctx: [c for c in ctx if c != i], lambda j: j % 2 == 0)

    def demos(i):  # demonstrations in the document's style, and in its concept's other style
        other = bank.other_styles(i)
        own = bank.style_demos(i, bank.docs[i].style, PROBE_K, rng)
        wrong = bank.style_demos(i, bank.docs[other[0]].style, PROBE_K, rng) if other else None
        return (own, wrong) if own and wrong else None

    styled = first(demos)
    probes["style_nll"] = seqs(styled, lambda i, d: d[0])
    probes["style_nll_other"] = seqs(styled, lambda i, d: d[1])
    return {name: s for name, s in probes.items() if s}


@torch.no_grad()
def main_nll(model, seqs, vocab, image_base: int, tokens_per_image: int, autocast=contextlib.nullcontext) -> float:
    """Mean NLL per token of the main documents' answers: the image codes after a caption, the caption after an
    image (unmasked sequences)."""
    device = next(model.parameters()).device
    b = {k: t.to(device) for k, t in batch(seqs, vocab, image_base, tokens_per_image, text_after_image(model)).items()}
    with autocast():
        ce = token_nll(model, b)
    targets, main = b["input_ids"][:, 1:], b["main_mask"][:, 1:]
    image_first = b["input_ids"].gather(1, b["main_mask"].int().argmax(1, keepdim=True)) == vocab.img_id
    keep = torch.where(image_first, vocab.is_text(targets), vocab.is_image(targets)) & main
    return float((ce * keep).sum() / keep.sum())


def context_benefit(model, probes: dict[str, list], vocab, image_base: int, tokens_per_image: int,
                    autocast=contextlib.nullcontext) -> dict[str, float]:
    """Each probe's NLL (benefit_probes) and each benefit of BENEFITS whose two probes exist."""
    was_training = model.training
    model.eval()
    out = {name: main_nll(model, seqs, vocab, image_base, tokens_per_image, autocast) for name, seqs in probes.items()}
    out.update({name: out[control] - out[right] for name, (right, control) in BENEFITS.items()
                if right in out and control in out})
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
    tokens = {split: {i: DocTokens.from_dict(t) for i, t in raw[split].items()} for split in ("train", "heldout")}
    return {**tokens, "candidates": raw["candidates"], "key": key}


def precompute(cfg: TrainConfig, mt: MultimodalTokenizer, train_docs: list[Document], heldout_docs: list[Document],
               dist) -> dict:
    """Image codes and retrieval candidates, cached in OUT/cache.json: computed by rank 0 alone, read by all."""
    cache = Path(cfg.out) / "cache.json"
    vocab = mt.vocab
    # The cache is only valid for the inputs it was computed from: anything else recomputes it. Format 2: a
    # document without a concept has concept "" and its nearest neighbours among its candidates; 3: interleaved
    # documents keep their segments.
    key = {"format": 3, "dataset": str(Path(cfg.dataset).resolve()), "memory": str(cfg.memory) if cfg.recipe.k else None,
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


def _check_architecture(state: dict, gen_cfg, vocab, n_img: int, fsq_levels, ckpt_path: Path, preset: str,
                        new_heads: bool = False) -> None:
    """Refuse (ValueError, one line) a checkpoint whose tensors another architecture made: a preset, tokenizer or
    image head changed since the run started (load_state_dict would fail with torch's many-line message).
    new_heads: a fine-tuning may start without the tensors of heads the preset adds (NEW_HEADS)."""
    with torch.device("meta"):  # shapes only
        expected = build_model(gen_cfg, vocab, n_img, fsq_levels).state_dict()
    for name, tensor in expected.items():
        if name == "lm_head.weight":  # tied to the input embedding: a checkpoint stores it once
            continue
        if new_heads and name.startswith(NEW_HEADS) and name not in state:
            continue
        found = state.get(name)
        if found is None or tuple(found.shape) != tuple(tensor.shape):
            have = "missing" if found is None else f"of shape {list(found.shape)}"
            raise ValueError(f"{ckpt_path}: tensor {name} is {have} but preset {preset} with these tokenizers builds "
                             f"{list(tensor.shape)}: resume with the preset and tokenizers the run started with, "
                             "or train into a new folder")
    extra = sorted(set(state) - set(expected) - {"lm_head.weight"})
    if extra:
        raise ValueError(f"{ckpt_path}: tensor {extra[0]} is not in the model preset {preset} builds: resume with "
                         "the preset the run started with, or train into a new folder")


# heads a preset may add to the generator a fine-tuning starts from (--init-from): their tensors start fresh
NEW_HEADS = ("copy_query.", "copy_key.", "copy_gate.")

# GeneratorConfig fields that say what a position means: weights trained under other values have the same shapes
# (the architecture check passes) but would read every position differently
POSITION_FIELDS = ("image_base", "text_after_image")


def _check_positions(trained: dict, gen_cfg, where: Path, preset: str) -> None:
    """Refuse (ValueError, one line) weights trained under other position rules than preset's; a field the
    trained settings lack is taken at its default (runs from before the field)."""
    from racm3.generator.model import GeneratorConfig

    defaults, asked = asdict(GeneratorConfig()), asdict(gen_cfg)
    for name in POSITION_FIELDS:
        had = trained.get(name, defaults[name])
        if had != asked[name]:
            raise ValueError(f"{where}: trained with {name} {had!r}, but preset {preset} has {asked[name]!r} (the same "
                             "weights would read every position differently): use the preset it was trained with, "
                             "or train into a new folder")


def _trained_generator(ckpt: dict, out: Path) -> dict:
    """The GeneratorConfig fields a checkpoint was trained with: its own, or (checkpoints from before they held
    them) those of the generator saved beside it; {} where there is neither."""
    from racm3.generator.model import RACM3_FILE

    if "generator" in ckpt:
        return ckpt["generator"]
    try:
        return json.loads((out / RACM3_FILE).read_text()).get("generator", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _initial_weights(cfg: TrainConfig, gen_cfg, mt: MultimodalTokenizer) -> dict:
    """The weights of the generator folder cfg.init_from, refused in one line where its tokenizers (and their image
    codes) or its architecture are not this run's."""
    from racm3.generator.model import check_vocab, load_generator

    start = load_generator(cfg.init_from)
    check_vocab(start, mt.vocab, mt.tokens_per_image, f"{cfg.init_from} (--init-from)", mt.image_code_fingerprint())
    _check_positions(start.racm3["generator"], gen_cfg, Path(cfg.init_from), cfg.preset)
    state = start.state_dict()
    _check_architecture(state, gen_cfg, mt.vocab, mt.tokens_per_image, mt.image.config.fsq_levels,
                        Path(cfg.init_from), cfg.preset, new_heads=True)
    return state


def check_recipe(trained: dict, recipe: Recipe, out: Path) -> None:
    """Refuse (ValueError) to resume a run under another recipe than the one its checkpoint was trained with."""
    asked = asdict(recipe)
    differ = [f for f in sorted(set(trained) | set(asked)) if trained.get(f) != asked.get(f)]
    if not differ:
        return

    def describe(shares: dict) -> str:  # the recipe's name where it is a named one, and the shares that differ
        name = next((n for n, r in RECIPES.items() if asdict(r) == shares), "a custom recipe")
        return f"{name} ({', '.join(f'{f} {shares.get(f)}' for f in differ)})"

    raise ValueError(f"{out}: its checkpoint was trained with recipe {describe(trained)}, this run asks for "
                     f"{describe(asked)}; resume with the checkpoint's recipe, or train into another OUT_DIR")


# Recipe fields added after checkpoints were first written, with the value every run before them trained with.
_RECIPE_BEFORE = {"text_weight": 1.0}


def _trained_recipe(ckpt: dict, out: Path) -> dict:
    """The recipe a checkpoint was trained with; for one saved before checkpoints held it, the one the run's
    train_config.json records (then rewritten at every start: the recipe of its latest start)."""
    if "recipe" in ckpt:
        return {**_RECIPE_BEFORE, **ckpt["recipe"]}
    return {**_RECIPE_BEFORE, **json.loads((out / "train_config.json").read_text())["config"]["recipe"]}


def _last_record(log_path: Path) -> dict:
    """The last line of a run's train_log.jsonl ({} where there is none): a finished run's final metrics."""
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return json.loads(lines[-1]) if lines else {}


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a generator in cfg.out; returns the final metrics (rank 0; {} on the other ranks).

    A run resumes only under the recipe its checkpoint was trained with (check_recipe); one already at cfg.steps
    trains nothing and returns its last log record.
    """
    dist = init_distributed(cfg.device)
    device, rank, world = dist.device, dist.rank, dist.world
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.safetensors"
    ckpt = load_checkpoint(ckpt_path, device) if check_resume(ckpt_path, cfg.resume) else None
    recipe = cfg.recipe
    if ckpt is not None:  # before the precomputation: a refused resume costs nothing
        check_recipe(_trained_recipe(ckpt, out), recipe, out)
    torch.manual_seed(cfg.seed)

    mt = load_tokenizers(cfg.tokenizers)
    vocab, n_img = mt.vocab, mt.tokens_per_image
    gen_cfg = get_preset(cfg.preset)
    if ckpt is not None:  # also before the precomputation: the checkpoint must fit the model this run builds
        _check_architecture(ckpt["model"], gen_cfg, vocab, n_img, mt.image.config.fsq_levels, ckpt_path, cfg.preset)
        _check_positions(_trained_generator(ckpt, out), gen_cfg, ckpt_path, cfg.preset)
    # fine-tuning: the starting weights, checked before the precomputation too (a resumed run has its own)
    start = _initial_weights(cfg, gen_cfg, mt) if cfg.init_from is not None and ckpt is None else None

    train_docs, heldout_docs = _load_split_documents(cfg.dataset)
    if not train_docs:
        raise ValueError(f"{cfg.dataset} holds no training documents with both an image and a caption")
    cached = precompute(cfg, mt, train_docs, heldout_docs, dist)
    bank = ExampleBank(cached["train"], cached["candidates"], max_len=gen_cfg.max_len)
    # the context benefits' fixed lesson sequences, on held-out documents (concepts the model never trains on)
    probes = (benefit_probes(ExampleBank(cached["heldout"], max_len=gen_cfg.max_len), vocab, recipe, cfg.eval_docs,
                             cfg.seed) if cached["heldout"] else {})

    model = build_model(gen_cfg, vocab, n_img, mt.image.config.fsq_levels).to(device)
    model.racm3["image_codes"] = cached["key"]["image_codes"]  # checked at load (check_vocab)
    if start is not None:
        added = model.load_state_dict(start, strict=False).missing_keys  # checked: only NEW_HEADS' tensors
        if added and dist.is_main:
            print(f"fine-tuning {cfg.init_from} with heads it did not have, freshly initialised: "
                  f"{', '.join(sorted({n.split('.')[0] for n in added}))}", flush=True)
        del start
    opt = adamw(decay_groups(model, cfg.weight_decay), cfg.lr, (0.9, 0.95), device)
    scaler = precision.grad_scaler()
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        del ckpt  # its tensors are in the model and the optimizer now
    ddp = dist.wrap(model)
    # each rank its own stream of sequences; a resumed run draws a new stream from where it stopped
    stream = TrainingBatches(bank, vocab, recipe, cfg.batch_size, gen_cfg.image_base, n_img,
                             seed=[cfg.seed, rank, step] if step else cfg.seed + 1000 * rank,
                             text_after_image=gen_cfg.text_after_image)
    workers = cfg.loader_workers if cfg.loader_workers is not None else (2 if device.type == "cuda" else 0)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                               pin_memory=device.type == "cuda",
                                               prefetch_factor=4 if workers else None))
    model.train()

    log_path = out / "train_log.jsonl"
    if step == 0 and rank == 0:  # a fresh run starts a fresh log and records its configuration; a resumed one appends
        log_path.unlink(missing_ok=True)
        meta = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "parameters": sum(p.numel() for p in model.parameters()), "world_size": world,
                "device": str(device), "precision": precision.name}
        (out / "train_config.json").write_text(json.dumps(meta, indent=2, default=str))
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    tokens_seen, t0 = 0, time.perf_counter()
    last = _last_record(log_path) if rank == 0 and step >= cfg.steps else {}
    while step < cfg.steps:
        b = next(batches)
        tokens = int(b.pop("tokens"))  # counted by the loader on the host: no device sync
        b = {name: t.to(device, non_blocking=True) for name, t in b.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with precision.autocast():
            nll = token_nll(ddp, b)
        parts = ra_cm3_loss(nll, b["loss_weights"], b["main_mask"])
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
            if probes and (step % cfg.eval_every == 0 or step == cfg.steps):
                start = time.perf_counter()
                last.update(context_benefit(model, probes, vocab, gen_cfg.image_base, n_img, precision.autocast))
                last["benefit_s"] = time.perf_counter() - start  # what the measurement costs the run
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:.0f}",
                            **{name.split("_")[0]: f"{last[name]:.2f}" for name in BENEFITS if name in last})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                             "recipe": asdict(recipe), "generator": asdict(gen_cfg)}, ckpt_path)
            save_generator(model, out, dtype=getattr(torch, cfg.save_dtype))
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_generator(model, out / f"step-{step}", dtype=getattr(torch, cfg.save_dtype))
    bar.close()
    dist.close()
    return last
