"""Pipelines: what every stage of `racm3 train all` trains with, as data (NAME.json here, or a PIPELINE.json).

A pipeline names each stage's settings, every field given (no hidden defaults):

    text_tokenizer  vocab_size                       the byte-level BPE's size
    image_tokenizer preset                           an image tokenizer preset (its own "train" schedule and
                                                     precision); null: v2-SIZE for --image-size (64 by default)
    encoder         epochs, precision                the image tower's training
    generator       preset, recipe, steps, batch_size,  the RA-CM3 generator (k=2); eval_every: the context
                    eval_every, snapshot_every          benefits measured every N steps, snapshot_every: a
                                                        generator folder step-N kept every N steps (0: none)
    generator_k0    the same fields                     its no-retrieval baseline (k=0)

`v2` is train all's default; `emoji-small` and `emoji-v2` are the shipped models' own (scripts/train_emoji_*.sh
run them). Command-line options change a pipeline's settings: --image-size, --image-tokenizer-preset,
--generator-preset (both generators), --steps-scale (every length), --generator-steps (both generators' steps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PIPELINE_DIR = Path(__file__).parent
DEFAULT_PIPELINE = "v2"
# every stage and its fields, with the type each must have (int fields: >= 1, but for COUNTS_FROM_ZERO)
GENERATOR = {"preset": str, "recipe": str, "steps": int, "batch_size": int, "eval_every": int, "snapshot_every": int}
FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "text_tokenizer": {"vocab_size": int},
    "image_tokenizer": {"preset": (str, type(None))},
    "encoder": {"epochs": int, "precision": str},
    "generator": GENERATOR,
    "generator_k0": GENERATOR,
}
COUNTS_FROM_ZERO = {"snapshot_every"}


def list_pipelines() -> list[str]:
    return sorted(p.stem for p in PIPELINE_DIR.glob("*.json"))


def read_pipeline(name: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A pipeline by name or path: {stage: {field: value}}, every field checked; a one-line ValueError naming the
    file and the field otherwise."""
    from racm3.errors import read_preset_file

    path, raw = read_preset_file(name, PIPELINE_DIR, "pipeline")
    if set(raw) != set(FIELDS):
        missing, unknown = sorted(set(FIELDS) - set(raw)), sorted(set(raw) - set(FIELDS))
        raise ValueError(f"{path}: a pipeline names exactly the stages {', '.join(FIELDS)}"
                         f"{'; missing ' + ', '.join(missing) if missing else ''}"
                         f"{'; unknown ' + ', '.join(unknown) if unknown else ''}")
    for stage, fields in FIELDS.items():
        given = raw[stage]
        if not isinstance(given, dict) or set(given) != set(fields):
            raise ValueError(f"{path}: {stage} must be an object with exactly the fields {', '.join(fields)}")
        for field, kind in fields.items():
            value = given[field]
            least = 0 if field in COUNTS_FROM_ZERO else 1
            bad_int = kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < least)
            if bad_int or not isinstance(value, kind):
                want = f"an integer >= {least}" if kind is int else "a string" if kind is str else "a string or null"
                raise ValueError(f"{path}: {stage}.{field} must be {want}, got {value!r}")
    _check_names(path, raw)
    return raw


def _check_names(path: Path, raw: dict[str, dict[str, Any]]) -> None:
    """Every preset, recipe and precision a pipeline names exists: refused before any stage runs."""
    from racm3.generator.data import RECIPES
    from racm3.generator.model import get_preset
    from racm3.runtime import PRECISIONS
    from racm3.tokenizers.image import read_preset

    if raw["encoder"]["precision"] not in PRECISIONS:
        raise ValueError(f"{path}: encoder.precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {raw['encoder']['precision']!r}")
    for part in ("generator", "generator_k0"):
        if raw[part]["recipe"] not in RECIPES:
            raise ValueError(f"{path}: {part}.recipe must be one of {', '.join(RECIPES)}, got {raw[part]['recipe']!r}")
    try:
        for part in ("generator", "generator_k0"):
            get_preset(raw[part]["preset"])
        if raw["image_tokenizer"]["preset"] is not None:
            read_preset(raw["image_tokenizer"]["preset"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
