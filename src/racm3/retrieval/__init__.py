"""Retrieval: encoders (text/image/document -> vectors), the memory (SQLite + FAISS) and RA-CM3's retriever rules."""

from racm3.retrieval.encoder import (ClipEncoder, EmojiEncoder, Encoder, EncoderError, ImageTowerConfig,
                                     embed_documents, load_encoder, shipped_encoder_path)
from racm3.retrieval.memory import INDEX_TYPES, EncoderMismatch, Hit, Memory, MemoryFolderError
from racm3.retrieval.retriever import Retriever, RetrieverConfig

__all__ = [
    "ClipEncoder", "EmojiEncoder", "Encoder", "EncoderError", "EncoderMismatch", "Hit", "INDEX_TYPES",
    "ImageTowerConfig", "Memory", "MemoryFolderError", "Retriever", "RetrieverConfig", "embed_documents",
    "load_encoder", "shipped_encoder_path",
]
