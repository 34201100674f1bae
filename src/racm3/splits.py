"""The one train / held-out rule every trainer and evaluation follows, and the one rule that gives data a split.

A document's split is its `split` metadata. It trains when that is "train", or when it has none: a data set
that marks no splits trains on everything. "heldout" (the knowledge benchmark's concepts) and any other value
never train.

Where a split is made, it is made by concept: split_of(key) hashes the document's `concept` (its id when it has
none), so every drawing of a concept, in every style, lands in the same split and a held-out concept is never
trained on (the knowledge benchmark's premise). A hash needs no seed and does not depend on which or how many
documents there are. It is the rule of
- `racm3 train all`, whose data stage gives every document without a split one (with_split), so every stage
  trains on the same documents and is measured on ones none of them trained on;
- the icon data set (`racm3 data icons`): split_of(icon name), the same whichever themes or --limit are chosen.

The one exception is the emoji data set (`racm3 data emoji`): a seeded shuffle of its concepts holds out 20%
(racm3.datasets.emoji.split_concepts), because the shipped model was trained and measured on that split and a
new rule would move concepts it trained on into the held-out set.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

from racm3.documents import Document

TRAIN, HELDOUT = "train", "heldout"
HELDOUT_SHARE = 0.1  # of the keys (concepts, else ids) of data that marks no splits (split_of)


def is_train(doc: Document) -> bool:
    return doc.meta.get("split") in (None, TRAIN)


def in_split(docs: Iterable[Document], split: str | None) -> Iterator[Document]:
    """The documents of one split: "train" by the rule above, any other name exactly, None or "all" for every one."""
    for d in docs:
        if split in (None, "all") or (is_train(d) if split == TRAIN else d.meta.get("split") == split):
            yield d


def split_of(key: str, heldout_share: float = HELDOUT_SHARE) -> str:
    """"heldout" for about heldout_share of keys, else "train", by a hash of the key: the same on every machine
    and in every run whatever the documents' order or number (Python's hash() is salted per process, so not that)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return HELDOUT if int.from_bytes(digest[:8], "big") < heldout_share * 2 ** 64 else TRAIN


def with_split(doc: Document) -> Document:
    """doc itself when it names its split (a user's split field wins), else a copy with the split of its concept
    (of its id when it has none)."""
    if doc.meta.get("split") is not None:
        return doc
    key = doc.id if doc.concept in (None, "") else str(doc.concept)  # a Parquet column may hold numbers
    return Document(doc.id, doc.segments, {**doc.meta, "split": split_of(key)})
