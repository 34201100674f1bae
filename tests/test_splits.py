"""The one split rule, and tokenizers that train from any format the readers take (here an image folder)."""

from __future__ import annotations

from PIL import Image

from racm3.documents import Document
from racm3.splits import HELDOUT, TRAIN, in_split, is_train, split_of, with_split


def _doc(i: str, split: str | None) -> Document:
    return Document(i, ("a caption",), {} if split is None else {"split": split})


def test_train_means_train_or_no_split_and_other_splits_never_train():
    docs = [_doc("a", "train"), _doc("b", None), _doc("c", "heldout"), _doc("d", "val")]
    assert [d.id for d in docs if is_train(d)] == ["a", "b"]
    assert [d.id for d in in_split(docs, "train")] == ["a", "b"]
    assert [d.id for d in in_split(docs, "heldout")] == ["c"]
    assert [d.id for d in in_split(docs, None)] == [d.id for d in in_split(docs, "all")] == ["a", "b", "c", "d"]


def test_split_of_is_a_fixed_hash_holding_out_about_a_tenth():
    splits = [split_of(f"doc-{i}") for i in range(2000)]
    assert 150 < splits.count(HELDOUT) < 250
    # the same on every machine and in every process: a salted hash (Python's hash()) would move these
    assert [split_of(k) for k in ("doc-1", "doc-7", "doc-19", "doc-20", "doc-21", "doc-22", "thing-6", "edit-copy")] \
        == [TRAIN, HELDOUT, HELDOUT, HELDOUT, HELDOUT, TRAIN, HELDOUT, TRAIN]


def test_a_split_is_made_by_concept_and_a_given_one_kept():
    # doc-7 alone is held out and doc-1 trains: with their concept thing-6 (held out), both are held out
    drawings = [Document(i, ("a caption",), {"concept": "thing-6", "style": style})
                for i, style in (("doc-7", "a"), ("doc-1", "b"))]
    assert [with_split(d).split for d in drawings] == [HELDOUT, HELDOUT]
    assert [with_split(_doc(i, None)).split for i in ("doc-7", "doc-1")] == [HELDOUT, TRAIN]  # no concept: the id
    assert with_split(_doc("doc-7", "train")).split == TRAIN  # a split of the data's own wins


def test_tokenizers_train_from_an_image_folder(tmp_path):
    from racm3.tokenizers.image_train import load_split_images
    from racm3.tokenizers.text import TextTokenizer, train_text_tokenizer

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (colour, name) in enumerate([((200, 0, 0), "a red square"), ((0, 0, 200), "a blue square")] * 3):
        Image.new("RGB", (20, 24), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(name)
    tok, captions = train_text_tokenizer(folder, tmp_path / "tok", vocab_size=280)
    assert captions == 6  # no split anywhere: everything trains
    again = TextTokenizer.from_pretrained(tmp_path / "tok")
    assert again.decode(again.encode("a red square")) == "a red square"
    images = load_split_images(folder, "train", image_size=16)
    assert tuple(images.shape) == (6, 3, 16, 16) and images.dtype.is_floating_point is False
    assert images[0, 0].float().mean() > 190 and images[1, 2].float().mean() > 190  # red, then blue, resized
