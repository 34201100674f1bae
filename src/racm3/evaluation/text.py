"""Caption normalisation shared by CIDEr and the name judge: lowercase words, punctuation dropped."""

from __future__ import annotations

import re
import unicodedata

# A word is a run of letters/digits, keeping inner hyphens and apostrophes ("medium-light", "o'clock");
# everything else (":", ",", "(", ")", ".", quotes) separates words and is dropped, as the COCO PTB
# tokenizer's punctuation removal does before CIDEr.
_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


def words(text: str) -> list[str]:
    """'Flag: Côte d’Ivoire' -> ['flag', 'côte', "d'ivoire"]  (NFKC, lowercase, curly apostrophe made straight)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    return _WORD.findall(text)


def normalize(text: str) -> str:
    """The words of a caption joined by single spaces: the form captions are compared and scored in."""
    return " ".join(words(text))
