"""The unified vocabulary: special tokens, text ids and image codes laid out in one id space, defined once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

NUM_MASKS = 16  # CM3: at most 16 masked spans per sequence, one sentinel each (Aghajanyan et al. 2022)

SPECIAL_TOKENS: list[str] = ["<pad>", "<bos>", "<eos>", "<img>", "</img>", "<doc>", "</doc>"] + [
    f"<mask:{i}>" for i in range(NUM_MASKS)
]

_MASK0 = SPECIAL_TOKENS.index("<mask:0>")

Ids = TypeVar("Ids", list, torch.Tensor)


def _shift(ids: Sequence[int] | torch.Tensor, offset: int, size: int, kind: str, to_vocab: bool):
    """Add (to_vocab) or subtract offset, checking every id lands in [0, size) of its own range."""
    if isinstance(ids, torch.Tensor):
        local = ids if to_vocab else ids - offset
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= size):
            raise ValueError(f"{kind} id out of range [0, {size}) in {ids.tolist()[:16]}")
        return local + offset if to_vocab else local
    out = []
    for i in ids:
        local = int(i) if to_vocab else int(i) - offset
        if not 0 <= local < size:
            raise ValueError(f"{kind} id {int(i)} is out of range [0, {size}) for this vocabulary")
        out.append(local + offset if to_vocab else local)
    return out


@dataclass(frozen=True)
class Vocab:
    """One id space laid out as [special tokens][text ids][image codes].

    text_size is the text tokenizer's vocabulary size, image_size the VQ codebook size. Special tokens come
    first so their ids never move when either tokenizer is retrained with another size.
    """

    text_size: int
    image_size: int

    def __post_init__(self) -> None:
        if self.text_size < 1 or self.image_size < 1:
            raise ValueError(f"Vocab needs text_size and image_size >= 1, got {self.text_size}, {self.image_size}")

    # --- special tokens ---------------------------------------------------------------------------
    pad_id = property(lambda self: SPECIAL_TOKENS.index("<pad>"))
    bos_id = property(lambda self: SPECIAL_TOKENS.index("<bos>"))
    eos_id = property(lambda self: SPECIAL_TOKENS.index("<eos>"))
    img_id = property(lambda self: SPECIAL_TOKENS.index("<img>"))
    img_end_id = property(lambda self: SPECIAL_TOKENS.index("</img>"))
    doc_id = property(lambda self: SPECIAL_TOKENS.index("<doc>"))
    doc_end_id = property(lambda self: SPECIAL_TOKENS.index("</doc>"))

    def mask_id(self, i: int) -> int:
        if not 0 <= i < NUM_MASKS:
            raise ValueError(f"mask index {i} is out of range [0, {NUM_MASKS})")
        return _MASK0 + i

    def mask_index(self, token: int) -> int:
        """The i of a <mask:i> id (raises for any other id)."""
        if not _MASK0 <= token < _MASK0 + NUM_MASKS:
            raise ValueError(f"id {token} is not a <mask:i> sentinel")
        return token - _MASK0

    @property
    def num_special(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def text_offset(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def image_offset(self) -> int:
        return len(SPECIAL_TOKENS) + self.text_size

    @property
    def size(self) -> int:
        return len(SPECIAL_TOKENS) + self.text_size + self.image_size

    def token_name(self, token: int) -> str:
        """A readable name for one id: '<img>', 'text:17', 'image:503' (for debugging and error messages)."""
        if 0 <= token < self.text_offset:
            return SPECIAL_TOKENS[token]
        if token < self.image_offset:
            return f"text:{token - self.text_offset}"
        if token < self.size:
            return f"image:{token - self.image_offset}"
        return f"<out of vocabulary {token}>"

    # --- conversions (lists stay lists, tensors stay tensors) ------------------------------------------
    def text_to_vocab(self, ids: Ids) -> Ids:
        return _shift(ids, self.text_offset, self.text_size, "text", to_vocab=True)

    def vocab_to_text(self, ids: Ids) -> Ids:
        return _shift(ids, self.text_offset, self.text_size, "text", to_vocab=False)

    def image_to_vocab(self, codes: Ids) -> Ids:
        return _shift(codes, self.image_offset, self.image_size, "image", to_vocab=True)

    def vocab_to_image(self, ids: Ids) -> Ids:
        return _shift(ids, self.image_offset, self.image_size, "image", to_vocab=False)

    # --- membership tests (bool tensors, elementwise; ints give a bool) ---------------------------------
    def is_image(self, ids: torch.Tensor | int):
        return (ids >= self.image_offset) & (ids < self.size)

    def is_text(self, ids: torch.Tensor | int):
        return (ids >= self.text_offset) & (ids < self.image_offset)

    def is_mask(self, ids: torch.Tensor | int):
        return (ids >= _MASK0) & (ids < _MASK0 + NUM_MASKS)

    def is_special(self, ids: torch.Tensor | int):
        return (ids >= 0) & (ids < self.text_offset)
