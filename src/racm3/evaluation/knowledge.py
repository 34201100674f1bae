"""The knowledge benchmark: on held-out concepts, what retrieval buys in caption->image and image->caption."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from racm3.documents import Document
from racm3.evaluation.cider import cider_scores
from racm3.evaluation.judge import drawing_judge, image_judge, name_match
from racm3.limits import TEMPERATURE_RULE, temperature_ok

# Rows of issue 6, item 2, in table order: (model, k, memory view). "baseline" is the generator trained with k=0.
ROWS = ("no_retrieval", "ra_k0", "retrieval_only", "ra_k1", "ra_k2", "ra_k2_cross_style", "ra_k2_leave_one_out")
DIRECTIONS = ("caption_to_image", "image_to_caption")
ROW_SPEC = {  # row -> (which model, k, which documents leave the memory for each query)
    "no_retrieval": ("baseline", 0, "none"),
    "ra_k0": ("model", 0, "none"),
    "retrieval_only": ("retrieval", 1, "none"),
    "ra_k1": ("model", 1, "none"),
    "ra_k2": ("model", 2, "none"),
    "ra_k2_cross_style": ("model", 2, "same_style"),
    "ra_k2_leave_one_out": ("model", 2, "concept"),
}


@dataclass
class KnowledgeConfig:
    """What to run: how many held-out queries, how hard to sample, which rows and directions."""

    limit: int = 100  # held-out query documents (one concept each while concepts last)
    samples: int = 4  # samples per output, reranked by the encoder (the CLI's default is 8; 4 keeps --limit 100 short)
    guidance: float = 3.0  # classifier-free guidance for caption->image
    # sampling temperature of caption->image's codes, for every row alike; None: the RA model's (its sampling.json)
    temperature: float | None = None
    seed: int = 0
    rows: tuple[str, ...] = ROWS
    directions: tuple[str, ...] = DIRECTIONS
    fid: bool = True  # Inception FID of each row's images against the queries' own drawings
    caption_rerank: str = "image"  # generate_text's rule for keeping one of the samples: "image" or "source"

    def __post_init__(self) -> None:
        if self.caption_rerank not in ("image", "source"):
            raise ValueError(f"caption_rerank must be 'image' or 'source', got {self.caption_rerank!r}")
        if self.temperature is not None and not temperature_ok(self.temperature):
            raise ValueError(f"temperature must be {TEMPERATURE_RULE}, got {self.temperature}")
        if self.limit < 1 or self.samples < 1:
            raise ValueError(f"limit and samples must be >= 1 (got {self.limit}, {self.samples})")
        self.rows, self.directions = tuple(self.rows), tuple(self.directions)
        bad = [r for r in self.rows if r not in ROWS] + [d for d in self.directions if d not in DIRECTIONS]
        if bad:
            raise ValueError(f"unknown rows/directions {bad}; rows: {ROWS}; directions: {DIRECTIONS}")


def select_queries(docs: Sequence[Document], limit: int, seed: int = 0) -> list[Document]:
    """Held-out documents with an image, a caption and a concept: one per concept (concepts in seeded random
    order, alternating styles), then second documents of each concept, until `limit`."""
    held = [d for d in docs if d.meta.get("split") == "heldout" and d.image is not None and d.text
            and d.meta.get("concept")]
    if not held:
        raise ValueError("no held-out documents (split == 'heldout' with image, caption and concept) in the data set")
    by_concept: dict[str, list[Document]] = {}
    for d in sorted(held, key=lambda d: d.id):
        by_concept.setdefault(d.meta["concept"], []).append(d)
    rng = random.Random(seed)
    concepts = sorted(by_concept)
    rng.shuffle(concepts)
    all_styles = sorted({d.meta.get("style") or "" for d in held})
    for i, c in enumerate(concepts):
        rng.shuffle(by_concept[c])
        # Concept i leads with style i mod S, so the first layer covers the styles evenly.
        lead = all_styles[i % len(all_styles)]
        by_concept[c].sort(key=lambda d: (d.meta.get("style") or "") != lead)
    out, depth = [], 0
    while len(out) < limit and any(len(v) > depth for v in by_concept.values()):
        layer = [by_concept[c][depth] for c in concepts if len(by_concept[c]) > depth]
        # Alternate styles within a layer so that both art styles are queried about equally.
        styles = sorted({d.meta.get("style") or "" for d in layer})
        queues = {s: [d for d in layer if (d.meta.get("style") or "") == s] for s in styles}
        while any(queues.values()) and len(out) < limit:
            for s in styles:
                if queues[s] and len(out) < limit:
                    out.append(queues[s].pop(0))
        depth += 1
    return out


def removed_ids(query: Document, kind: str, meta: dict[str, tuple[str, str]]) -> list[str]:
    """Memory ids a row hides from one query (retrieval's exclude_ids: the memory itself is never written).
    meta: id -> (concept, style) of every memory document.
    same_style: the concept's documents in the query's style (only the other style's drawing remains);
    concept: all the concept's documents (leave-one-out)."""
    if kind == "none":
        return []
    concept, style = query.meta["concept"], query.meta.get("style")
    if kind == "concept":
        return [i for i, (c, _) in meta.items() if c == concept]
    if kind == "same_style":
        return [i for i, (c, s) in meta.items() if c == concept and s == style]
    raise ValueError(f"unknown removal kind {kind!r}")


def _blank(size: int = 64):
    from PIL import Image

    return Image.new("RGB", (size, size), "white")


def _retrieval_answer(model, query, memory, want: str, hidden: Sequence[str]):
    """The top retrieved document's image or caption, with the time it took (retrieval_only row)."""
    t0 = time.perf_counter()
    hits = model.retrieve(query, memory, 1, exclude_ids=hidden)
    doc = hits[0].document if hits else None
    if want == "image":
        answer = doc.image if doc is not None and doc.image is not None else _blank()
    else:
        answer = doc.text if doc is not None and doc.text else ""
    return answer, hits, time.perf_counter() - t0


def run_row(row: str, model, baseline, memory, queries: Sequence[Document], meta: dict[str, tuple[str, str]],
            config: KnowledgeConfig, log: Callable[[str], None] = print) -> dict:
    """Generate every query's image and caption under one row; returns outputs and timings (no metrics yet)."""
    who, k, removal = ROW_SPEC[row]
    gen = baseline if who == "baseline" else model
    images, captions, t_img, t_cap, sources = [], [], [], [], []
    for n, q in enumerate(queries):
        hidden = removed_ids(q, removal, meta)
        mem = memory if k > 0 else None
        if "caption_to_image" in config.directions:
            if who == "retrieval":
                image, hits, secs = _retrieval_answer(model, q.text, memory, "image", hidden)
            else:
                out = gen.generate_image(q.text, memory=mem, k=k, num_samples=config.samples,
                                         guidance=config.guidance, temperature=config.temperature,
                                         seed=config.seed + n, exclude_ids=hidden)
                image, hits, secs = out.image, out.sources, out.seconds
            images.append(image)
            t_img.append(secs)
            sources.append([h.id for h in hits])
        if "image_to_caption" in config.directions:
            if who == "retrieval":
                text, _, secs = _retrieval_answer(model, q.image, memory, "text", hidden)
            else:
                out = gen.generate_text(q.image, memory=mem, k=k, num_samples=config.samples, seed=config.seed + n,
                                        rerank=config.caption_rerank, exclude_ids=hidden)
                text, secs = out.text, out.seconds
            captions.append(text or "")
            t_cap.append(secs)
        if (n + 1) % 25 == 0:
            log(f"  {row}: {n + 1}/{len(queries)}")
    return {"images": images, "captions": captions, "t_img": t_img, "t_cap": t_cap, "sources": sources}


def score_row(outputs: dict, queries: Sequence[Document], encoder, concept_names: Sequence[str],
              name_vectors: np.ndarray, reference_features: np.ndarray | None,
              features_fn: Callable | None, drawings: tuple[np.ndarray, list[str]] | None = None) -> dict:
    """FID and judge accuracy of the images, CIDEr-D and name accuracy of the captions, seconds per output."""
    from racm3.evaluation.fid import fid_from_features

    res: dict = {}
    if outputs["images"]:
        judge = image_judge(encoder, outputs["images"], [q.meta["concept"] for q in queries], concept_names,
                            name_vectors=name_vectors)
        res["judge_accuracy"] = round(judge.accuracy, 4)
        if drawings is not None:  # the nearest real drawing's concept (see judge.drawing_judge)
            dj = drawing_judge(encoder, outputs["images"], [q.meta["concept"] for q in queries], *drawings)
            res["drawing_judge_accuracy"] = round(dj.accuracy, 4)
        if reference_features is not None and features_fn is not None and len(queries) >= 2:
            res["fid"] = round(fid_from_features(features_fn(outputs["images"]), reference_features), 2)
        res["seconds_per_image"] = round(float(np.mean(outputs["t_img"])), 3)
        res["image_examples"] = [{"query": q.text, "judged_as": p}
                                 for q, p in zip(queries[:5], judge.predictions[:5])]
    if outputs["captions"]:
        cands = {q.id: c for q, c in zip(queries, outputs["captions"])}
        refs = {q.id: [q.text] for q in queries}
        per = cider_scores(cands, refs)
        res["cider"] = round(float(np.mean(list(per.values()))), 4)
        res["name_accuracy"] = round(float(np.mean([name_match(c, q.text, q.meta["concept"])
                                                     for q, c in zip(queries, outputs["captions"])])), 4)
        res["seconds_per_caption"] = round(float(np.mean(outputs["t_cap"])), 3)
        res["caption_examples"] = [{"truth": q.text, "generated": c} for q, c in zip(queries[:5], outputs["captions"][:5])]
    return res


def run_knowledge_benchmark(model, memory_dir: str | Path, docs: Sequence[Document], config: KnowledgeConfig,
                            baseline=None, features_fn: Callable | None = None,
                            log: Callable[[str], None] = print, judge_encoder=None) -> dict:
    """Every row of the benchmark on `config.limit` held-out queries; the memory at memory_dir is only read.

    model, baseline: RACM3-like objects (generate_image, generate_text, retrieve, encoder). baseline None skips
    no_retrieval (reported as skipped). features_fn: images -> (n, d) features for FID (default Inception).
    judge_encoder: the encoder the judges use (default: the model's; e.g. one trained on every concept).
    """
    from racm3.evaluation.fid import inception_features
    from racm3.retrieval.memory import Memory

    t_start = time.perf_counter()
    if config.temperature is None:  # the RA model's default, given to the baseline too: one temperature per table
        config = replace(config, temperature=getattr(model, "sampling", {}).get("image_temperature", 1.0))
    features_fn = features_fn or inception_features
    queries = select_queries(docs, config.limit, config.seed)
    concept_names = sorted({d.meta["concept"] for d in docs if d.meta.get("concept")})
    encoder = judge_encoder or model.encoder
    name_vectors = encoder.embed_text(concept_names)  # (C, D), shared by every row's judge
    drawn = [d for d in docs if d.image is not None and d.meta.get("concept")]
    drawings = (encoder.embed_image([d.image for d in drawn]), [d.meta["concept"] for d in drawn])
    want_fid = config.fid and "caption_to_image" in config.directions
    ref = features_fn([q.image for q in queries]) if want_fid else None
    log(f"knowledge benchmark: {len(queries)} held-out queries over {len({q.meta['concept'] for q in queries})} "
        f"concepts, {len(concept_names)} candidate concept names, rows {', '.join(config.rows)}")
    rows: dict[str, dict] = {}
    with Memory.open(memory_dir) as memory:  # only read: each row's hidden documents are retrieval's exclude_ids
        ids, metas, _ = memory.scan()
        meta = {i: (m.get("concept"), m.get("style")) for i, m in zip(ids, metas)}
        for row in config.rows:
            if ROW_SPEC[row][0] == "baseline" and baseline is None:
                rows[row] = {"skipped": "no baseline generator (a generator_k0/ beside the model, or --baseline DIR)"}
                log(f"{row}: skipped (no baseline generator)")
                continue
            t0 = time.perf_counter()
            outputs = run_row(row, model, baseline, memory, queries, meta, config, log)
            rows[row] = score_row(outputs, queries, encoder, concept_names, name_vectors, ref,
                                  features_fn if want_fid else None, drawings)
            rows[row]["seconds"] = round(time.perf_counter() - t0, 1)
            log(f"{row}: " + ", ".join(f"{k}={v}" for k, v in rows[row].items() if not k.endswith("examples")))
    return {"rows": rows, "config": asdict(config), "model_sampling": getattr(model, "sampling", None),
            "queries": len(queries),
            "concepts": len({q.meta["concept"] for q in queries}), "query_ids": [q.id for q in queries],
            "elapsed_s": round(time.perf_counter() - t_start, 1)}


COLUMNS = (("fid", "c->i FID"), ("judge_accuracy", "c->i judge"), ("drawing_judge_accuracy", "c->i drawing judge"), ("cider", "i->c CIDEr"),
           ("name_accuracy", "i->c name"), ("seconds_per_image", "s/image"), ("seconds_per_caption", "s/caption"))


def format_table(result: dict) -> str:
    """The benchmark's rows as a Markdown table (missing values as '-')."""
    head = "| row | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row, vals in result["rows"].items():
        if "skipped" in vals:
            lines.append(f"| {row} | " + " | ".join("skipped" for _ in COLUMNS) + " |")
            continue
        cells = [f"{vals[k]:.3f}" if isinstance(vals.get(k), float) and k != "fid" else
                 (f"{vals[k]:.1f}" if k == "fid" and k in vals else str(vals.get(k, "-"))) for k, _ in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_models(model_dir: str | Path | None = None, baseline_dir: str | Path | None = None):
    """The RA-CM3 model (shipped by default) and the no-retrieval baseline: `baseline_dir` (a model folder, or a
    generator folder inside one), else the `generator_k0/` shipped beside the model's generator, else None."""
    from racm3.pipeline import RACM3
    from racm3.pretrained import shipped_model_dir

    model = RACM3.from_pretrained(model_dir)
    root = Path(model_dir) if model_dir is not None else shipped_model_dir()
    if baseline_dir is None:
        baseline = RACM3.from_pretrained(root, generator="generator_k0") if (root / "generator_k0").is_dir() else None
    else:
        b = Path(baseline_dir)
        if not b.is_dir():
            raise FileNotFoundError(f"{b}: no baseline here; pass a model folder or its generator_k0/ folder")
        baseline = RACM3.from_pretrained(b) if (b / "text_tokenizer").is_dir() else \
            RACM3.from_pretrained(b.parent, generator=b.name)
    return model, baseline


def knowledge(model_dir=None, baseline_dir=None, memory_dir=None, dataset_dir=None,
              config: KnowledgeConfig | None = None, log: Callable[[str], None] = print,
              judge_encoder_dir=None) -> dict:
    """`racm3 eval knowledge` end to end: defaults are the shipped model and the emoji data set and memory."""
    from racm3.embedded import ensure_emoji_dataset, ensure_emoji_memory
    from racm3.readers import read_documents

    config = config or KnowledgeConfig()
    model, baseline = load_models(model_dir, baseline_dir)
    dataset = Path(dataset_dir) if dataset_dir is not None else ensure_emoji_dataset(log=log)
    memory = Path(memory_dir) if memory_dir is not None else ensure_emoji_memory(model.encoder, log=log)
    docs = list(read_documents(dataset))
    judge = None
    if judge_encoder_dir is not None:
        from racm3.retrieval.encoder import load_encoder

        judge = load_encoder(judge_encoder_dir)
    result = run_knowledge_benchmark(model, memory, docs, config, baseline=baseline, log=log, judge_encoder=judge)
    result.update(judge_encoder=(judge or model.encoder).name, model=str(model_dir or "shipped"),
                  baseline=str(baseline_dir or "generator_k0 beside the model"),
                  memory=str(memory), dataset=str(dataset))
    return result
