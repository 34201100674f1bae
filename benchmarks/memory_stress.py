"""Stress test of the memory's one-writer-at-a-time guarantee: writer processes add and remove, readers search.

Writers (separate processes, each keeping one Memory open across rounds, as a long `racm3 memory add` does) add
a few documents and remove a few of their own in every round, all at once; readers search in a loop the whole
time. Documents are text-only with random unit vectors derived from their ids (a fake encoder name, no model).
After every round the main process checks, from outside the Memory class as well as through it:

- lost: an acknowledged add that the store lacks, or that its own vector does not find first (with its caption);
- ghost: an acknowledged remove that the store still holds or a search still returns;
- the index on disk (index.faiss as memory.json describes it, plus the store's changes since) is the store's;
- readers: every hit they saw was a real document with the caption its id implies, and no reader raised.

    python benchmarks/memory_stress.py                      # 200 rounds, 3 writers, 2 readers (about a minute)
    python benchmarks/memory_stress.py --rounds 20 --index hnsw

Prints a table and writes benchmarks/results/memory_stress.json. tests/test_memory_concurrency.py runs it small.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import sqlite3
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

DIM = 32
ENCODER = "stress-fake-encoder"
INITIAL = 40  # documents in the memory before the first round
RESULTS = Path(__file__).parent / "results" / "memory_stress.json"


def vector(doc_id: str) -> np.ndarray:
    """The document's unit vector, the same in every process (seeded by the id)."""
    v = np.random.default_rng(zlib.crc32(doc_id.encode())).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def caption(doc_id: str) -> str:
    return f"caption of {doc_id}"


def documents(ids: list[str]):
    from racm3.documents import Document

    return [Document(i, (caption(i),), {"stress": True}) for i in ids], np.stack([vector(i) for i in ids])


class FakeEncoder:
    """Embeds a document as its id's vector: add_documents runs as the CLI runs it, with no model."""

    name, dim = ENCODER, DIM

    def embed_documents(self, docs):
        return np.stack([vector(d.id) for d in docs])


def _writer(folder: str, w: int, rounds: int, start: mp.Barrier, done: mp.Queue, seed: int) -> None:
    """Each round: wait for the others, then add 1-3 documents and remove 0-2 of its own, in random order;
    report what was acknowledged (the call returned) to the main process."""
    from racm3.retrieval.memory import Memory

    rng = random.Random(seed * 1000 + w)
    mem = Memory.open(folder)  # kept open across rounds: its loaded index goes stale as the others write
    live: list[str] = []
    for r in range(rounds):
        start.wait(timeout=300)  # with the other writers and the main process, which checked the last round
        added, removed, error = [], [], None
        try:
            ops = ["add", "remove"] if rng.random() < 0.5 else ["remove", "add"]
            for op in ops:
                if op == "add":
                    ids = [f"w{w}-r{r}-{j}" for j in range(rng.randint(1, 3))]
                    if rng.random() < 0.5:
                        mem.add(*documents(ids))
                    else:
                        mem.add_documents(documents(ids)[0], FakeEncoder())
                    added += ids
                    live += ids
                elif live and rng.random() < 0.7:
                    ids = rng.sample(live, min(len(live), rng.randint(1, 2)))
                    mem.remove(ids)
                    removed += ids
                    live = [i for i in live if i not in ids]
            if rng.random() < 0.1:  # now and then a fresh open, as a new CLI process would
                mem.close()
                mem = Memory.open(folder)
        except Exception as exc:  # noqa: BLE001 - reported and counted by the main process
            error = f"writer {w} round {r}: {type(exc).__name__}: {exc}"
        done.put((w, r, added, removed, error))
    mem.close()


def _reader(folder: str, k: int, stop: mp.Event, out: mp.Queue, seed: int) -> None:
    """Search in a loop until told to stop: queries are the vectors of ids that may or may not be present."""
    from racm3.retrieval.memory import Memory

    rng = random.Random(seed)
    searches = hits = bad = 0
    errors: list[str] = []
    mem = Memory.open(folder)
    while not stop.is_set():
        try:
            ids = [f"init-{rng.randrange(INITIAL)}"] + [f"w{rng.randrange(3)}-r{rng.randrange(8)}-0"]
            for row in mem.search(np.stack([vector(i) for i in ids]), k):
                for h in row:
                    hits += 1
                    if h.document.text != caption(h.id) or h.score > 1.0 + 1e-4:
                        bad += 1
            searches += 1
            if rng.random() < 0.05:
                mem.close()
                mem = Memory.open(folder)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
            try:
                mem.close()
                mem = Memory.open(folder)
            except Exception:  # noqa: BLE001 - counted above; the next search tells
                pass
            if len(errors) > 20:
                break
    out.put({"searches": searches, "hits": hits, "bad_hits": bad, "errors": errors})


def _disk_index_matches_store(folder: Path) -> str | None:
    """None when index.faiss, as memory.json describes it (checksum, generation, rows held), plus the store's changes
    since (rows above those it holds, rows the removed table logs after its generation) gives the store's rows; else
    what differs. Reads the files directly, not through Memory, which would repair a mismatch in RAM and hide it."""
    import faiss

    conn = sqlite3.connect(str(folder / "store.sqlite"))
    info = json.loads((folder / "memory.json").read_text())
    try:
        generation = int(conn.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()[0])
        rows = {r[0] for r in conn.execute("SELECT row FROM documents")}
        added = {r[0] for r in conn.execute("SELECT row FROM documents WHERE row > ?", (info["rows_through"],))}
        removed = {r[0] for r in conn.execute("SELECT row FROM removed WHERE generation > ?", (info["generation"],))}
    finally:
        conn.close()
    if info["generation"] > generation:
        return f"memory.json generation {info['generation']}, store {generation}"
    raw = (folder / "index.faiss").read_bytes()
    if (zlib.crc32(raw), len(raw)) != (info["index_crc32"], info["index_bytes"]):
        return "index.faiss is not the file memory.json describes"
    index = faiss.deserialize_index(np.frombuffer(raw, np.uint8))
    if hasattr(index, "id_map"):
        indexed = set(faiss.vector_to_array(index.id_map).tolist())
    else:  # IVF: ids live in the inverted lists
        invlists = faiss.extract_index_ivf(index).invlists
        indexed = {int(i) for lst in range(invlists.nlist)
                   for i in faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst))}
    if index.ntotal != len(indexed) or (indexed - removed) | added != rows:
        return f"index holds {index.ntotal} rows, store {len(rows)} ({len(((indexed - removed) | added) ^ rows)} differ)"
    return None


def _check(folder: Path, expected: set[str], gone: set[str]) -> tuple[set[str], set[str], str | None]:
    """(lost ids, ghost ids, disk mismatch) after a round, as a fresh reader sees the memory."""
    from racm3.retrieval.memory import Memory

    with Memory.open(folder) as mem:
        stored = set(mem.ids())
        lost = set(expected - stored)
        ghost = set(gone & stored)
        present = sorted(expected & stored)
        if present:
            for doc_id, hits in zip(present, mem.search(np.stack([vector(i) for i in present]), 3)):
                if not hits or hits[0].id != doc_id or hits[0].document.text != caption(doc_id):
                    lost.add(doc_id)
                ghost.update(h.id for h in hits if h.id in gone)
        if gone:
            for hits in mem.search(np.stack([vector(i) for i in sorted(gone)]), 3):
                ghost.update(h.id for h in hits if h.id in gone)
    return lost, ghost, _disk_index_matches_store(folder)


def run_stress(folder: str | os.PathLike, rounds: int = 200, writers: int = 3, readers: int = 2,
               index: str = "flat", seed: int = 0, log=None) -> dict:
    """Run the stress test in `folder` (a new memory is made there); returns the counts (see the module doc)."""
    from racm3.retrieval.memory import Memory

    folder = Path(folder)
    initial = [f"init-{i}" for i in range(INITIAL)]
    with Memory.create(folder, ENCODER, DIM, index=index) as mem:
        mem.add(*documents(initial))
    ctx = mp.get_context("spawn")  # no fork of a process whose OpenMP threads (FAISS) may have run
    start, done, stop, out = ctx.Barrier(writers + 1), ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(folder), w, rounds, start, done, seed)) for w in range(writers)]
    procs += [ctx.Process(target=_reader, args=(str(folder), 3, stop, out, seed * 100 + r)) for r in range(readers)]
    for p in procs:
        p.start()
    expected, gone = set(initial), set()
    lost_ids: set[str] = set()  # documents lost (or ghosts) at any round, each counted once
    ghost_ids: set[str] = set()
    mismatches, errors = [], []
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            start.wait(timeout=300)  # the writers begin the round together; no write runs during the check
            for _ in range(writers):  # every writer's round acknowledged
                w, rr, added, removed, error = done.get(timeout=120)
                expected |= set(added)
                expected -= set(removed)
                gone |= set(removed)
                if error:
                    errors.append(error)
            lost, ghost, mismatch = _check(folder, expected, gone)
            lost_ids |= lost
            ghost_ids |= ghost
            if mismatch:
                mismatches.append(f"round {r}: {mismatch}")
            if log and (r + 1) % max(1, rounds // 10) == 0:
                log(f"round {r + 1}/{rounds}: {len(expected)} documents, lost {len(lost_ids)}, ghost {len(ghost_ids)}")
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        reader_stats = []
        for _ in range(readers):
            try:
                reader_stats.append(out.get(timeout=60))
            except queue.Empty:
                pass
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return {
        "rounds": rounds, "writers": writers, "readers": readers, "index": index,
        "documents_at_end": len(expected), "documents_added": len(expected) + len(gone) - INITIAL,
        "documents_removed": len(gone), "seconds": round(elapsed, 2),
        "lost": len(lost_ids), "ghost": len(ghost_ids), "lost_ids": sorted(lost_ids)[:10],
        "ghost_ids": sorted(ghost_ids)[:10], "disk_index_mismatches": mismatches[:10],
        "n_disk_index_mismatches": len(mismatches),
        "writer_errors": errors[:10], "n_writer_errors": len(errors),
        "reader_searches": sum(s["searches"] for s in reader_stats),
        "reader_hits": sum(s["hits"] for s in reader_stats),
        "reader_bad_hits": sum(s["bad_hits"] for s in reader_stats),
        "reader_errors": [e for s in reader_stats for e in s["errors"]][:10],
        "readers_reported": len(reader_stats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="racm3-stress-") as tmp:
        res = run_stress(Path(tmp) / "memory", args.rounds, args.writers, args.readers, args.index, args.seed,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    res["command"] = "python benchmarks/memory_stress.py " + " ".join(sys.argv[1:])
    res["cpu_count"] = os.cpu_count()
    rows = [("rounds", res["rounds"]), ("writers / readers", f"{res['writers']} / {res['readers']}"),
            ("index", res["index"]), ("documents added / removed", f"{res['documents_added']} / "
                                                                   f"{res['documents_removed']}"),
            ("documents at the end", res["documents_at_end"]), ("seconds", res["seconds"]),
            ("lost", res["lost"]), ("ghost", res["ghost"]), ("disk index mismatches", res["n_disk_index_mismatches"]),
            ("writer errors", res["n_writer_errors"]), ("reader searches", res["reader_searches"]),
            ("reader bad hits / errors", f"{res['reader_bad_hits']} / {len(res['reader_errors'])}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    ok = res["lost"] == res["ghost"] == res["n_disk_index_mismatches"] == res["n_writer_errors"] == 0 \
        and res["reader_bad_hits"] == 0 and not res["reader_errors"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
