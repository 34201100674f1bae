"""ivf-ondisk: the folder memory's index whose IVF lists live in a file beside index.faiss, memory-mapped read-only.

Exact answers through re-scoring, the lists file's place and mapping, adds and removals seen after reopening and
after rewrites, SIGKILLs at each step of a rewrite, readers that write nothing, the CLI's --index ivf-ondisk."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from racm3.documents import Document
from racm3.retrieval.memory import (
    COMPACT,
    INDEX,
    INFO,
    LOCK,
    ONDISK,
    Memory,
    _check_new_memory,
)
from tests.memory_backends import write_cli_set

DIM = 32
ROOT = Path(__file__).resolve().parent.parent


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def text_docs(n: int, start: int = 0) -> list[Document]:
    return [Document(f"d{i}", (f"caption {i}",), {"n": i}) for i in range(start, start + n)]


def lists_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".ivfdata" in p.name)


def saved_lists(folder: Path) -> str:
    return json.loads((folder / INFO).read_text())["lists"]


def rows_in_lists(index) -> set[int]:
    """Every row the index's base lists hold (read through FAISS from the mapped file)."""
    lists = faiss.downcast_InvertedLists(index.base.invlists)
    rows = set()
    for j in range(lists.nlist):
        n = lists.list_size(j)
        if n:
            rows.update(faiss.rev_swig_ptr(lists.get_ids(j), n).tolist())
    return rows


def built(folder: Path, n: int = 3000, seed: int = 0) -> tuple[Memory, np.ndarray]:
    vecs = unit_vectors(n, seed)
    mem = Memory.create(folder, "enc-a", DIM, index=ONDISK)
    mem.add(text_docs(n), vecs)
    return mem, vecs


def self_found(mem: Memory) -> None:
    """Store and index agree: same count, and every document is its own nearest neighbour, found exactly."""
    assert mem.index.ntotal == len(mem)
    ids, _, vecs = mem.scan()
    hits = mem.search(vecs, 1)
    assert [h[0].id for h in hits] == ids
    np.testing.assert_allclose([h[0].score for h in hits], 1.0, atol=1e-5)


def test_search_returns_the_exact_neighbours_rescored_from_the_stored_vectors(tmp_path, monkeypatch):
    """Clustered vectors (as embeddings are; uniform noise has no lists worth probing): the top 10 by the stored
    vectors' exact cosine, which asking for ONDISK_RESCORE x k candidates finds where the index's 8-bit order
    alone misses some."""
    from racm3.retrieval import memory as M

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, DIM)).astype(np.float32)
    vecs = centres[rng.integers(0, 30, 3000)] + 0.5 * rng.normal(size=(3000, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM, index=ONDISK)
    mem.add(text_docs(3000), vecs)
    queries = vecs[rng.choice(3000, 100, replace=False)] + 0.1 * rng.normal(size=(100, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = queries @ vecs.T
    truth = np.argsort(-exact, axis=1)[:, :10]

    def found_and_recall() -> tuple[list[list], np.ndarray, float]:
        hits = mem.search(queries, 10)
        found = np.array([[int(h.id[1:]) for h in q] for q in hits])
        return hits, found, float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))

    hits, found, recall = found_and_recall()
    assert (found[:, 0] == truth[:, 0]).all() and recall >= 0.99, recall  # the nearest neighbour of every query
    # every score is the stored float32 vector's cosine, not the index's 8-bit estimate, which differs
    scores = np.array([[h.score for h in q] for q in hits])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, found, 1), atol=1e-6)
    approx, _ = mem.index.search(queries, 1)
    assert np.abs(approx[:, 0] - exact.max(axis=1)).max() > 1e-4
    monkeypatch.setattr(M, "ONDISK_RESCORE", 1)  # only k candidates: re-scoring then only reorders them
    assert found_and_recall()[2] < recall
    assert [h[0].id for h in mem.search(vecs[:20], 1)] == [f"d{i}" for i in range(20)]


def test_the_lists_live_in_a_file_beside_the_index_memory_mapped_read_only(tmp_path):
    folder = tmp_path / "m"
    built(folder)[0].close()
    [name] = lists_files(folder)
    assert saved_lists(folder) == name and name.startswith("index.") and name.endswith(".ivfdata")
    assert (folder / name).stat().st_size == 3000 * (DIM + 8)  # 8-bit codes + the row, compact
    assert (folder / INDEX).stat().st_size < (folder / name).stat().st_size  # centroids and list offsets only
    with Memory.open(folder) as mem:
        mem.search(unit_vectors(1, 5), 3)
        lists = faiss.downcast_InvertedLists(mem.index.base.invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
        assert Path(lists.filename) == folder / name
        maps = Path("/proc/self/maps")
        if maps.exists():  # the kernel's own list of this process's mappings
            assert str((folder / name).resolve()) in maps.read_text()
    # index.faiss names its lists file by its base name: a copied folder serves from its own copy
    shutil.copytree(folder, tmp_path / "moved")
    shutil.rmtree(folder)
    with Memory.open(tmp_path / "moved") as moved:
        assert moved._load_index(moved.generation)
        assert Path(moved.index.lists.filename) == tmp_path / "moved" / name
        self_found(moved)


def test_added_documents_are_found_after_reopening_and_after_a_rewrite(tmp_path):
    folder = tmp_path / "m"
    mem, _ = built(folder, 1000)
    [first] = lists_files(folder)
    stamp = (folder / first).stat().st_mtime_ns
    extra = unit_vectors(200, seed=9)
    mem.add(text_docs(5, start=1000), extra[:5])  # a small write: the store only (and the index in RAM)
    assert lists_files(folder) == [first] and (folder / first).stat().st_mtime_ns == stamp
    with Memory.open(folder) as again:
        assert [h[0].id for h in again.search(extra[:5], 1)] == [f"d{i}" for i in range(1000, 1005)]
        assert again.index.delta.ntotal == 5  # replayed from the store onto the saved lists
        self_found(again)
    mem.add(text_docs(195, start=1005), extra[5:])  # past COMPACT: a new lists file, the old one removed
    [second] = lists_files(folder)
    assert second != first and saved_lists(folder) == second
    with Memory.open(folder) as again:
        assert again.index.changes == 0 and rows_in_lists(again.index) == set(range(1, 1201))
        assert [h[0].id for h in again.search(extra, 1)] == [f"d{i}" for i in range(1000, 1200)]
        self_found(again)


def test_a_removed_document_is_never_returned_again(tmp_path):
    folder = tmp_path / "m"
    mem, vecs = built(folder, 1000)
    reader = Memory.open(folder)
    reader.search(vecs[:1], 1)  # loaded before the removals: it replays them
    gone = {"d7", "d500"}
    gone_rows = {row for row, _ in mem._rows_by_id(sorted(gone)).values()}
    mem.remove(sorted(gone))  # a small write: the lists file still holds their rows

    def never_returned(m: Memory) -> None:
        returned = {h.id for hs in m.search(vecs[[7, 500]], 50) for h in hs}
        assert not returned & gone and len(returned) >= 50
        assert not gone & {h[0].id for h in m.search(vecs, 1)}

    for m in (mem, reader, Memory.open(folder)):
        never_returned(m)
    assert gone_rows <= rows_in_lists(Memory.open(folder).index)
    mem.remove([f"d{i}" for i in range(100, 250)])  # past COMPACT: the rewritten lists leave every removed row out
    gone |= {f"d{i}" for i in range(100, 250)}
    fresh = Memory.open(folder)
    assert not gone_rows & rows_in_lists(fresh.index) and fresh.index.changes == 0 and len(fresh) == 848
    for m in (mem, reader, fresh):
        never_returned(m)
        self_found(m)
    mem.rebuild_index()  # retrained from the store
    for m in (mem, reader, Memory.open(folder)):
        never_returned(m)
    # an update replaces the vector: the old one is found no more
    mem.update([Document("d3", ("new",), {})], vecs[7:8])
    assert Memory.open(folder).search(vecs[3:4], 1)[0][0].id != "d3"
    assert Memory.open(folder).search(vecs[7:8], 1)[0][0].id == "d3"


def test_a_build_in_parts_spilled_to_files_writes_the_same_lists(tmp_path, monkeypatch):
    """The build keeps at most ONDISK_PART_BYTES of lists in RAM, spilling full parts to temporary files: with
    parts of ~300 rows, the same lists file byte for byte as one part gives, and no part file left."""
    from racm3.retrieval import memory as M
    from racm3.retrieval import ondisk as O

    folder = tmp_path / "m"
    mem, _ = built(folder, 3000)
    mem.rebuild_index()
    whole = (folder / saved_lists(folder)).read_bytes()
    sources = []
    real = O.write_lists

    def write_lists(template, parts, path, removed=None):
        sources.append(len(parts))
        assert all(".part" in n for n in lists_files(folder) if n != saved_lists(folder))  # only parts, spilled
        return real(template, parts, path, removed)

    monkeypatch.setattr(O, "write_lists", write_lists)
    monkeypatch.setattr(O, "ONDISK_PART_BYTES", 300 * (DIM + 8))
    monkeypatch.setattr(M, "STREAM_ROWS", 100)
    mem.rebuild_index()
    assert sources == [10] and lists_files(folder) == [saved_lists(folder)]
    assert (folder / saved_lists(folder)).read_bytes() == whole
    self_found(Memory.open(folder))


KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from racm3.retrieval import memory as M
    from racm3.retrieval import ondisk as O
    from tests.test_memory_ondisk import text_docs, unit_vectors

    op, point, folder = sys.argv[1:4]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(owner, name):
        real = getattr(owner, name)
        def wrapped(*a, **k):
            out = real(*a, **k)
            die()
        setattr(owner, name, wrapped)

    if point == "lists-unsynced":  # the new lists file written, not yet fsynced
        real_fsync = os.fsync
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".ivfdata"):
                die()
            return real_fsync(fd)
        M.os.fsync = fsync
    elif point == "lists-written":  # the new lists file complete and fsynced, no index.faiss names it
        after(O, "write_lists")
    elif point == "index-tmp":  # index.faiss.tmp naming the new lists written, not renamed
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(M.INDEX):
                die()
            return real_replace(src, dst)
        M.os.replace = replace
    elif point == "index-renamed":  # the new index.faiss in place, memory.json still the old one's
        real_atomic = M._atomic_write
        def atomic(path, text):
            if path.name == M.INFO:
                die()
            return real_atomic(path, text)
        M._atomic_write = atomic
    elif point == "saved":  # the new pair and memory.json in place, the old lists file not yet removed
        import json
        real_remove, first = O.remove_stale_lists, json.load(open(f"{folder}/{M.INFO}"))["lists"]
        O.remove_stale_lists = lambda path, keep: die() if keep != first else real_remove(path, keep)

    mem = M.Memory.open(folder)
    if op == "add":
        mem.add(text_docs(200, start=1000), unit_vectors(200, seed=9))
    else:
        mem.remove([f"d{i}" for i in range(0, 400, 2)])
    print("not killed", flush=True)
""")


@pytest.mark.parametrize("op", ["add", "remove"])
@pytest.mark.parametrize("point", ["lists-unsynced", "lists-written", "index-tmp", "index-renamed", "saved"])
def test_a_writer_killed_while_rewriting_leaves_a_memory_that_answers(tmp_path, op, point):
    """A write large enough to rewrite the index, SIGKILLed at each step of saving the new lists file and
    index.faiss: the store has the write, the memory opens and answers from it (the old pair and the store's
    changes, the new pair, or an index built in RAM), removed documents are never returned, and the next write
    leaves exactly one lists file, the one index.faiss names."""
    folder = tmp_path / "m"
    mem, vecs = built(folder, 1000)
    mem.close()
    [old] = lists_files(folder)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, op, point, str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout, proc.stderr)
    names = lists_files(folder)
    assert old in names and len(names) == 2  # the old file stays until the new pair is saved; the new one is there
    mem = Memory.open(folder, wait=0)  # the killed writer's lock went with it
    expected = 1200 if op == "add" else 800
    assert len(mem) == expected
    self_found(mem)
    if op == "remove":
        assert not {h[0].id for h in mem.search(vecs[0:400:2], 1)} & {f"d{i}" for i in range(0, 400, 2)}
    loaded = mem._load_index(mem.generation)
    assert loaded == (point in ("lists-unsynced", "lists-written", "index-tmp", "saved"))  # else a mismatched pair
    mem.add(text_docs(1, start=5000), unit_vectors(1, seed=77))
    again = Memory.open(folder)
    assert again._load_index(again.generation) and lists_files(folder) == [saved_lists(folder)]
    self_found(again)


def test_readers_write_no_file_and_small_writes_leave_the_lists_file(tmp_path):
    folder = tmp_path / "m"
    mem, vecs = built(folder, 1000)

    def snapshot() -> dict[str, tuple[int, int, bytes]]:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())
                if not p.name.endswith(("-wal", "-shm"))}

    before = snapshot()
    reader = Memory.open(folder)
    reader.search(vecs[:50], 10)
    reader.candidates(vecs[:3], 5, exclude_ids=[{"d0"}, (), ()])
    assert snapshot() == before
    mem.add(text_docs(3, start=1000), unit_vectors(3, seed=4))  # below COMPACT: the store alone changes
    mem.remove(["d1"])
    after_writes = snapshot()
    assert {n: v for n, v in after_writes.items() if n not in ("store.sqlite", LOCK)} == \
        {n: v for n, v in before.items() if n not in ("store.sqlite", LOCK)}  # the writer's own files aside
    assert reader.search(unit_vectors(3, seed=4), 1)[0][0].id == "d1000"
    assert "d1" not in {h.id for h in reader.search(vecs[1:2], 10)[0]}
    Memory.open(folder).search(vecs[:5], 3)
    assert snapshot() == after_writes
    assert reader.index.lists.read_only


def test_a_long_lived_reader_moves_to_the_lists_file_a_writer_saved(tmp_path):
    folder = tmp_path / "m"
    mem, _ = built(folder, 1000)
    reader = Memory.open(folder)
    first = reader.index.lists.filename
    extra = unit_vectors(600, seed=3)
    for s in range(0, 600, 50):
        mem.add(text_docs(50, start=1000 + s), extra[s:s + 50])
        reader.search(extra[s:s + 1], 1)
    # it left the first lists file for a newer one (it lags the writer's by at most COMPACT of changes)
    assert reader.index.lists.filename != first and first not in lists_files(folder)
    assert reader.index.changes <= COMPACT * reader.index.base.ntotal + 50  # (checked before each replay)
    self_found(reader)


def test_stress_writers_and_readers_small(tmp_path, monkeypatch):
    """benchmarks/memory_stress.py's processes on an ivf-ondisk memory: 3 writers adding and removing, 2 readers
    searching, 8 rounds: nothing lost, no ghost, the index on disk the store's. (Its checker reads index.faiss with
    FAISS's own reader, which maps the lists file by the base name index.faiss holds: from the memory folder.)"""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # also for the spawned processes, which import it
    monkeypatch.chdir(tmp_path)
    from memory_stress import run_stress

    res = run_stress(tmp_path, rounds=8, writers=3, readers=2, index=ONDISK)
    assert res["lost"] == 0 and res["ghost"] == 0, res
    assert res["n_disk_index_mismatches"] == 0 and res["n_writer_errors"] == 0, res
    assert res["readers_reported"] == 2 and res["reader_searches"] > 0 and res["reader_hits"] > 0, res
    assert res["reader_bad_hits"] == 0 and res["reader_errors"] == [], res
    with Memory.open(tmp_path) as mem:
        assert len(mem) == res["documents_at_end"] and mem._load_index(mem.generation)
        assert lists_files(tmp_path) == [saved_lists(tmp_path)]


def test_a_damaged_lists_file_is_not_trusted(tmp_path):
    folder = tmp_path / "m"
    mem, _ = built(folder, 1000)
    mem.close()
    lists = folder / saved_lists(folder)
    with open(lists, "r+b") as f:
        f.truncate(lists.stat().st_size // 2)
    reader = Memory.open(folder)  # no writer: built in the reader's own RAM
    assert reader.index.lists is None and not reader._load_index(reader.generation)
    self_found(reader)
    writer = Memory.open(folder)
    writer.add(text_docs(1, start=1000), unit_vectors(1, seed=8))  # the next write saves a new pair
    assert lists_files(folder) == [saved_lists(folder)] and saved_lists(folder) != lists.name
    again = Memory.open(folder)
    assert again._load_index(again.generation) and again.index.lists is not None
    self_found(again)


def test_an_empty_memory_and_one_emptied_need_no_lists_file(tmp_path):
    folder = tmp_path / "m"
    mem = Memory.create(folder, "enc-a", DIM, index=ONDISK)
    assert lists_files(folder) == [] and Memory.open(folder).search(unit_vectors(1), 3) == [[]]
    vecs = unit_vectors(100)
    mem.add(text_docs(100), vecs)
    assert len(lists_files(folder)) == 1
    mem.remove([f"d{i}" for i in range(100)])
    assert lists_files(folder) == [] and json.loads((folder / INFO).read_text())["lists"] is None
    again = Memory.open(folder)
    assert again._load_index(again.generation) and again.search(vecs[:1], 3) == [[]]
    mem.add(text_docs(10, start=100), vecs[:10])
    self_found(Memory.open(folder))


def test_milvus_memories_refuse_it_before_connecting():
    with pytest.raises(ValueError, match="folder memory's only"):
        _check_new_memory("enc-a", DIM, ONDISK)  # as MilvusMemory.create calls it, before any connection
    _check_new_memory("enc-a", DIM, ONDISK, kinds=("flat", ONDISK))


def test_memory_cli_builds_and_searches_an_ivf_ondisk_memory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from racm3.cli import app

    write_cli_set(tmp_path)
    monkeypatch.setenv("RACM3_CACHE", str(tmp_path / "cache"))  # the hits' images go to $RACM3_CACHE/hits
    run = CliRunner().invoke
    mem = tmp_path / "mem"
    r = run(app, ["memory", "build", str(tmp_path / "data"), str(mem), "--encoder", str(tmp_path / "enc"),
                  "--index", "ivf-ondisk"])
    assert r.exit_code == 0, r.output
    assert "ivf-ondisk index" in r.stderr
    assert lists_files(mem) == [saved_lists(mem)]
    r = run(app, ["memory", "info", str(mem), "--json"])
    assert json.loads(r.stdout)["index"] == "ivf-ondisk"
    r = run(app, ["memory", "search", str(mem), "--text", "pizza", "-k", "2", "--json", "--encoder",
                  str(tmp_path / "enc")])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)  # nothing else on stdout
    assert hits[0]["text"] == "pizza" and len(hits) == 2
    r = run(app, ["memory", "build", str(tmp_path / "data"), str(mem), "--encoder", str(tmp_path / "enc"),
                  "--index", "flat"])
    assert r.exit_code == 1 and "already holds a ivf-ondisk index" in r.output
