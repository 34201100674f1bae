"""Memory index benchmark: flat vs hnsw vs ivfpq on synthetic 384-d vectors (recall@10 vs exact, QPS, build time, bytes).

    python benchmarks/retrieval_speed.py            # 100k vectors, a few minutes on one core
    python benchmarks/retrieval_speed.py --full     # 100k and 1M vectors
    python benchmarks/retrieval_speed.py --sizes 1000000 --ef-sweep 64 128 256 512   # HNSW's efSearch trade-off
    python benchmarks/retrieval_speed.py --sizes 10000000 --ondisk --workdir runs/ondisk   # IVF on disk, bounded RAM

The indexes are the ones racm3's Memory builds (racm3.retrieval.memory._new_index), with its search settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
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


CHUNK = 100_000


def _draw(centres: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    c = rng.integers(0, len(centres), m)
    x = centres[c] + 0.7 * rng.normal(size=(m, DIM)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def synthetic(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (like real embeddings, unlike uniform noise): 1,000 centres plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    xb = np.empty((n, DIM), np.float32)
    for s in range(0, n, CHUNK):  # chunks keep peak memory low at 1M
        xb[s:s + CHUNK] = _draw(centres, min(CHUNK, n - s), rng)
    return xb, _draw(centres, n_queries, rng)


def synthetic_stream(n: int, n_queries: int, seed: int = 0):
    """The same distribution without holding it: (queries, a function yielding the base vectors in chunks)."""
    centres = np.random.default_rng(seed).normal(size=(1000, DIM)).astype(np.float32)
    xq = _draw(centres, n_queries, np.random.default_rng([seed, 1]))

    def chunks():
        for i, s in enumerate(range(0, n, CHUNK)):
            yield s, _draw(centres, min(CHUNK, n - s), np.random.default_rng([seed, 2, i]))

    return xq, chunks


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


def ef_sweep(xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, single: int, efs: list[int],
             ef_construction: int | None = None) -> list[dict]:
    """One HNSW index as the memory builds it (or with another efConstruction), searched at each efSearch."""
    t0 = time.perf_counter()
    index = _new_index("hnsw", DIM)
    if ef_construction is not None:
        faiss.downcast_index(index.index).hnsw.efConstruction = ef_construction
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    build = time.perf_counter() - t0
    rows = []
    for ef in efs:
        faiss.downcast_index(index.index).hnsw.efSearch = ef
        found, batched, one = timed_search(index, xq, single)
        rows.append({"index": "hnsw", "n": len(xb), "ef_construction": faiss.downcast_index(index.index).hnsw.efConstruction,
                     "ef_search": ef, "recall@10": round(neighbour_recall(found, truth), 4),
                     "qps_batched": round(batched, 1), "qps_single": round(one, 1), "build_s": round(build, 2)})
    return rows


def ondisk(n: int, n_queries: int, single: int, workdir: Path, nprobes: list[int]) -> list[dict]:
    """IVF with its inverted lists on disk, as a memory larger than RAM would be served, in bounded RAM.

    Vectors arrive in chunks (a sharded build): the coarse quantizer is trained on a sample; each shard of
    SHARD_CHUNKS chunks is added to a copy of the trained, empty index and written out; faiss.contrib.ondisk's
    merge_ondisk joins the shards' lists into one .ivfdata file, which search memory-maps. Lists hold 8-bit
    scalar-quantized vectors (a quarter of float32); the top RERANK candidates are re-scored exactly from the
    stored float32 vectors (a memory-mapped file standing in for the store). The exact neighbours are found by
    streaming the same chunks, so nothing here ever holds the n vectors in RAM.
    """
    from faiss.contrib.ondisk import merge_ondisk

    marker = workdir / ".retrieval_speed_ondisk"  # only a folder this benchmark made is ever emptied
    if workdir.exists() and any(workdir.iterdir()) and not marker.exists():
        raise SystemExit(f"--workdir {workdir} holds files this benchmark did not write: give an empty or new folder")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    marker.touch()
    xq, chunks = synthetic_stream(n, n_queries)
    # written with plain writes (page cache, not this process's resident pages), read back memory-mapped
    stored = open(workdir / "vectors.f32", "wb")
    # ~4 sqrt(n) lists (FAISS's guideline), at most 8,192 so one core trains them in minutes
    nlist = max(256, min(8192, int(4 * np.sqrt(n)) // 256 * 256))
    quantizer = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)  # assigns to nlist centroids in log time
    index = faiss.IndexIVFScalarQuantizer(quantizer, DIM, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.clustering_index = faiss.IndexFlatIP(DIM)  # k-means itself on exact distances
    index.cp.niter = 10
    t0 = time.perf_counter()
    sample = np.concatenate([x[:max(1, 40 * nlist * CHUNK // n)] for _, x in chunks()])[:40 * nlist]
    index.train(sample)
    del sample
    faiss.write_index(index, str(workdir / "trained.index"))
    train_s = time.perf_counter() - t0
    truth_d = np.full((len(xq), K), -np.inf, np.float32)
    truth = np.zeros((len(xq), K), np.int64)
    shards, part, shard_rows = [], None, 0
    add_s = 0.0
    for start, x in chunks():
        stored.write(x.tobytes())
        for q in range(0, len(xq), 100):  # exact neighbours, merged chunk by chunk (100 queries at a time: small RAM)
            scores = xq[q:q + 100] @ x.T
            top = np.argsort(-scores, axis=1)[:, :K] if len(x) <= K else np.argpartition(-scores, K, axis=1)[:, :K]
            cand_d = np.concatenate([truth_d[q:q + 100], np.take_along_axis(scores, top, 1)], 1)
            cand_i = np.concatenate([truth[q:q + 100], top + start], 1)
            best = np.argsort(-cand_d, axis=1)[:, :K]
            truth_d[q:q + 100], truth[q:q + 100] = (np.take_along_axis(cand_d, best, 1),
                                                    np.take_along_axis(cand_i, best, 1))
        t0 = time.perf_counter()
        if part is None:
            part = faiss.read_index(str(workdir / "trained.index"))
        part.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        shard_rows += len(x)
        if shard_rows >= SHARD_CHUNKS * CHUNK or start + len(x) == n:
            shards.append(str(workdir / f"shard-{len(shards):04d}.index"))
            faiss.write_index(part, shards[-1])
            part, shard_rows = None, 0
        add_s += time.perf_counter() - t0
    stored.close()
    t0 = time.perf_counter()
    merged = faiss.read_index(str(workdir / "trained.index"))
    merge_ondisk(merged, shards, str(workdir / "lists.ivfdata"))
    faiss.write_index(merged, str(workdir / "populated.index"))
    del merged
    for f in shards:
        Path(f).unlink()
    merge_s = time.perf_counter() - t0
    # the lists stay in lists.ivfdata, memory-mapped by OnDiskInvertedLists; the rest (centroids) loads to RAM
    # (not IO_FLAG_MMAP: in faiss 1.15 it is 0x646f0008, which includes IO_FLAG_SKIP_IVF_DATA, so an on-disk
    # index read with it never maps its lists)
    index = faiss.read_index(str(workdir / "populated.index"))
    vectors = np.memmap(workdir / "vectors.f32", dtype=np.float32, mode="r", shape=(n, DIM))
    rows = []
    for nprobe in nprobes:
        faiss.extract_index_ivf(index).nprobe = nprobe
        faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw.efSearch = max(64, 2 * nprobe)
        found, batched, one = timed_search(index, xq, single)
        t0 = time.perf_counter()
        _, cands = index.search(xq, RERANK)
        cands = np.sort(cands, axis=1)  # ascending rows: the memory-mapped reads go forward through the file
        exact = np.einsum("qd,qcd->qc", xq, vectors[np.maximum(cands, 0)].astype(np.float32))
        exact[cands < 0] = -np.inf  # fewer than RERANK found: padding never ranks
        reranked = np.take_along_axis(cands, np.argsort(-exact, axis=1)[:, :K], axis=1)
        rerank_qps = len(xq) / (time.perf_counter() - t0)
        rows.append({"index": "ivf-sq8-ondisk", "n": n, "nlist": nlist, "nprobe": nprobe,
                     "recall@10": round(neighbour_recall(found, truth), 4),
                     "recall@10_rerank32": round(neighbour_recall(reranked, truth), 4),
                     "qps_batched": round(batched, 1), "qps_single": round(one, 1),
                     "qps_batched_with_rerank": round(rerank_qps, 1),
                     "train_s": round(train_s, 1), "add_s": round(add_s, 1), "merge_s": round(merge_s, 1),
                     "shards": len(shards), "lists_bytes": (workdir / "lists.ivfdata").stat().st_size,
                     # the whole run's high-water mark (the build's training sample and shard in RAM included),
                     # and what searching holds: the centroids, the HNSW over them, the touched list pages
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                     "search_rss_bytes": _rss_now()})
        r = rows[-1]
        print(f"{n:>11,} ivf-sq8 on disk nlist {nlist} nprobe {nprobe:>4}  recall@10 {r['recall@10']:.3f} (reranked "
              f"{r['recall@10_rerank32']:.3f})  batched {r['qps_batched']:>7,.0f} q/s  single {r['qps_single']:>6,.0f} "
              f"q/s  RSS peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, searching {r['search_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
    return rows


SHARD_CHUNKS = 10  # 1M vectors per shard: what one build worker would write


def _rss_now() -> int:
    """This process's resident set now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also run 1M vectors")
    p.add_argument("--sizes", type=int, nargs="*", help="explicit sizes (overrides --full)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ef-sweep", type=int, nargs="*", help="only HNSW, searched at each of these efSearch values")
    p.add_argument("--ef-construction", type=int, default=None,
                   help="HNSW's build-time breadth for --ef-sweep (default: the memory's)")
    p.add_argument("--ondisk", action="store_true", help="only the on-disk IVF (streamed: bounded RAM at any size)")
    p.add_argument("--nprobe", type=int, nargs="*", default=[16, 32, 64, 128], help="--ondisk: lists searched")
    p.add_argument("--workdir", type=Path, default=Path("runs/ondisk"), help="--ondisk: where its files go")
    p.add_argument("--out", type=Path, help="JSON to write (default: results/retrieval_speed.json, "
                                            "results/retrieval_speed_ef_sweep.json with --ef-sweep, "
                                            "results/retrieval_speed_ondisk.json with --ondisk)")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([100_000, 1_000_000] if args.full else [100_000])
    rows = []
    for n in sizes:
        if args.ondisk:
            rows += ondisk(n, args.queries, args.single, args.workdir, args.nprobe)
            continue
        xb, xq = synthetic(n, args.queries)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(xb)
        _, truth = exact.search(xq, K)
        if args.ef_sweep:
            for r in ef_sweep(xb, xq, truth, args.single, args.ef_sweep, args.ef_construction):
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
    if not args.ef_sweep and not args.ondisk:
        _print_table(rows)
    default = "retrieval_speed_ondisk" if args.ondisk else "retrieval_speed_ef_sweep" if args.ef_sweep else "retrieval_speed"
    args.out = args.out or RESULTS / f"{default}.json"
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
