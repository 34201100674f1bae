"""One writer at a time, enforced; readers never write; the stress test of writers and readers, at a small size."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from racm3.retrieval.memory import INFO, LOCK, Memory, MemoryBusy
from test_memory import DIM, consistent, make_docs

ROOT = Path(__file__).resolve().parent.parent


class HeldLock:
    """Another writer, as the OS sees it: an exclusive flock on the memory's write.lock from another descriptor."""

    def __init__(self, folder: Path):
        self.fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.pwrite(self.fd, b"4242\n", 0)

    def release(self) -> None:
        os.close(self.fd)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file of the folder but SQLite's own -wal/-shm, with its size, mtime and bytes."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())
            if not p.name.endswith(("-wal", "-shm"))}


def test_second_writer_fails_at_once_with_wait_0_and_writes_nothing(tmp_path):
    docs, vecs = make_docs(6)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs[:3], vecs[:3])
    other = HeldLock(tmp_path / "m")
    try:
        busy = Memory.open(tmp_path / "m", wait=0)
        t0 = time.monotonic()
        for write in (lambda: busy.add(docs[3:], vecs[3:]), lambda: busy.remove(["d0"]),
                      lambda: busy.update(docs[:1], vecs[1:2]), busy.rebuild_index):
            with pytest.raises(MemoryBusy) as exc:
                write()
            message = str(exc.value)
            assert str(tmp_path / "m") in message and "pid 4242" in message and "--wait" in message
            assert "\n" not in message
        assert time.monotonic() - t0 < 1.0  # wait=0: no waiting at all
        assert len(busy) == 3 and busy.generation == 1 and "d3" not in busy and "d0" in busy
    finally:
        other.release()
    busy.add(docs[3:], vecs[3:])  # free again
    assert len(Memory.open(tmp_path / "m")) == 6


def test_second_writer_waits_says_so_then_writes(tmp_path, capsys):
    docs, vecs = make_docs(4)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    other = HeldLock(tmp_path / "m")
    threading.Timer(0.8, other.release).start()
    t0 = time.monotonic()
    mem.wait = 10
    mem.add(docs, vecs)
    assert 0.7 < time.monotonic() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "m") in err[0] and "waiting up to 10 s" in err[0]
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 4
        consistent(again)


def test_second_writer_gives_up_after_its_wait(tmp_path):
    mem = Memory.create(tmp_path / "m", "enc-a", DIM, wait=0.3)
    docs, vecs = make_docs(2)
    other = HeldLock(tmp_path / "m")
    try:
        t0 = time.monotonic()
        with pytest.raises(MemoryBusy, match="did not finish within 0.3 s"):
            mem.add(docs, vecs)
        assert 0.3 <= time.monotonic() - t0 < 2
    finally:
        other.release()
    assert len(mem) == 0


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_writer_rereads_the_store_after_taking_the_lock(tmp_path, index):
    """Issue 13, item 1: A opened, B added X, A removed Y with the index it had loaded: X was lost from the index."""
    docs, vecs = make_docs(30)
    Memory.create(tmp_path / "m", "enc-a", DIM, index=index).add(docs[:20], vecs[:20])
    a, b = Memory.open(tmp_path / "m"), Memory.open(tmp_path / "m")
    b.add(docs[20:], vecs[20:])  # X: d20..d29
    a.remove(["d3"])  # Y, written by the process whose loaded index lacks X
    a.add(docs[3:4], vecs[3:4])  # and back again, by the same stale-at-open process
    b.remove(["d25"])
    for mem in (a, b, Memory.open(tmp_path / "m")):
        assert "d25" not in {h.id for h in mem.search(vecs[25:26], 30)[0]}  # a search catches up with B's remove
        assert len(mem) == 29 and mem.index.ntotal == 29
        consistent(mem)  # every document, d20..d29 and d3 included, is its own nearest neighbour
        assert "d25" not in {h.id for hs in mem.search(vecs, 30) for h in hs}
    fresh = Memory.open(tmp_path / "m")
    assert fresh._load_index(fresh.generation)  # the index on disk is the store's, not rebuilt in RAM


def test_readers_never_write_and_see_new_writes(tmp_path, monkeypatch):
    docs, vecs = make_docs(20)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs[:10], vecs[:10])
    # a writer killed after its store commit, before its index write: the index on disk is one generation behind
    monkeypatch.setattr(Memory, "_write_index", lambda self: None)
    mem.add(docs[10:15], vecs[10:15])
    monkeypatch.undo()
    (tmp_path / "m" / LOCK).unlink()  # and a reader must not create the lock file either
    before = snapshot(tmp_path / "m")
    reader = Memory.open(tmp_path / "m")
    assert len(reader) == 15 and reader.index.ntotal == 15  # rebuilt in its own RAM
    consistent(reader)
    assert snapshot(tmp_path / "m") == before  # index.faiss, memory.json, store: not a byte changed
    # another process writes: the open reader's next search sees it, and still writes nothing
    writer = Memory.open(tmp_path / "m")
    writer.add(docs[15:], vecs[15:])
    writer.remove(["d0"])
    after_write = snapshot(tmp_path / "m")
    hits = reader.search(vecs[[17, 0]], 1)
    assert hits[0][0].id == "d17" and hits[1][0].id != "d0"
    consistent(reader)
    assert snapshot(tmp_path / "m") == after_write
    assert reader._load_index(reader.generation)  # the writer saved the index for the store's generation


def test_an_index_file_another_writer_replaced_is_not_trusted(tmp_path):
    """memory.json names the generation and checksum of its index.faiss: a reader that reads memory.json, then
    an index.faiss a later writer saved, must notice (the generation alone would not tell)."""
    docs, vecs = make_docs(12)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs[:10], vecs[:10])
    info = (tmp_path / "m" / INFO).read_text()
    mem.remove(["d1"])
    mem.add(docs[10:11], vecs[10:11])  # same count as before, other rows
    mem.rebuild_index()  # a writer saves index.faiss
    (tmp_path / "m" / INFO).write_text(info.replace('"generation": 1', f'"generation": {mem.generation}'))
    reader = Memory.open(tmp_path / "m")
    assert not reader._load_index(reader.generation)
    consistent(reader)  # built in RAM instead: d10 found, d1 gone
    assert reader.search(vecs[10:11], 1)[0][0].id == "d10"
    assert "d1" not in {h.id for h in reader.search(vecs[1:2], 10)[0]}


def test_create_is_all_or_nothing_and_two_creators_share_one_memory(tmp_path):
    from racm3.retrieval.memory import STORE

    a = Memory.open_or_create(tmp_path / "m", "enc-a", DIM)
    b = Memory.open_or_create(tmp_path / "m", "enc-a", DIM)  # finds the first one's memory
    docs, vecs = make_docs(4)
    a.add(docs[:2], vecs[:2])
    b.add(docs[2:], vecs[2:])
    assert len(Memory.open(tmp_path / "m")) == 4
    assert not (tmp_path / "m" / (STORE + ".tmp")).exists()


def test_stress_writers_and_readers_small(tmp_path, monkeypatch):
    """The benchmark's stress test at a small size: 3 writer and 2 reader processes, 8 rounds."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # also for the spawned processes, which import it
    from memory_stress import run_stress

    res = run_stress(tmp_path / "m", rounds=8, writers=3, readers=2)
    assert res["lost"] == 0 and res["ghost"] == 0, res
    assert res["n_disk_index_mismatches"] == 0 and res["n_writer_errors"] == 0, res
    assert res["readers_reported"] == 2 and res["reader_searches"] > 0 and res["reader_hits"] > 0, res
    assert res["reader_bad_hits"] == 0 and res["reader_errors"] == [], res
    assert res["documents_added"] >= 8 * 3 and res["documents_removed"] > 0
    with Memory.open(tmp_path / "m") as mem:
        assert len(mem) == res["documents_at_end"]
        assert mem.index.ntotal == len(mem) and mem._load_index(mem.generation)
