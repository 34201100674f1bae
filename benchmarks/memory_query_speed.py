"""Memory speed as a caller sees it: one query through the paper's rules, one-document writes, a reader catching up.

    python benchmarks/memory_query_speed.py                          # the emoji memory (~8k) and 100k synthetic
    python benchmarks/memory_query_speed.py --sizes 100000 --index hnsw
    python benchmarks/memory_query_speed.py --before results/memory_query_speed_before.json   # before/after table

Query vectors are given (embedding excluded): a stored document's vector plus noise. Per memory:

- retrieve: `Retriever.retrieve_vectors` with the default rules (k 2, 32 candidates, diversity, multimodal first),
  one query at a time; with the query's own document excluded too (as training retrieval asks);
- search: `Memory.search(q, 10)`, the plain top 10 with their documents;
- add / remove: one document added to (then removed from) the memory, each a whole write (lock, store, index);
- catch-up: a reader's first retrieval after another Memory object wrote one document;
- open: a cold start: `Memory.open`, reading every id and the query documents' vectors, the first retrieval.

The emoji memory is copied (the copy is written, never the cache); the synthetic memory (16x16 random images,
captions, random unit 384-d vectors) is built once per run in a temporary folder. Only APIs that existed before
the vectors-first change are used, so this script measures the old code too (run it from a checkout of it with
PYTHONPATH=that/src, --out ..._before.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from racm3.documents import Document
from racm3.retrieval import memory as M
from racm3.retrieval.memory import Memory
from racm3.retrieval.retriever import Retriever

RESULTS = Path(__file__).parent / "results"
DIM = 384
CACHE = Path(os.environ.get("RACM3_CACHE", Path.home() / ".cache" / "racm3"))
INDEXES = getattr(M, "FOLDER_INDEX_TYPES", M.INDEX_TYPES)  # an older checkout (--before) has no ivf-ondisk


class VectorsOnly:
    """The retriever's encoder, for a caller that brings its own query vectors (only the name and size are read)."""

    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim


def synthetic_docs(n: int, start: int, rng: np.random.Generator) -> tuple[list[Document], np.ndarray]:
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    docs = [Document(f"syn-{i}", (Image.fromarray(images[j]), f"synthetic document {i}"), {"n": i})
            for j, i in enumerate(range(start, start + n))]
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    return docs, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def build_synthetic(folder: Path, n: int, index: str) -> float:
    """A memory of n synthetic documents, added in one write (as `racm3 memory build` does); seconds taken."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with Memory.create(folder, "synthetic-random-unit-vectors", DIM, index=index) as mem:
        for s in range(0, n, 20_000):  # 20k documents' images at a time keep the build's RAM small
            docs, vecs = synthetic_docs(min(20_000, n - s), s, rng)
            mem.add(docs, vecs)
    return time.perf_counter() - t0


def emoji_memory() -> Path | None:
    found = sorted(CACHE.glob("memory-emoji-*"))
    return found[0] if found else None


def ms(fn) -> float:
    """Milliseconds of one call."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
            "n": len(ms)}


def measure(folder: Path, queries: int, writes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    mem = Memory.open(folder)
    retriever = Retriever(mem, VectorsOnly(mem.encoder_name, mem.dim))
    ids = mem.ids()
    some = [ids[i] for i in rng.choice(len(ids), queries, replace=False)]
    base = mem.vectors(some)
    noisy = base + rng.normal(scale=0.3 / np.sqrt(mem.dim), size=base.shape).astype(np.float32)
    qs = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    retriever.retrieve_vectors(qs[:1], 2, [set()])
    open_ms = (time.perf_counter() - t0) * 1000
    for q in qs[:10]:  # warm-up: the first calls' allocations and page cache
        retriever.retrieve_vectors(q[None], 2, [set()])
    res = {"documents": len(ids), "index": mem.index_type, "open_ms": round(open_ms, 1)}

    def one(r: Retriever, n: int, exclude=()) -> None:
        r.retrieve_vectors(qs[n][None], 2, [set(exclude)])

    res["retrieve"] = summary([ms(lambda: one(retriever, n)) for n in range(queries)])
    res["retrieve_excluding_own"] = summary([ms(lambda: one(retriever, n, [some[n]])) for n in range(queries)])
    res["search_top10"] = summary([ms(lambda: mem.search(qs[n][None], 10)) for n in range(queries)])

    if writes == 0:
        mem.close()
        return res
    docs, vecs = synthetic_docs(writes, 10**9, rng)  # new ids, outside every memory's
    reader = Memory.open(folder)
    reader_retriever = Retriever(reader, VectorsOnly(mem.encoder_name, mem.dim))
    one(reader_retriever, 0)
    adds, removes, catch_ups = [], [], []
    for d, v in zip(docs, vecs):
        adds.append(ms(lambda: mem.add([d], v[None])))
        catch_ups.append(ms(lambda: one(reader_retriever, 0)))
        removes.append(ms(lambda: mem.remove([d.id])))
    res["add_one"], res["remove_one"], res["reader_catch_up"] = summary(adds), summary(removes), summary(catch_ups)
    reader.close()
    mem.close()
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000], help="synthetic memories to build")
    p.add_argument("--index", default="flat", choices=INDEXES, help="the synthetic memories' index")
    p.add_argument("--emoji", type=Path, default=emoji_memory(), help="a built emoji memory (default: the cache's)")
    p.add_argument("--no-emoji", action="store_true")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--writes", type=int, default=5, help="one-document adds and removes timed (0: none)")
    p.add_argument("--before", type=Path, help="a JSON this script wrote from the old code: print both")
    p.add_argument("--out", type=Path, default=RESULTS / "memory_query_speed.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="racm3-query-speed-") as tmp:
        if args.emoji is not None and not args.no_emoji:
            shutil.copytree(args.emoji, Path(tmp) / "emoji")
            rows.append({"memory": "emoji", **measure(Path(tmp) / "emoji", args.queries, args.writes)})
            print(json.dumps(rows[-1]), flush=True)
        for n in args.sizes:
            folder = Path(tmp) / f"synthetic-{n}"
            build_s = build_synthetic(folder, n, args.index)
            rows.append({"memory": f"synthetic {n:,}", "build_s": round(build_s, 1),
                         **measure(folder, args.queries, args.writes)})
            print(json.dumps(rows[-1]), flush=True)
    before = json.loads(args.before.read_text())["results"] if args.before else None
    _print_table(rows, before)
    meta = {"threads": os.environ.get("OMP_NUM_THREADS"), "queries": args.queries, "writes": args.writes,
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    out = {"meta": meta, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return out


COLUMNS = [("retrieve", "retrieve (ms)"), ("retrieve_excluding_own", "retrieve, own excluded"),
           ("search_top10", "search top 10"), ("add_one", "add 1"), ("remove_one", "remove 1"),
           ("reader_catch_up", "reader catch-up")]


def _print_table(rows: list[dict], before: list[dict] | None) -> None:
    """Medians in ms; with `before`, 'before -> after (factor)' for the memories both runs measured."""
    old = {(r["memory"], r["index"]): r for r in before or []}
    print()
    print("| memory | index | " + " | ".join(c for _, c in COLUMNS) + " | open (ms) |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for r in rows:
        b = old.get((r["memory"], r["index"]))
        cells = []
        for key, _ in COLUMNS + [("open_ms", "")]:
            if key not in r:
                cells.append("-")
                continue
            now = r[key] if key == "open_ms" else r[key]["median_ms"]
            if b is None:
                cells.append(f"{now:,.2f}")
            else:
                was = b[key] if key == "open_ms" else b[key]["median_ms"]
                cells.append(f"{was:,.2f} -> {now:,.2f} ({was / max(now, 1e-9):,.1f}x)")
        print(f"| {r['memory']} ({r['documents']:,}) | {r['index']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
