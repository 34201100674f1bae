"""The one train / held-out rule every trainer and evaluation follows.

A document's split is its `split` metadata. It trains when that is "train", or when it has none: a data set
that marks no splits trains on everything. "heldout" (the knowledge benchmark's concepts) and any other value
never train.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from racm3.documents import Document

TRAIN, HELDOUT = "train", "heldout"


def is_train(doc: Document) -> bool:
    return doc.meta.get("split") in (None, TRAIN)


def in_split(docs: Iterable[Document], split: str | None) -> Iterator[Document]:
    """The documents of one split: "train" by the rule above, any other name exactly, None or "all" for every one."""
    for d in docs:
        if split in (None, "all") or (is_train(d) if split == TRAIN else d.meta.get("split") == split):
            yield d
