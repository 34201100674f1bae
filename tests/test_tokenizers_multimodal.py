"""Document <-> ids through the unified vocabulary: text exact, images exact through their VQ codes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from racm3.documents import Document
from racm3.tokenizers import ImageTokenizer, MultimodalTokenizer, TextTokenizer, Vocab, build_sequence

CAPTIONS = ["grinning face", "flag: France", "flag: Côte d’Ivoire", "thumbs up: dark skin tone", "pizza"] * 5


@pytest.fixture(scope="module")
def mm() -> MultimodalTokenizer:
    torch.manual_seed(0)
    text = TextTokenizer.train(CAPTIONS, vocab_size=280)
    image = ImageTokenizer("tiny").eval()
    return MultimodalTokenizer(text, image, Vocab(text.vocab_size, image.codebook_size))


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), mode="RGB")


captions = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(captions, st.integers(0, 1000)), min_size=1, max_size=4).filter(
    lambda segs: all(not (isinstance(a, str) and isinstance(b, str)) for a, b in zip(segs, segs[1:]))))
def test_document_to_ids_and_back_is_exact(mm, segs):
    doc = Document("d", tuple(s if isinstance(s, str) else _image(s) for s in segs))
    ids = mm.document_to_ids(doc)
    assert not any(t in (mm.vocab.bos_id, mm.vocab.eos_id, mm.vocab.doc_id) for t in ids)  # bare document
    back = mm.ids_to_segments(ids)
    assert len(back) == len(segs)
    images = doc.images
    codes = mm.image.encode(images) if images else None
    k = 0
    for orig, got in zip(doc.segments, back):
        if isinstance(orig, str):
            assert got == orig  # text exact
        else:
            assert torch.equal(got, codes[k])  # image exact through its codes
            k += 1
    # The precomputed-codes path gives the same ids without running the encoder.
    cached = [s if isinstance(s, str) else c for s, c in zip(doc.segments, back)]
    assert mm.codes_document_to_ids(cached) == ids
    redone = mm.ids_to_document(ids, id="x")
    assert redone.texts == doc.texts and len(redone.images) == len(images)
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in redone.images)


def test_document_round_trip_through_a_full_sequence(mm):
    doc = Document("d", ("flag: Côte d’Ivoire", _image(1)))
    other = Document("r", ("pizza", _image(2)))
    seq = build_sequence(mm.document_to_ids(doc), [mm.document_to_ids(other)], mm.vocab)
    main = [t for t, d in zip(seq.ids, seq.doc_index) if d == 1]
    assert mm.ids_to_document(main).text == "flag: Côte d’Ivoire"
    whole = mm.ids_to_segments(seq.ids)  # wrappers are skipped: both documents' segments, in order
    assert [s for s in whole if isinstance(s, str)] == ["pizza", "flag: Côte d’Ivoire"]


def test_consecutive_text_segments_join_with_a_space(mm):
    doc = Document("d", ("red", "heart", _image(3)))
    back = mm.ids_to_document(mm.document_to_ids(doc))
    assert back.text == doc.text == "red heart"


def test_malformed_ids_give_clear_errors(mm):
    v = mm.vocab
    with pytest.raises(ValueError, match="codes"):
        mm.ids_to_segments([v.img_id, *v.image_to_vocab([1, 2]), v.img_end_id])
    with pytest.raises(ValueError, match="cm3_unmask"):
        mm.ids_to_segments([v.mask_id(0)])
    with pytest.raises(ValueError, match="codes"):
        mm.codes_document_to_ids(["a", [1, 2, 3]])


def test_save_and_load_the_model_folder_layout(mm, tmp_path):
    mm.save_pretrained(tmp_path)
    assert (tmp_path / "text_tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "image_tokenizer" / "model.safetensors").is_file()
    again = MultimodalTokenizer.from_pretrained(tmp_path)
    doc = Document("d", ("pizza", _image(5)))
    assert again.document_to_ids(doc) == mm.document_to_ids(doc) and again.vocab == mm.vocab
