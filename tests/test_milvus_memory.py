"""The Milvus memory's own behaviour, on Milvus Lite: URIs, a SIGKILLed write, one process per Milvus Lite folder, one
writer per process, payloads past one field, ids a filter must escape, the CLI. The behaviour it shares with the
folder memory is tested on both in test_memory.py and test_retriever.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from racm3.documents import Document
from racm3.retrieval.memory import MemoryBusy, MemoryFolderError
from racm3.retrieval.milvus_memory import parse_uri
from tests.memory_backends import HAVE_MILVUS
from tests.test_memory import DIM, cli, make_docs, one_line_error  # noqa: F401 (cli: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_milvus = pytest.mark.skipif(not HAVE_MILVUS, reason='needs pymilvus and milvus-lite: pip install -e ".[milvus]"')


def test_uris_name_milvus_lite_or_a_server_and_never_echo_a_password(tmp_path):
    lite = parse_uri(f"milvus://{tmp_path}/m.db")
    assert lite.lite and lite.server == f"{tmp_path}/m.db" and lite.name == f"milvus://{tmp_path}/m.db"
    assert parse_uri("milvus:rel/m.db").server == os.path.abspath("rel/m.db")
    server = parse_uri("milvus://alice:s3cret@milvus.example:19531/emoji_memory")
    assert (server.server, server.collection, server.token) == ("http://milvus.example:19531", "emoji_memory",
                                                                "alice:s3cret")
    assert "s3cret" not in server.name and parse_uri("milvus://h/c").server == "http://h:19530"
    with pytest.raises(MemoryFolderError, match="ending in .db"):
        parse_uri(f"milvus://{tmp_path}/m")
    with pytest.raises(MemoryFolderError, match="COLLECTION"):
        parse_uri("milvus://host:19530/")


def test_a_milvus_uri_without_pymilvus_says_which_extra_to_install(tmp_path, monkeypatch):
    from racm3.retrieval.backends import open_or_create_memory

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed
    with pytest.raises(MemoryFolderError, match=r"needs pymilvus .*\[milvus\]"):
        open_or_create_memory(f"milvus://{tmp_path}/m.db", "enc-a", DIM)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from racm3.retrieval import milvus_memory as MM
    from tests.test_memory import make_docs

    uri, op = sys.argv[1:3]
    MM.BATCH_BYTES = 1  # one insert request per document: an add of many requests, then its commit
    mem = MM.MilvusMemory.open(uri)
    real_insert, inserts = mem._client.insert, []

    def insert(*a, **k):
        inserts.append(1)
        if op == "add-mid-insert" and len(inserts) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_insert(*a, **k)

    mem._client.insert = insert
    MM.MilvusMemory._commit = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    if op.startswith("add"):
        docs, vecs = make_docs(10, start=100, seed=3)
        mem.add(docs, vecs)
    else:
        mem.remove(["d1", "d2", "d3"])
    print("not killed", flush=True)
""")


@needs_milvus
@pytest.mark.parametrize("op", ["add-mid-insert", "add-before-commit", "remove-before-commit"])
def test_a_sigkilled_write_leaves_all_or_nothing_and_the_next_write_clears_its_leftovers(tmp_path, memories, op):
    """An add killed between its insert requests or before its commit is never seen (its rows lie above the
    committed row) and the next write deletes them; a removal is one delete request, whole once sent."""
    mem = memories.new("milvus", tmp_path, "enc-a", DIM)
    docs, vecs = make_docs(20)
    mem.add(docs, vecs)
    mem.close()  # the child process must be able to open the folder
    proc = subprocess.run([sys.executable, "-c", KILLED, mem.path, op], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout, proc.stderr)
    again = memories.reopen(mem, wait=0)  # Milvus Lite's folder lock died with the process
    expected = {f"d{i}" for i in range(20)} - ({"d1", "d2", "d3"} if op.startswith("remove") else set())
    assert set(again.ids()) == expected and len(again) == len(expected)
    killed_vecs = make_docs(10, start=100, seed=3)[1]
    assert "d100" not in again and "d100" not in {h.id for h in again.search(killed_vecs[:1], 5)[0]}
    leftovers = again._query(f"row > {again._state()[1]}", ["row"])
    assert len(leftovers) == (3 if op == "add-mid-insert" else 10 if op == "add-before-commit" else 0)
    new, new_vecs = make_docs(1, start=900)
    again.add(new, new_vecs)
    assert again._query("row >= 0", ["count(*)"])[0]["count(*)"] == len(expected) + 1 == len(again)  # swept
    assert again.search(new_vecs, 1)[0][0].id == "d900"


HOLDER = textwrap.dedent("""
    import sys, time
    from racm3.retrieval.milvus_memory import MilvusMemory
    mem = MilvusMemory.open(sys.argv[1])
    print("open", flush=True)
    sys.stdin.readline()  # hold the memory open until the test says
""")


@needs_milvus
def test_another_process_is_refused_in_one_line_while_one_has_the_lite_memory_open(tmp_path, memories):
    from typer.testing import CliRunner

    from racm3.cli import app

    mem = memories.new("milvus", tmp_path, "enc-a", DIM)
    mem.add(*make_docs(3))
    mem.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, mem.path], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        r = CliRunner().invoke(app, ["memory", "info", mem.path])
        one_line_error(r, mem.path, "another process has this Milvus Lite memory open", "milvus://host:19530")
    finally:
        holder.communicate("\n", timeout=60)
    assert len(memories.reopen(mem)) == 3  # free once it has closed


@needs_milvus
def test_one_writer_per_process_and_a_busy_memory_embeds_nothing(tmp_path, memories):
    mem = memories.new("milvus", tmp_path, "enc-a", DIM)
    docs, vecs = make_docs(4)
    mem.add(docs[:2], vecs[:2])
    other = memories.reopen(mem, wait=0)
    calls = []

    class Encoder:
        name = "enc-a"

        def embed_documents(self, chunk):
            calls.append(len(chunk))
            return vecs[2:2 + len(chunk)]

    mem._lock.acquire(0)  # a write in progress on another handle of the same memory
    try:
        with pytest.raises(MemoryBusy, match="--wait"):
            other.add_documents(docs[2:], Encoder())
        assert calls == []
        waiting = threading.Thread(target=lambda: calls.append(other.remove(["d0"]) or "removed"))
        other.wait = 30
        waiting.start()  # this one waits for the lock
    finally:
        mem._lock.release()
    waiting.join(30)
    assert calls == ["removed"] and "d0" not in mem
    assert other.add_documents(docs[2:], Encoder()) == 2 and len(mem) == 3


@needs_milvus
def test_ids_a_filter_must_escape_and_images_past_one_field(tmp_path, memories):
    mem = memories.new("milvus", tmp_path, "enc-a", DIM)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))  # ~77 kB of PNG: 2 chunks
    odd = ['quote " and \\ back', "new\nline\ttab", "it's ünïcode ✓", "x/" * 5000 + "end", 'a"] or row > 0 or ["']
    docs = [Document(i, (noise, f"doc {n}", noise), {"n": n}) for n, i in enumerate(odd)]
    vecs = rng.normal(size=(len(docs), DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    mem.add(docs, vecs)
    assert mem.ids() == odd and all(i in mem for i in odd) and "quote" not in mem
    got = mem.get(odd[::-1])
    assert [d.id for d in got] == odd[::-1] and got[0].meta == {"n": 4}
    assert all(np.array_equal(np.asarray(im), np.asarray(noise)) for im in got[1].images)
    assert [h[0].id for h in mem.search(vecs, 1)] == odd
    mem.remove([odd[4]])  # an id that would widen an unescaped filter to every row
    assert len(mem) == 4 and mem.ids() == odd[:4]
    with pytest.raises(ValueError, match="meta takes"):
        mem.add([Document("big", ("caption",), {"blob": "x" * 70_000})], vecs[:1])
    assert len(mem) == 4 and "big" not in mem


@needs_milvus
def test_memory_cli_on_milvus_lite(cli, tmp_path):  # noqa: F811 (cli: test_memory.py's fixture)
    run, enc, data, _ = cli
    uri = f"milvus://{tmp_path}/mem.db"
    r = run("memory", "build", data, uri, "--encoder", enc)
    assert r.exit_code == 0 and f"added 5 documents to {uri} (5 in all, flat index)" in r.output, r.output
    info = json.loads(run("memory", "info", uri, "--json").stdout)
    assert info["count"] == 5 and info["index"] == "flat" and info["encoder"].startswith("emoji")
    hits = json.loads(run("memory", "search", uri, "--text", "flag: France", "-k", "2", "--json", "--encoder",
                          enc, "--save-images", tmp_path / "hits").stdout)
    assert hits[0]["text"] == "flag: France" and len(hits) == 2 and os.path.exists(hits[0]["image"])
    one_line_error(run("memory", "add", uri, data, "--encoder", enc), "'e0'", f"racm3 memory remove {uri} ID")
    assert run("memory", "remove", uri, "e0").exit_code == 0
    one_line_error(run("memory", "remove", uri, "e0"), "e0", "nothing was removed")
    hits = json.loads(run("memory", "search", uri, "--text", "flag: France", "-k", "5", "--json", "--encoder",
                          enc, "--save-images", tmp_path / "hits").stdout)
    assert "e0" not in {h["id"] for h in hits} and len(hits) == 4
    one_line_error(run("memory", "build", data, uri, "--encoder", enc, "--index", "hnsw"), "already holds a flat")
    one_line_error(run("memory", "info", f"milvus://{tmp_path}/none.db"), "no memory here", "racm3 memory build")
    one_line_error(run("memory", "build", data, f"milvus://{tmp_path}/pq.db", "--encoder", enc, "--index", "ivfpq"),
                   "Milvus Lite has none")
