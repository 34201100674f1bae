"""Unified vocabulary layout and the byte-level BPE text tokenizer's exact round trip."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from racm3.tokenizers import SPECIAL_TOKENS, TextTokenizer, Vocab

CAPTIONS = ["grinning face", "flag: France", "flag: Côte d’Ivoire", "thumbs up: dark skin tone", "pizza",
            "red heart", "face with tears of joy", "flag: Åland Islands", "woman astronaut: medium skin tone"] * 5


@pytest.fixture(scope="module")
def text_tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def test_vocab_layout_specials_then_text_then_image():
    v = Vocab(text_size=100, image_size=50)
    assert SPECIAL_TOKENS[:7] == ["<pad>", "<bos>", "<eos>", "<img>", "</img>", "<doc>", "</doc>"]
    assert [v.pad_id, v.bos_id, v.eos_id, v.img_id, v.img_end_id, v.doc_id, v.doc_end_id] == list(range(7))
    assert [v.mask_id(i) for i in range(16)] == list(range(7, 23))
    assert v.text_offset == 23 and v.image_offset == 123 and v.size == 173
    assert v.text_to_vocab([0, 99]) == [23, 122] and v.vocab_to_text([23, 122]) == [0, 99]
    assert v.image_to_vocab([0, 49]) == [123, 172] and v.vocab_to_image(torch.tensor([123, 172])).tolist() == [0, 49]
    ids = torch.arange(v.size)
    assert v.is_text(ids).sum() == 100 and v.is_image(ids).sum() == 50 and v.is_mask(ids).sum() == 16
    assert not (v.is_text(ids) & v.is_image(ids)).any()
    with pytest.raises(ValueError):
        v.text_to_vocab([100])  # outside the text range
    with pytest.raises(ValueError):
        v.vocab_to_image([122])  # a text id is not an image code


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_text_round_trip_any_unicode(text_tok, text):
    assert text_tok.decode(text_tok.encode(text)) == text


def test_text_tokenizer_learns_merges_and_saves(text_tok, tmp_path):
    for s in ["flag: Côte d’Ivoire", "🇨🇮 flag", "  two  spaces ", "中文"]:
        assert text_tok.decode(text_tok.encode(s)) == s
    # Merges were learned: a frequent caption takes far fewer tokens than its bytes.
    assert len(text_tok.encode("grinning face")) < len("grinning face".encode()) / 2
    text_tok.save_pretrained(tmp_path)
    again = TextTokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == text_tok.vocab_size
    assert again.encode("flag: France") == text_tok.encode("flag: France")
    assert TextTokenizer.from_pretrained(tmp_path / "tokenizer.json").vocab_size == text_tok.vocab_size
    with pytest.raises(FileNotFoundError, match="racm3 train text-tokenizer"):
        TextTokenizer.from_pretrained(tmp_path / "nowhere")
