"""Tokenizers: text BPE, VQ image tokenizer, the unified vocabulary, the sequence format and CM3 masking."""

from racm3.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, image_tokenizer_presets
from racm3.tokenizers.multimodal import MultimodalTokenizer
from racm3.tokenizers.sequence import (DEFAULT_IMAGE_BASE, Sequence, build_sequence, cm3_mask, cm3_unmask, collate,
                                       position_ids)
from racm3.tokenizers.text import TextTokenizer
from racm3.tokenizers.vocab import SPECIAL_TOKENS, Vocab

__all__ = ["DEFAULT_IMAGE_BASE", "ImageTokenizer", "ImageTokenizerConfig", "image_tokenizer_presets", "MultimodalTokenizer", "SPECIAL_TOKENS", "Sequence", "TextTokenizer", "Vocab",
           "build_sequence", "cm3_mask", "cm3_unmask", "collate", "position_ids"]
