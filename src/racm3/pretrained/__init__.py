"""The shipped model folder (emoji-small): text_tokenizer/, image_tokenizer/, encoder/, generator/."""

from pathlib import Path

SHIPPED = "emoji-small"


def shipped_model_dir() -> Path:
    """The model folder that installs with the package; each component loads with its from_pretrained."""
    return Path(__file__).resolve().parent / SHIPPED
