"""The one split rule, and tokenizers that train from any format the readers take (here an image folder)."""

from __future__ import annotations

from PIL import Image

from racm3.documents import Document
from racm3.splits import in_split, is_train


def _doc(i: str, split: str | None) -> Document:
    return Document(i, ("a caption",), {} if split is None else {"split": split})


def test_train_means_train_or_no_split_and_other_splits_never_train():
    docs = [_doc("a", "train"), _doc("b", None), _doc("c", "heldout"), _doc("d", "val")]
    assert [d.id for d in docs if is_train(d)] == ["a", "b"]
    assert [d.id for d in in_split(docs, "train")] == ["a", "b"]
    assert [d.id for d in in_split(docs, "heldout")] == ["c"]
    assert [d.id for d in in_split(docs, None)] == [d.id for d in in_split(docs, "all")] == ["a", "b", "c", "d"]


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
