"""ivf-ondisk vs flat as a memory: build, query latency one query at a time, recall@10 against exact search.

    python benchmarks/memory_ondisk_speed.py                    # 100k clustered 384-d vectors (~3 min on one core)
    python benchmarks/memory_ondisk_speed.py --sizes 20000 --out /tmp/x.json

The vectors are retrieval_speed.py's synthetic ones (1,000 centres plus noise, unit length); documents are text
only (the store's images are not what is measured). Each memory is built by one Memory.add of every document (one
write: trained once, saved once), then queried through the memory's own API, one query at a time, on one thread:

- candidates: Memory.candidates(q, 10), the vectors-first answer (index search, the candidates' vectors read from
  the store, exact cosines), no document decoded;
- search: Memory.search(q, 10), the same with the 10 documents decoded;
- recall@10: the ids search returns against the exact top 10 of the stored vectors (ivf-ondisk also with
  ONDISK_RESCORE 1: the index's own 8-bit order, re-scoring only reordering its k);
- open: Memory.open and the first search (the lists file mapped, nothing of it read ahead);
- ivf-ondisk at other nprobe values (--nprobe: the memory probes IVF_NPROBE, 16): recall and candidates' latency.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from racm3.documents import Document
from racm3.evaluation.recall import neighbour_recall
from racm3.retrieval import memory as M
from racm3.retrieval.memory import Memory

from retrieval_speed import DIM, synthetic  # this folder's: the same synthetic vectors

RESULTS = Path(__file__).parent / "results"
K = 10


def timed_queries(call, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        call(q[None])
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"mean_ms": round(statistics.fmean(ms), 3), "p50_ms": round(ms[len(ms) // 2], 3),
            "p95_ms": round(ms[int(len(ms) * 0.95)], 3)}


def recall(mem: Memory, xq: np.ndarray, truth: np.ndarray) -> float:
    found = np.array([[int(h.id[1:]) for h in hits] for hits in mem.search(xq, K)])
    return round(neighbour_recall(found, truth), 4)


def bench(kind: str, folder: Path, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, timed: int,
          nprobes: list[int]) -> list[dict]:
    docs = [Document(f"s{i}", (f"synthetic document {i}",), {"n": i}) for i in range(len(xb))]
    t0 = time.perf_counter()
    with Memory.create(folder, "synthetic", DIM, index=kind) as mem:
        mem.add(docs, xb)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    mem = Memory.open(folder)
    mem.search(xq[:1], K)
    open_s = time.perf_counter() - t0
    row = {"index": kind, "n": len(xb), "build_s": round(build, 2), "open_and_first_search_s": round(open_s, 3)}
    row["candidates"] = summary(timed_queries(lambda q: mem.candidates(q, K), xq[:timed]))
    row["search"] = summary(timed_queries(lambda q: mem.search(q, K), xq[:timed]))
    row["recall@10"] = recall(mem, xq, truth)
    row["index_bytes"] = (folder / M.INDEX).stat().st_size
    row["store_bytes"] = (folder / M.STORE).stat().st_size
    rows = [row]
    if kind == M.ONDISK:
        saved = M.ONDISK_RESCORE
        M.ONDISK_RESCORE = 1
        try:
            row["recall@10_rescore1"] = recall(mem, xq, truth)
        finally:
            M.ONDISK_RESCORE = saved
        row.update(rescore=saved, nlist=int(mem.index.base.nlist), nprobe=min(int(mem.index.base.nlist), M.IVF_NPROBE),
                   lists_bytes=int(mem.index.lists.totsize))
        default = mem.index.nprobe
        try:
            for nprobe in nprobes:
                mem.index.nprobe, mem.index._params = nprobe, None  # the search parameters are made afresh
                rows.append({"index": kind, "n": len(xb), "nprobe": nprobe, "recall@10": recall(mem, xq, truth),
                             "candidates": summary(timed_queries(lambda q: mem.candidates(q, K), xq[:timed]))})
        finally:
            mem.index.nprobe, mem.index._params = default, None
    mem.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000])
    p.add_argument("--queries", type=int, default=1000, help="queries for recall")
    p.add_argument("--timed", type=int, default=300, help="of them, timed one at a time")
    p.add_argument("--indexes", nargs="*", default=["flat", M.ONDISK])
    p.add_argument("--nprobe", type=int, nargs="*", default=[32, 64], help="ivf-ondisk also searched at these")
    p.add_argument("--out", type=Path, default=RESULTS / "memory_ondisk_speed.json")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    rows = []
    for n in args.sizes:
        xb, xq = synthetic(n, args.queries)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(xb)
        _, truth = exact.search(xq, K)
        del exact
        for kind in args.indexes:
            work = Path(tempfile.mkdtemp(prefix="racm3-ondisk-bench-"))
            try:
                for row in bench(kind, work / "m", xb, xq, truth, args.timed, args.nprobe):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    meta = {"dim": DIM, "k": K, "queries": args.queries, "timed": args.timed, "threads": 1,
            "faiss": faiss.__version__, "machine": platform.processor() or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
