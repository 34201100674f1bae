"""Memory: round trips, remove/update, encoder identity, index rebuilds, SIGKILLs at every writer's steps, the CLI.

The tests of behaviour every backend shares run on each (memory_backends.py: the folder memory, and Milvus Lite
where it is installed); the rest are the folder memory's own (its files, its lock, its kill points)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import faiss
import numpy as np
import pytest
from PIL import Image

from racm3.documents import Document
from racm3.retrieval.backends import open_memory, open_or_create_memory
from racm3.retrieval.memory import (
    INDEX,
    INFO,
    EncoderMismatch,
    Memory,
    MemoryFolderError,
)
from tests.memory_backends import (
    BACKENDS,
    backends_and_indexes,
    loads_images,
    location,
    write_cli_set,
)

DIM = 8


def make_docs(n: int, start: int = 0, seed: int = 0) -> tuple[list[Document], np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(start, start + n):
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        segs = (img, f"caption {i}") if i % 3 else (f"caption {i}",)  # every third text-only
        docs.append(Document(f"d{i}", segs, {"split": "train", "n": i}))
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    return docs, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def consistent(mem: Memory) -> None:
    """Store and index agree: same count, same rows, and every document is its own nearest neighbour."""
    if isinstance(mem, Memory):  # a Milvus collection is both
        assert mem.index.ntotal == len(mem)
    ids, _, vecs = mem.scan()
    if ids:
        hits = mem.search(vecs, 1)
        assert [h[0].id for h in hits] == ids


@pytest.mark.parametrize("backend, index", backends_and_indexes())
def test_add_search_get_round_trip(tmp_path, memories, backend, index):
    docs, vecs = make_docs(60)
    mem = memories.new(backend, tmp_path, "enc-a", DIM, index=index)
    mem.add(docs[:30], vecs[:30])
    mem.add(docs[30:], vecs[30:])
    assert len(mem) == 60 and mem.ids() == [d.id for d in docs]
    hits = mem.search(vecs[[5, 7]], 3)
    assert [h[0].id for h in hits] == ["d5", "d7"] and hits[0][0].rank == 0
    if index != "ivfpq":  # PQ scores are approximate
        assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    got = mem.get(["d7", "d3"])
    assert got[0].text == "caption 7" and got[1].image is None
    np.testing.assert_array_equal(np.asarray(got[0].image), np.asarray(docs[7].image))  # PNG is lossless
    assert got[0].meta == {"split": "train", "n": 7}
    np.testing.assert_allclose(mem.vectors(["d9"])[0], vecs[9])
    mem.close()
    with memories.reopen(mem) as again:  # persisted (a folder's index loaded without a rebuild)
        assert again.info() == {"count": 60, "encoder": "enc-a", "dim": DIM, "index": index}
        if backend == "folder":
            assert json.loads((tmp_path / "m" / INFO).read_text())["count"] == 60
        consistent(again)


@pytest.mark.parametrize("backend, index", backends_and_indexes())
def test_removed_documents_are_never_returned(tmp_path, memories, backend, index):
    docs, vecs = make_docs(40)
    mem = memories.new(backend, tmp_path, "enc-a", DIM, index=index)
    mem.add(docs, vecs)
    mem.remove(["d3", "d10"])
    returned = {h.id for hs in mem.search(vecs, 40) for h in hs}
    assert "d3" not in returned and "d10" not in returned and len(mem) == 38
    assert "d3" not in memories.reopen(mem) and "d3" not in mem.ids()
    with pytest.raises(KeyError, match="d3"):
        mem.get(["d3"])
    consistent(memories.reopen(mem))


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq", "ivf-ondisk"])
def test_small_writes_leave_the_index_file_and_every_reader_replays_them(tmp_path, index):
    """A write of fewer changes than COMPACT of the saved index touches only the store (and the index in RAM);
    readers, open or new, bring the saved index up to date from the store; more changes rewrite it."""
    docs, vecs = make_docs(112)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM, index=index)
    mem.add(docs[:100], vecs[:100])
    reader = Memory.open(tmp_path / "m")
    saved = ((tmp_path / "m" / INDEX).read_bytes(), (tmp_path / "m" / INFO).read_text())
    mem.add(docs[100:101], vecs[100:101])
    if index != "hnsw":  # an HNSW graph cannot delete: a removal rebuilds it and saves it
        mem.remove(["d7"])
    assert ((tmp_path / "m" / INDEX).read_bytes(), (tmp_path / "m" / INFO).read_text()) == saved
    for m in (reader, Memory.open(tmp_path / "m")):
        assert m.search(vecs[100:101], 1)[0][0].id == "d100"
        assert "d7" not in {h.id for h in m.search(vecs[7:8], 5)[0]} or index == "hnsw"
        consistent(m)
        assert m._load_index(m.generation)  # the saved file plus the store's changes since
    mem.add(docs[101:], vecs[101:])  # 12 or 13 changes since the file was saved: more than a tenth of its 100
    assert json.loads((tmp_path / "m" / INFO).read_text())["generation"] == mem.generation
    assert reader.search(vecs[111:112], 1)[0][0].id == "d111"
    consistent(reader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_leaves_out_exclude_ids_and_still_returns_k(tmp_path, memories, backend):
    docs, vecs = make_docs(30)
    mem = memories.new(backend, tmp_path, "enc-a", DIM)
    mem.add(docs, vecs)
    hits = mem.search(vecs[[4, 5]], 3, exclude_ids=[{"d4", "d9"}, ()])
    assert "d4" not in [h.id for h in hits[0]] and len(hits[0]) == 3 and hits[1][0].id == "d5"
    every = {f"d{i}" for i in range(30)}
    assert mem.search(vecs[:1], 3, exclude_ids=[every - {"d17"}])[0][0].id == "d17"
    with pytest.raises(ValueError, match="exclude_ids has 1 entries for 2 queries"):
        mem.search(vecs[:2], 3, exclude_ids=[()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_candidates_read_no_image_and_documents_decode_only_the_rows_asked(tmp_path, memories, backend, monkeypatch):
    docs, vecs = make_docs(30)
    mem = memories.new(backend, tmp_path, "enc-a", DIM)
    mem.add(docs, vecs)
    M = loads_images(mem)
    decoded = []
    real = M.load_image
    monkeypatch.setattr(M, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    (c,) = mem.candidates(vecs[1:2], 20)
    assert decoded == [] and c.ids[0] == "d1" and c.vectors.shape == (20, DIM)
    assert list(c.multimodal) == [int(i[1:]) % 3 != 0 for i in c.ids]  # every third document is text-only
    np.testing.assert_allclose(c.scores, c.vectors @ vecs[1], rtol=1e-6)
    assert list(c.scores) == sorted(c.scores, reverse=True)
    got = mem.documents(c.rows[:2])
    assert len(decoded) == sum(c.multimodal[:2]) and got[c.rows[0]].id == "d1"  # one image per image document


def test_a_memory_from_before_the_removal_log_opens_and_its_next_write_upgrades_it(tmp_path):
    """No removed table, a memory.json that does not name the rows its index holds: read as before (the saved
    index only for its own generation); the next write adds the table and saves an index that names them."""
    docs, vecs = make_docs(40)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs[:30], vecs[:30])
    mem.close()
    conn = sqlite3.connect(str(tmp_path / "m" / "store.sqlite"))
    conn.execute("DROP TABLE removed")
    conn.commit()
    conn.close()
    info = json.loads((tmp_path / "m" / INFO).read_text())
    del info["rows_through"]
    (tmp_path / "m" / INFO).write_text(json.dumps(info))
    old = Memory.open(tmp_path / "m")
    assert old._load_index(old.generation)
    consistent(old)
    writer = Memory.open(tmp_path / "m")
    writer.remove(["d3"])
    assert "rows_through" in json.loads((tmp_path / "m" / INFO).read_text())
    writer.add(docs[30:31], vecs[30:31])
    for m in (old, Memory.open(tmp_path / "m")):
        assert "d3" not in {h.id for h in m.search(vecs[3:4], 5)[0]}
        consistent(m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_unknown_id_names_it_and_changes_nothing(tmp_path, memories, backend):
    docs, vecs = make_docs(5)
    mem = memories.new(backend, tmp_path, "enc-a", DIM)
    mem.add(docs, vecs)
    gen = mem.generation
    with pytest.raises(KeyError, match="nope"):
        mem.remove(["d1", "nope"])
    assert len(mem) == 5 and "d1" in mem and mem.generation == gen


@pytest.mark.parametrize("backend, index", backends_and_indexes())
def test_add_existing_id_refused_and_update_replaces(tmp_path, memories, backend, index):
    docs, vecs = make_docs(5)
    mem = memories.new(backend, tmp_path, "enc-a", DIM, index=index)
    mem.add(docs, vecs)
    with pytest.raises(KeyError, match="d2"):
        mem.add(docs[2:3], vecs[2:3])
    new = Document("d2", ("a new caption",), {})
    fresh = np.full((1, DIM), DIM ** -0.5, np.float32)
    mem.update([new], fresh)
    assert mem.get(["d2"])[0].text == "a new caption" and len(mem) == 5
    hit = mem.search(fresh, 1)[0][0]
    assert hit.id == "d2" and hit.document.text == "a new caption" and hit.score == pytest.approx(1.0, abs=1e-5)
    assert [h.id for h in mem.search(fresh, 5)[0]].count("d2") == 1  # indexed once, in every index type
    consistent(mem)


def test_ivfpq_retrains_as_the_memory_grows(tmp_path):
    import faiss

    mem = Memory.create(tmp_path / "m", "enc-a", DIM, index="ivfpq")
    docs, vecs = make_docs(400)
    mem.add(docs[:5], vecs[:5])
    first = faiss.extract_index_ivf(mem.index).nlist
    for s in range(5, 400, 50):  # batches, as add_documents writes them
        mem.add(docs[s:s + 50], vecs[s:s + 50])
    assert faiss.extract_index_ivf(mem.index).nlist > first  # retrained for the larger memory
    assert mem.search(vecs[123:124], 1)[0][0].id == docs[123].id
    consistent(mem)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_documents_checks_every_id_before_writing(tmp_path, memories, backend):
    docs, vecs = make_docs(6)

    class Fixed:  # an encoder that returns the prepared vectors
        name, dim = "enc-a", DIM

        def embed_documents(self, ds):
            return vecs[[int(d.id[1:]) for d in ds]]

    mem = memories.new(backend, tmp_path, "enc-a", DIM)
    mem.add(docs[5:6], vecs[5:6])
    with pytest.raises(KeyError, match="d5"):
        mem.add_documents(docs, Fixed(), batch_size=2)  # d5 sits in the last batch
    assert len(mem) == 1  # the first batches were not written


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_encoder_is_refused_naming_both(tmp_path, memories, backend):
    docs, vecs = make_docs(3)
    mem = memories.new(backend, tmp_path, "enc-a", DIM)
    mem.add(docs, vecs)
    with pytest.raises(EncoderMismatch, match="enc-a.*enc-b"):
        mem.search(vecs, 1, encoder_name="enc-b")
    with pytest.raises(EncoderMismatch, match="enc-a.*enc-b"):  # reopened for another encoder's documents
        open_or_create_memory(mem.path, "enc-b", DIM)
    with pytest.raises(ValueError, match="dimension"):
        mem.search(np.ones((1, DIM + 1), np.float32), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_missing_memory_and_create_twice(tmp_path, memories, backend):
    missing = location(backend, tmp_path, "none")
    with pytest.raises(MemoryFolderError, match="racm3 memory build"):
        open_memory(missing)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.db").exists()  # opening creates nothing
    mem = memories.new(backend, tmp_path, "enc-a", DIM)
    with pytest.raises(MemoryFolderError, match="already exists"):
        type(mem).create(mem.path, "enc-a", DIM)


def test_lost_or_stale_index_is_rebuilt_from_store(tmp_path):
    docs, vecs = make_docs(20)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs[:10], vecs[:10])
    stale = faiss.read_index(str(tmp_path / "m" / INDEX))
    info = (tmp_path / "m" / INFO).read_text()
    mem.add(docs[10:], vecs[10:])
    # a crash after the store commit but before the index write: the old index and memory.json remain
    faiss.write_index(stale, str(tmp_path / "m" / INDEX))
    (tmp_path / "m" / INFO).write_text(info)
    again = Memory.open(tmp_path / "m")
    assert len(again) == 20
    consistent(again)
    os.remove(tmp_path / "m" / INDEX)
    consistent(Memory.open(tmp_path / "m"))


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from racm3.retrieval.memory import Memory
    from tests.test_memory import make_docs
    folder, batch, attempt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mem = Memory.open(folder)
    for b in range(1000):
        docs, vecs = make_docs(batch, start=100000 * (attempt + 1) + b * batch, seed=1000 * attempt + b)
        mem.add(docs, vecs)
        print(b, flush=True)
""")


@pytest.mark.parametrize("batch", [20, 1])  # 20: most adds save the index file; 1: most change the store alone
def test_sigkill_during_adds_leaves_a_consistent_memory(tmp_path, batch):
    docs, vecs = make_docs(50)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs, vecs)
    mem.close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = np.random.default_rng(0)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "m"), str(batch), str(attempt)],
                                cwd=root, stdout=subprocess.PIPE, text=True)
        for _ in range(3 + attempt):  # let it commit a few batches, then kill it at a random moment
            proc.stdout.readline()
        time.sleep(float(rng.uniform(0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        again = Memory.open(tmp_path / "m")
        assert len(again) >= 50 + batch * (3 + attempt) and (len(again) - 50) % batch == 0  # whole batches only
        consistent(again)
        assert again.get(["d0"])[0].text == "caption 0"
        again.close()


KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from racm3.retrieval import memory as M
    from racm3.retrieval.memory import INDEX, Memory
    from tests.test_memory import DIM, make_docs

    op, point, folder = sys.argv[1:4]
    armed = False

    def die_if_armed():
        if armed:
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(name, before=True, when=lambda *a: True):
        owner = M.Memory if hasattr(M.Memory, name) else M
        real = getattr(owner, name)
        def wrapped(*a, **k):
            if before and when(*a):
                die_if_armed()
            out = real(*a, **k)
            if not before and when(*a):
                die_if_armed()
            return out
        setattr(owner, name, wrapped)

    if point == "create":  # the store complete under its temporary name, not yet renamed into place
        hook("_fsync_path", before=False, when=lambda path: path.name.endswith(".tmp"))
    elif point == "in-transaction":  # rows inserted or deleted, generation bumped, not committed
        hook("_bump_generation")
    elif point == "after-commit":  # the store committed, the index not yet written
        hook("_write_index")
    elif point == "index-tmp":  # index.faiss.tmp written and fsynced, not renamed
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(INDEX):
                die_if_armed()
            return real_replace(src, dst)
        M.os.replace = replace
    elif point == "index-renamed":  # index.faiss in place, memory.json still the last write's
        hook("_atomic_write")
    elif point == "store-only":  # a write too small to save the index file: the store committed, nothing else
        hook("_saved_if_due")

    docs, vecs = make_docs(30, start=500, seed=7)

    class Fixed:
        name, dim = "enc-a", DIM
        def embed_documents(self, ds):
            return vecs[[int(d.id[1:]) - 500 for d in ds]]

    if op == "build":
        armed = point == "create"
        mem = Memory.open_or_create(folder, "enc-a", DIM)
        armed = True
        mem.add_documents(docs, Fixed(), batch_size=8)
    elif op in ("add", "add-one"):
        n = 30 if op == "add" else 1
        mem = Memory.open(folder)
        armed = True
        mem.add(docs[:n], vecs[:n])
    else:
        mem = Memory.open(folder)
        armed = True
        mem.remove([f"d{i}" for i in (range(0, 20, 2) if op == "remove" else [0])])
    print("not killed", flush=True)
""")

KILL_POINTS = ["in-transaction", "after-commit", "index-tmp", "index-renamed"]


@pytest.mark.parametrize("op, point", [("build", p) for p in ["create", *KILL_POINTS]]
                         + [(op, p) for op in ("add", "remove") for p in KILL_POINTS]
                         + [(op, p) for op in ("add-one", "remove-one") for p in ("in-transaction", "store-only")])
def test_sigkill_at_each_point_of_every_writer_leaves_all_or_nothing(tmp_path, op, point):
    """memory build (create + add_documents), add and remove (of enough documents to save the index file, and of
    one, which changes the store alone), SIGKILLed at each step of a write: the memory opens, consistent, with the
    whole write or none of it; the lock dies with the process; the next write brings the index on disk back in
    line with the store."""
    folder = tmp_path / "m"
    if op != "build":
        docs, vecs = make_docs(20)
        with Memory.create(folder, "enc-a", DIM) as mem:
            mem.add(docs, vecs)
    before = set(Memory.open(folder).ids()) if op != "build" else set()
    new_ids = {f"d{i}" for i in range(500, 530 if op != "add-one" else 501)}
    gone = {f"d{i}" for i in (range(0, 20, 2) if op == "remove" else [0])}
    after = before | new_ids if op in ("build", "add", "add-one") else before - gone
    saved = (folder / INDEX).read_bytes() if op != "build" else None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", KILL_AT, op, point, str(folder)], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout, proc.stderr)
    if point == "create":
        with pytest.raises(MemoryFolderError, match="no memory here"):
            Memory.open(folder)
        docs, vecs = make_docs(3)
        Memory.open_or_create(folder, "enc-a", DIM).add(docs, vecs)  # the leftovers do not block a new build
        after = {"d0", "d1", "d2"}
    mem = Memory.open(folder, wait=0)  # the killed writer's lock went with it
    expected = before if point == "in-transaction" else after
    assert set(mem.ids()) == expected and len(mem) == len(expected)
    consistent(mem)
    if point == "store-only":
        assert (folder / INDEX).read_bytes() == saved  # the index file was never part of that write
    docs, vecs = make_docs(1, start=900)
    mem.add(docs, vecs)
    again = Memory.open(folder)
    assert again._load_index(again.generation) and again.index.ntotal == len(expected) + 1
    consistent(again)


# ---------------------------------------------------------------------------------------------
# The memory CLI, with a tiny untrained encoder saved to a folder
# ---------------------------------------------------------------------------------------------


def test_memory_cli_build_info_search_remove(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from racm3.cli import app
    from racm3.retrieval.encoder import EmojiEncoder, ImageTowerConfig

    enc_dir, _ = write_cli_set(tmp_path)
    monkeypatch.setenv("RACM3_CACHE", str(tmp_path / "cache"))  # the hits' images go to $RACM3_CACHE/hits
    run = CliRunner().invoke
    mem = str(tmp_path / "mem")
    r = run(app, ["memory", "build", str(tmp_path / "data"), mem, "--encoder", str(enc_dir)])
    assert r.exit_code == 0, r.output
    r = run(app, ["memory", "info", mem, "--json"])
    info = json.loads(r.stdout)
    assert info["count"] == 5 and info["dim"] == 384 and info["index"] == "flat" and info["encoder"].startswith("emoji")
    r = run(app, ["memory", "search", mem, "--text", "flag: France", "-k", "2", "--json", "--encoder", str(enc_dir)])
    hits = json.loads(r.stdout)
    assert hits[0]["text"] == "flag: France" and len(hits) == 2
    assert set(hits[0]) == {"id", "score", "text", "image"} and os.path.exists(hits[0]["image"])
    r = run(app, ["memory", "remove", mem, "e0"])
    assert r.exit_code == 0
    r = run(app, ["memory", "remove", mem, "e0"])
    assert r.exit_code == 1 and "e0" in r.output
    r = run(app, ["memory", "search", mem, "--text", "flag: France", "-k", "5", "--json", "--encoder", str(enc_dir)])
    assert "e0" not in {h["id"] for h in json.loads(r.stdout)}
    # another encoder (default: the shipped one, or a fresh tower) is refused with both names
    other = tmp_path / "other"
    EmojiEncoder.untrained(ImageTowerConfig(image_size=16, widths=(8, 16)), seed=5).save_pretrained(other)
    r = run(app, ["memory", "search", mem, "--text", "pizza", "--encoder", str(other)])
    assert r.exit_code == 1 and "built with encoder" in r.output


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """(run, encoder folder, dataset folder, a built memory to copy): the five-document CLI set-up above."""
    from typer.testing import CliRunner

    from racm3.cli import app

    root = tmp_path_factory.mktemp("cli")
    write_cli_set(root)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    r = run("memory", "build", root / "data", root / "mem", "--encoder", root / "enc")
    assert r.exit_code == 0, r.output
    return run, root / "enc", root / "data", root / "mem"


def one_line_error(r, *needles: str) -> str:
    """The command failed with exit 1 and one line on stderr holding every needle (no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_memory_cli_build_of_a_missing_dataset_fails_and_creates_nothing(cli, tmp_path):
    run, enc, _, _ = cli
    r = run("memory", "build", tmp_path / "no-such-data", tmp_path / "mem", "--encoder", enc)
    one_line_error(r, str(tmp_path / "no-such-data"))
    assert not (tmp_path / "mem").exists()


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_memory_cli_unreadable_store_is_one_line_naming_the_file_and_the_fix(cli, tmp_path, damage):
    import shutil

    from racm3.retrieval.memory import STORE

    run, enc, data, built = cli
    mem = tmp_path / "mem"
    shutil.copytree(built, mem)
    conn = sqlite3.connect(str(mem / STORE))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in store.sqlite itself, none in the -wal file
    conn.close()
    raw = (mem / STORE).read_bytes()
    (mem / STORE).write_bytes({"garbage": os.urandom(len(raw)), "empty": b"", "truncated": raw[:len(raw) // 2]}[damage])
    for args in (["info", mem], ["search", mem, "--text", "pizza", "--encoder", enc], ["remove", mem, "e1"],
                 ["add", mem, data, "--encoder", enc], ["build", data, mem, "--encoder", enc]):
        one_line_error(run("memory", *args), str(mem / STORE), "racm3 memory build")
    with pytest.raises(MemoryFolderError, match="not a readable memory store"):
        Memory.open(mem)


def test_memory_cli_duplicate_id_says_remove_then_add_and_adds_nothing(cli, tmp_path):
    import shutil

    run, enc, data, built = cli
    shutil.copytree(built, tmp_path / "mem")
    line = one_line_error(run("memory", "add", tmp_path / "mem", data, "--encoder", enc), "'e0'",
                          f"racm3 memory remove {tmp_path / 'mem'} ID")
    assert "update" not in line  # the CLI has no update command
    assert len(Memory.open(tmp_path / "mem")) == 5


def test_memory_cli_writers_wait_or_fail_at_once(cli, tmp_path):
    import fcntl
    import shutil

    from racm3.documents import write_jsonl_dataset
    from racm3.retrieval.memory import LOCK

    run, enc, data, built = cli
    mem = tmp_path / "mem"
    shutil.copytree(built, mem)
    fd = os.open(mem / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds the memory
    docs = [Document(f"n{i}", (Image.new("RGB", (16, 16), (i, 0, 0)), f"new {i}"), {}) for i in range(3)]
    write_jsonl_dataset(docs, tmp_path / "new")
    try:
        one_line_error(run("memory", "remove", mem, "e1", "--wait", "0"), str(mem), "--wait")
        one_line_error(run("memory", "build", tmp_path / "new", mem, "--encoder", enc, "--wait", "0.2"), str(mem),
                       "within 0.2 s")
        one_line_error(run("memory", "add", mem, tmp_path / "new", "--encoder", enc, "--wait", "0"), str(mem))
    finally:
        os.close(fd)
    again = Memory.open(mem)
    assert "e1" in again and len(again) == 5 and "n0" not in again
    r = run("memory", "remove", mem, "e1", "--wait", "0")  # free again
    assert r.exit_code == 0 and "e1" not in Memory.open(mem)


def test_memory_cli_search_with_a_10kb_id_and_no_leaked_folders(cli, tmp_path, monkeypatch):
    import shutil
    import tempfile

    from racm3.retrieval.encoder import load_encoder

    run, enc_dir, _, built = cli
    mem_dir = tmp_path / "mem"
    shutil.copytree(built, mem_dir)
    monkeypatch.setenv("RACM3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    enc = load_encoder(enc_dir)
    long_id = "x/" * 5000 + "end"
    doc = Document(long_id, (Image.new("RGB", (16, 16), (1, 2, 3)), "a very long id"), {})
    with Memory.open(mem_dir) as mem:
        mem.add([doc], enc.embed_documents([doc]))
    for _ in range(2):
        r = run("memory", "search", mem_dir, "--text", "a very long id", "-k", "6", "--json", "--encoder", enc_dir)
        assert r.exit_code == 0, r.output
        hits = json.loads(r.stdout)
        assert long_id in [h["id"] for h in hits] and len(hits) == 6
        for h in hits:
            assert os.path.exists(h["image"]) and len(os.path.basename(h["image"])) <= 100
            assert os.path.dirname(h["image"]) == str(tmp_path / "cache" / "hits")
    assert len(os.listdir(tmp_path / "cache" / "hits")) == 6  # the second search reused the files
    assert os.listdir(tmp_path / "tmp") == []  # no racm3-hits-* folder left behind
    saved = tmp_path / "saved"
    r = run("memory", "search", mem_dir, "--text", "a very long id", "-k", "6", "--json", "--encoder", enc_dir,
            "--save-images", saved)
    hits = json.loads(r.stdout)
    assert sorted(os.listdir(saved)) == sorted(os.path.basename(h["image"]) for h in hits)
    long_hit = next(h for h in hits if h["id"] == long_id)
    np.testing.assert_array_equal(np.asarray(Image.open(long_hit["image"])), np.asarray(doc.image))


@pytest.mark.parametrize("args,message", [
    (["--text", ""], "--text is empty"), (["--text", "   "], "--text is empty"),
    (["--text", "pizza", "-k", "0"], "-k must be between 1 and 1000"),
    (["--text", "pizza", "-k", "-1"], "-k must be between 1 and 1000"),
    (["--text", "pizza", "-k", "1001"], "-k must be between 1 and 1000"),
])
def test_memory_search_refuses_an_empty_query_or_a_k_out_of_range(cli, args, message):
    run, enc_dir, _, built = cli
    one_line_error(run("memory", "search", built, *args, "--encoder", enc_dir), message)


def test_add_documents_refuses_a_busy_memory_before_embedding(tmp_path):
    import fcntl

    from racm3.retrieval.memory import LOCK, MemoryBusy

    docs, vecs = make_docs(4)
    mem = Memory.create(tmp_path / "m", "enc-a", DIM)
    mem.add(docs[:2], vecs[:2])
    calls = []

    class Encoder:  # the memory's encoder, counting what it is asked to embed
        name = "enc-a"

        def embed_documents(self, chunk):
            calls.append(len(chunk))
            return vecs[2:2 + len(chunk)]

    fd = os.open(tmp_path / "m" / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds the memory
    try:
        busy = Memory.open(tmp_path / "m", wait=0)
        with pytest.raises(MemoryBusy):
            busy.add_documents(docs[2:], Encoder())
        assert calls == []  # nothing was embedded for a write that could not happen
    finally:
        os.close(fd)
    assert busy.add_documents(docs[2:], Encoder()) == 2 and calls == [2] and len(Memory.open(tmp_path / "m")) == 4
