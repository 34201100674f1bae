"""racm3: retrieval-augmented multimodal language modeling (RA-CM3), open and trainable on one CPU."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("racm3")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

from racm3.documents import BadRecord, Document

__all__ = ["BadRecord", "Document", "__version__"]
