"""Text tokenizer: byte-level BPE from the `tokenizers` library, exact round trip for any Unicode text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`; ids are the tokenizer's own (0..vocab_size-1), before the Vocab offset.

    Byte-level BPE (GPT-2 style) with no normaliser and no prefix space: every string maps to bytes and
    back, so decode(encode(s)) == s for any Unicode text, including "flag: Côte d’Ivoire" and emoji.
    A user's own tokenizer.json is accepted as is; its round trip is only as exact as its normaliser.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> "TextTokenizer":
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 byte tokens + merges), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False keeps the round trip exact (no space is invented at the start);
        # use_regex splits words/punctuation like GPT-2 so merges stay inside words.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # All 256 byte symbols are in the vocabulary even if the captions never use them,
            # so text the tokenizer never saw (any script, any emoji) still encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # skip_special_tokens=False: a user's tokenizer may hold added tokens that are real text.
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / TOKENIZER_FILE))
        return out / TOKENIZER_FILE

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Load DIR/tokenizer.json, or a tokenizer.json file given directly."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: no text tokenizer here; train one with `racm3 train text-tokenizer DATASET_DIR OUT_DIR` "
                "or point to any tokenizer.json")
        from racm3.errors import ModelFolderError, one_line

        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ModelFolderError(f"{file}: not a readable tokenizers JSON file ({one_line(exc)}); restore it from "
                                   "the model it came from or retrain it with `racm3 train text-tokenizer`") from None


def train_text_tokenizer(dataset: str | os.PathLike, out_dir: str | os.PathLike,
                         vocab_size: int = 2048) -> tuple[TextTokenizer, int]:
    """Byte-level BPE on the captions of a dataset's train split (any format the readers take, racm3.splits);
    saved as OUT_DIR/tokenizer.json. Returns the tokenizer and how many captions it learnt from."""
    from racm3.readers import read_documents
    from racm3.splits import in_split

    texts = [t for d in in_split(read_documents(dataset), "train") for t in d.texts]
    if not texts:
        raise ValueError(f"{dataset}: no captions in the train split")
    tok = TextTokenizer.train(texts, vocab_size=vocab_size)
    tok.save_pretrained(out_dir)
    return tok, len(texts)
