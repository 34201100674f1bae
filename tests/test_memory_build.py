"""Building memories at scale: batch by batch (resumable), in several embedding processes, in shards merged after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from racm3.documents import Document
from racm3.retrieval.build import Shard, build_memory, merge_memories
from racm3.retrieval.memory import Memory


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from racm3.retrieval.encoder import EmojiEncoder, ImageTowerConfig

    path = tmp_path_factory.mktemp("enc") / "encoder"
    EmojiEncoder.untrained(ImageTowerConfig(image_size=16, widths=(8, 16))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    from racm3.retrieval import load_encoder

    return load_encoder(encoder_dir)


def _docs(n: int) -> list[Document]:
    words = ["red", "blue", "green", "flag", "face", "heart", "star", "moon"]
    return [Document(f"d{i}", (Image.new("RGB", (16, 16), (i * 37 % 256, i * 91 % 256, 120)),
                               f"{words[i % 8]} {words[i * 3 % 8]} {i}"), {"split": "train"}) for i in range(n)]


def _state(mem) -> tuple[list[str], np.ndarray]:
    ids = mem.ids()
    return ids, mem.vectors(ids)


def test_a_batched_build_equals_one_write_and_an_interrupted_one_resumes(tmp_path, encoder):
    docs = _docs(23)
    with Memory.create(tmp_path / "one", encoder.name, encoder.dim) as mem:
        mem.add_documents(docs, encoder)
        reference = _state(mem)

    def cut(after: int):  # a data set whose reading dies part-way (a killed build, as far as the memory sees)
        for i, d in enumerate(docs):
            if i == after:
                raise RuntimeError("killed")
            yield d

    with Memory.create(tmp_path / "b", encoder.name, encoder.dim) as mem:
        with pytest.raises(RuntimeError, match="killed"):
            build_memory(mem, cut(13), encoder, batch_size=5)
        assert mem.ids() == [d.id for d in docs[:10]]  # two whole batches written, the third never
    seen = []
    with Memory.open(tmp_path / "b") as mem:
        result = build_memory(mem, iter(docs), encoder, batch_size=5, progress=seen.append)
        assert (result.added, result.skipped) == (13, 10) and sum(seen) == 23
        ids, vecs = _state(mem)
    assert ids == reference[0] and np.allclose(vecs, reference[1], atol=1e-6)
    with Memory.open(tmp_path / "b") as mem, pytest.raises(KeyError, match="'d3' appears twice"):
        build_memory(mem, iter(docs[:5] + docs[3:4]), encoder, batch_size=4)


def test_two_embedding_processes_write_the_memory_one_would(tmp_path, encoder, encoder_dir):
    docs = _docs(30)
    with Memory.create(tmp_path / "one", encoder.name, encoder.dim) as mem:
        build_memory(mem, iter(docs), encoder, batch_size=4)
        reference = _state(mem)
    with Memory.create(tmp_path / "two", encoder.name, encoder.dim) as mem:
        result = build_memory(mem, iter(docs), encoder, batch_size=4, workers=2, encoder_path=encoder_dir)
        ids, vecs = _state(mem)
    assert result.added == 30
    assert ids == reference[0]  # rows in data set order, whichever worker finished first
    assert np.allclose(vecs, reference[1], atol=1e-5)
    from racm3.runtime import bf16_supported

    if bf16_supported(torch.device("cpu")):  # bf16 embedding: the same documents, vectors within rounding
        with Memory.create(tmp_path / "bf16", encoder.name, encoder.dim) as mem:
            build_memory(mem, iter(docs), encoder, batch_size=8, precision="bf16")
            ids, half = _state(mem)
        assert ids == reference[0] and not np.array_equal(half, reference[1])
        assert float((half * reference[1]).sum(1).min()) > 0.999
    # a repeated id in a later batch stops the build, but every batch read before it is written
    with Memory.create(tmp_path / "stopped", encoder.name, encoder.dim) as mem:
        with pytest.raises(KeyError, match="'d2' appears twice .* the 20 documents before its batch are in"):
            build_memory(mem, iter(docs[:20] + docs[2:3]), encoder, batch_size=4, workers=2, encoder_path=encoder_dir)
        assert mem.ids() == [d.id for d in docs[:20]]


def test_shards_cover_the_data_set_once_and_merge_into_the_whole(tmp_path, encoder):
    docs = _docs(40)
    shards = [Shard.parse(f"{i}/3") for i in range(3)]
    assert all(sum(s.holds(d.id) for s in shards) == 1 for d in docs)
    parts = []
    for s in shards:
        mem = Memory.create(tmp_path / f"part{s.index}", encoder.name, encoder.dim)
        result = build_memory(mem, iter(docs), encoder, batch_size=8, shard=s)
        assert result.added == sum(s.holds(d.id) for d in docs) > 0 and result.added + result.skipped == 40
        parts.append(mem)
    with Memory.create(tmp_path / "whole", encoder.name, encoder.dim) as whole:
        assert merge_memories(whole, parts, batch_size=7).added == 40
        assert merge_memories(whole, parts[:1]).added == 0  # a merge run again adds nothing twice
        assert sorted(whole.ids()) == sorted(d.id for d in docs)
        query = encoder.embed_documents(docs[5:6])
        assert whole.search(np.asarray(query, np.float32), 1)[0][0].id == "d5"
    for mem in parts:
        mem.close()
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_memory_build_cli_resumes_and_reports_its_rate(tmp_path, encoder_dir):
    from typer.testing import CliRunner

    from racm3.cli import app
    from racm3.documents import write_jsonl_dataset

    write_jsonl_dataset(_docs(12), tmp_path / "data")
    run = CliRunner().invoke
    args = ["memory", "build", str(tmp_path / "data"), str(tmp_path / "mem"), "--encoder", str(encoder_dir),
            "--batch-size", "5"]
    first = run(app, args)
    assert first.exit_code == 0 and "added 12 documents" in first.stderr and "documents/s" in first.stderr
    again = run(app, args)
    assert again.exit_code == 0 and "added 0 documents" in again.stderr and "skipped 12" in again.stderr
    for i in range(2):
        part = run(app, args[:3] + [str(tmp_path / f"p{i}"), *args[4:], "--shard", f"{i}/2"])
        assert part.exit_code == 0, part.output
    merged = run(app, ["memory", "merge", str(tmp_path / "all"), str(tmp_path / "p0"), str(tmp_path / "p1")])
    assert merged.exit_code == 0 and "merged 12 documents" in merged.stderr, merged.output
    with Memory.open(tmp_path / "all") as a, Memory.open(tmp_path / "mem") as b:
        assert sorted(a.ids()) == sorted(b.ids())
