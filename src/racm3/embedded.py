"""The embedded defaults: the emoji data set and its memory, built on first use into a user cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$RACM3_CACHE, else $XDG_CACHE_HOME/racm3, else ~/.cache/racm3."""
    if os.environ.get("RACM3_CACHE"):
        return Path(os.environ["RACM3_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "racm3"


def ensure_emoji_dataset(path: Path | None = None, log=print) -> Path:
    """The emoji data set folder, built (~15 s) if it has no docs.jsonl yet."""
    from racm3.datasets.emoji import iter_emoji_documents
    from racm3.documents import write_jsonl_dataset

    path = Path(path) if path is not None else cache_dir() / "emoji"
    if not (path / "docs.jsonl").exists():
        log(f"building the emoji data set in {path} (once)")
        write_jsonl_dataset(iter_emoji_documents(), path)
    return path


def ensure_emoji_memory(encoder, path: Path | None = None, log=print) -> Path:
    """The memory of every emoji document under this encoder, built if absent.

    The folder name carries the encoder's identity, so a new encoder gets a new memory instead of a refusal.
    The memory is built in a temporary folder and renamed into place: an interrupted build leaves nothing.
    """
    from racm3.readers import read_documents
    from racm3.retrieval.memory import Memory

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder.name)
    path = Path(path) if path is not None else cache_dir() / f"memory-emoji-{safe}"
    if (path / "memory.json").exists():
        return path
    dataset = ensure_emoji_dataset(log=log)
    log(f"building the emoji memory in {path} (once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=path.parent))
    try:
        with Memory.create(tmp / "memory", encoder.name, encoder.dim) as memory:
            memory.add_documents(list(read_documents(dataset)), encoder)
        try:
            os.replace(tmp / "memory", path)
        except OSError:
            if not (path / "memory.json").exists():  # another process finished first: use its memory
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
