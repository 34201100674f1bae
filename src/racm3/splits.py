"""The one train / held-out rule every trainer and evaluation follows.

A document's split is its `split` metadata. It trains when that is "train", or when it has none: a data set
that marks no splits trains on everything. "heldout" (the knowledge benchmark's concepts) and any other value
never train. `racm3 train all` gives a document without a split one by split_by_id before any stage reads it,
so its quality numbers are measured on documents no stage trained on.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

from racm3.documents import Document

TRAIN, HELDOUT = "train", "heldout"
HELDOUT_SHARE = 0.1  # of the ids of a data set that marks no splits (split_by_id)


def is_train(doc: Document) -> bool:
    return doc.meta.get("split") in (None, TRAIN)


def in_split(docs: Iterable[Document], split: str | None) -> Iterator[Document]:
    """The documents of one split: "train" by the rule above, any other name exactly, None or "all" for every one."""
    for d in docs:
        if split in (None, "all") or (is_train(d) if split == TRAIN else d.meta.get("split") == split):
            yield d


def split_by_id(doc_id: str, heldout_share: float = HELDOUT_SHARE) -> str:
    """"heldout" for about heldout_share of ids, else "train", by a hash of the id: the same on every machine and
    in every run whatever the documents' order or number (Python's hash() is salted per process, so not that)."""
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()
    return HELDOUT if int.from_bytes(digest[:8], "big") < heldout_share * 2 ** 64 else TRAIN


def with_split(doc: Document) -> Document:
    """doc itself when it names its split (a user's split field wins), else a copy with split_by_id's."""
    if doc.meta.get("split") is not None:
        return doc
    return Document(doc.id, doc.segments, {**doc.meta, "split": split_by_id(doc.id)})
