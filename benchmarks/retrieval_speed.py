"""Memory index benchmark: flat vs hnsw vs ivfpq on synthetic 384-d vectors (recall@10 vs exact, QPS, build time, bytes).

    python benchmarks/retrieval_speed.py            # 100k vectors, a few minutes on one core
    python benchmarks/retrieval_speed.py --full     # 100k and 1M vectors
    python benchmarks/retrieval_speed.py --sizes 1000000 --ef-sweep 64 128 256 512   # HNSW's efSearch trade-off

The indexes are the ones racm3's Memory builds (racm3.retrieval.memory._new_index), with its search settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from racm3.evaluation.recall import neighbour_recall
from racm3.retrieval.memory import INDEX_TYPES, _new_index

DIM = 384
K = 10
RESULTS = Path(__file__).parent / "results"
RERANK = 32  # the Retriever fetches this many candidates and rescores them with the store's exact vectors


def synthetic(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (like real embeddings, unlike uniform noise): 1,000 centres plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        x = np.empty((m, DIM), np.float32)
        for s in range(0, m, 100_000):  # chunks keep peak memory low at 1M
            c = rng.integers(0, len(centres), min(100_000, m - s))
            x[s:s + len(c)] = centres[c] + 0.7 * rng.normal(size=(len(c), DIM)).astype(np.float32)
        faiss.normalize_L2(x)
        return x

    return draw(n), draw(n_queries)


def timed_search(index, xq: np.ndarray, single: int) -> tuple[np.ndarray, float, float]:
    """Top-K ids of every query in one batch, with queries/s batched and one at a time (the first `single`)."""
    t0 = time.perf_counter()
    _, found = index.search(xq, K)
    batched = len(xq) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for q in xq[:single]:
        index.search(q[None], K)
    return found, batched, single / (time.perf_counter() - t0)


def bench(kind: str, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, single: int) -> dict:
    ids = np.arange(len(xb), dtype=np.int64)
    t0 = time.perf_counter()
    index = _new_index(kind, DIM, n_train=len(xb))
    if not index.is_trained:
        index.train(xb)
    index.add_with_ids(xb, ids)
    build = time.perf_counter() - t0
    found, batched, one = timed_search(index, xq, single)
    # As the memory answers a Retriever: RERANK candidates rescored exactly, best K kept.
    _, cands = index.search(xq, RERANK)
    exact = np.einsum("qd,qcd->qc", xq, xb[np.maximum(cands, 0)])  # (Q, RERANK)
    exact[cands < 0] = -np.inf
    reranked = np.take_along_axis(cands, np.argsort(-exact, axis=1)[:, :K], axis=1)
    return {"index": kind, "n": len(xb), "recall@10": round(neighbour_recall(found, truth), 4),
            "recall@10_rerank32": round(neighbour_recall(reranked, truth), 4),
            "qps_batched": round(batched, 1), "qps_single": round(one, 1), "build_s": round(build, 2),
            "bytes": len(faiss.serialize_index(index))}


def ef_sweep(xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, single: int, efs: list[int]) -> list[dict]:
    """One HNSW index as the memory builds it, searched at each efSearch (the search-time accuracy knob)."""
    t0 = time.perf_counter()
    index = _new_index("hnsw", DIM)
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    build = time.perf_counter() - t0
    rows = []
    for ef in efs:
        faiss.downcast_index(index.index).hnsw.efSearch = ef
        found, batched, one = timed_search(index, xq, single)
        rows.append({"index": "hnsw", "n": len(xb), "ef_search": ef, "recall@10": round(neighbour_recall(found, truth), 4),
                     "qps_batched": round(batched, 1), "qps_single": round(one, 1), "build_s": round(build, 2)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also run 1M vectors")
    p.add_argument("--sizes", type=int, nargs="*", help="explicit sizes (overrides --full)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ef-sweep", type=int, nargs="*", help="only HNSW, searched at each of these efSearch values")
    p.add_argument("--out", type=Path, help="JSON to write (default: results/retrieval_speed.json, or "
                                            "results/retrieval_speed_ef_sweep.json with --ef-sweep)")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([100_000, 1_000_000] if args.full else [100_000])
    rows = []
    for n in sizes:
        xb, xq = synthetic(n, args.queries)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(xb)
        _, truth = exact.search(xq, K)
        if args.ef_sweep:
            for r in ef_sweep(xb, xq, truth, args.single, args.ef_sweep):
                print(f"{r['n']:>9,} hnsw efSearch {r['ef_search']:>4}  recall@10 {r['recall@10']:.3f}  batched "
                      f"{r['qps_batched']:>7,.0f} q/s  single {r['qps_single']:>7,.0f} q/s", flush=True)
                rows.append(r)
            continue
        for kind in INDEX_TYPES:
            rows.append(bench(kind, xb, xq, truth, args.single))
            r = rows[-1]
            print(f"{r['n']:>9,} {r['index']:<6} recall@10 {r['recall@10']:.3f} (reranked {r['recall@10_rerank32']:.3f})  batched {r['qps_batched']:>9,.0f} q/s  "
                  f"single {r['qps_single']:>8,.0f} q/s  build {r['build_s']:>7.1f} s  {r['bytes'] / 2**20:>8.1f} MiB",
                  flush=True)
    if not args.ef_sweep:
        _print_table(rows)
    args.out = args.out or RESULTS / ("retrieval_speed_ef_sweep.json" if args.ef_sweep else "retrieval_speed.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dim": DIM, "k": K, "queries": args.queries, "threads": args.threads, "faiss": faiss.__version__,
            "machine": platform.processor() or platform.machine()}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return rows


def _print_table(rows: list[dict]) -> None:
    print()
    print("| n | index | recall@10 | recall@10, top-32 reranked | QPS batched | QPS single | build (s) | MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['index']} | {r['recall@10']:.3f} | {r['recall@10_rerank32']:.3f} | {r['qps_batched']:,.0f} | {r['qps_single']:,.0f} | "
              f"{r['build_s']:.1f} | {r['bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
