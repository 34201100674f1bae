"""Pipelines: what every stage of `racm3 train all` trains with, as data (NAME.json here, or a PIPELINE.json).

A pipeline names each stage's settings, every field given (no hidden defaults); a stage takes one of its forms:

    text_tokenizer  {vocab_size}                     a byte-level BPE of that size, trained on the train captions
                    {given}                          a trained one (below)
    image_tokenizer {preset}                         an image tokenizer preset (its own "train" schedule and
                                                     precision); null: v2-SIZE for --image-size (64 by default)
                    {preset, then}                   that, then a second preset's training from its weights
                                                     (v2-64-decoder: the decoder alone, the codes unchanged)
    encoder         {epochs, precision}              the image tower's training
                    {given}                          a trained encoder (--encoder PATH overrides either)
    generator       {preset, recipe, steps, batch_size, eval_every, snapshot_every}
                                                     the RA-CM3 generator (k=2); eval_every: the context benefits
                                                     measured every N steps; snapshot_every: a generator folder
                                                     step-N kept every N steps (0: none)
    generator_k0    the same fields                  its no-retrieval baseline (k=0)
    sampling        {} or image_temperature and/or text_temperature: the model folder's sampling.json

"given" is an installed model's name (its part of that name: emoji-small's text_tokenizer/) or a folder.
`v2` is train all's default; `emoji-small` and `emoji-v2` are the shipped models' own (scripts/train_emoji_*.sh
run them). Command-line options change a pipeline's settings: --image-tokenizer-preset (the whole image
tokenizer stage), --image-size (v2-SIZE where the pipeline names no preset), --generator-preset (both
generators), --encoder, --steps-scale (every length), --generator-steps (both generators' steps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PIPELINE_DIR = Path(__file__).parent
DEFAULT_PIPELINE = "v2"
NUMBER = (int, float)
GENERATOR = {"preset": str, "recipe": str, "steps": int, "batch_size": int, "eval_every": int, "snapshot_every": int}
# each stage's forms: the fields of each and the type each must have (int fields: >= 1, but for COUNTS_FROM_ZERO)
FORMS: dict[str, list[dict[str, type | tuple[type, ...]]]] = {
    "text_tokenizer": [{"vocab_size": int}, {"given": str}],
    "image_tokenizer": [{"preset": (str, type(None))}, {"preset": str, "then": str}],
    "encoder": [{"epochs": int, "precision": str}, {"given": str}],
    "generator": [GENERATOR],
    "generator_k0": [GENERATOR],
    "sampling": [{}, {"image_temperature": NUMBER}, {"text_temperature": NUMBER},
                 {"image_temperature": NUMBER, "text_temperature": NUMBER}],
}
COUNTS_FROM_ZERO = {"snapshot_every"}


def list_pipelines() -> list[str]:
    return sorted(p.stem for p in PIPELINE_DIR.glob("*.json"))


def read_pipeline(name: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A pipeline by name or path: {stage: {field: value}}, every field checked ("given" resolved to a folder);
    a one-line ValueError naming the file and the field otherwise."""
    from racm3.errors import read_preset_file

    path, raw = read_preset_file(name, PIPELINE_DIR, "pipeline")
    if set(raw) != set(FORMS):
        missing, unknown = sorted(set(FORMS) - set(raw)), sorted(set(raw) - set(FORMS))
        raise ValueError(f"{path}: a pipeline names exactly the stages {', '.join(FORMS)}"
                         f"{'; missing ' + ', '.join(missing) if missing else ''}"
                         f"{'; unknown ' + ', '.join(unknown) if unknown else ''}")
    for stage, forms in FORMS.items():
        given = raw[stage]
        form = next((f for f in forms if isinstance(given, dict) and set(given) == set(f)), None)
        if form is None:
            shapes = " or ".join("{" + ", ".join(f) + "}" for f in forms)
            raise ValueError(f"{path}: {stage} must be an object with the fields {shapes}, got {given!r}")
        for field, kind in form.items():
            value = given[field]
            least = 0 if field in COUNTS_FROM_ZERO else 1
            bad_int = kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < least)
            if bad_int or isinstance(value, bool) or not isinstance(value, kind):
                want = (f"an integer >= {least}" if kind is int else "a string" if kind is str else
                        "a number" if kind is NUMBER else "a string or null")
                raise ValueError(f"{path}: {stage}.{field} must be {want}, got {value!r}")
    _check_names(path, raw)
    for stage, marker in (("text_tokenizer", "tokenizer.json"), ("encoder", "config.json")):
        if "given" in raw[stage]:
            raw[stage]["given"] = str(_given_folder(path, stage, raw[stage]["given"], marker))
    return raw


def _given_folder(path: Path, stage: str, given: str, marker: str) -> Path:
    """An installed model's part by the model's name, or a folder (a model folder's part, or the part itself),
    which must hold marker (the file its from_pretrained reads first)."""
    from racm3.pretrained import PRETRAINED_DIR

    installed = sorted(p.name for p in PRETRAINED_DIR.iterdir() if p.is_dir() and p.name[0] != "_")
    try:
        folder = PRETRAINED_DIR / given if given in installed else Path(given)
        folder = folder / stage if (folder / stage / marker).is_file() else folder
        found = bool(given) and (folder / marker).is_file()
    except OSError:  # a name the file system refuses (too long, ...)
        found = False
    if not found:
        raise ValueError(f"{path}: {stage}.given {given!r} is neither an installed model ({', '.join(installed)}) "
                         f"nor a folder with {marker} (a model folder's {stage}/, or that folder itself)")
    return folder


def _check_names(path: Path, raw: dict[str, dict[str, Any]]) -> None:
    """Every preset, recipe, precision and temperature a pipeline names exists: refused before any stage runs."""
    from racm3.generator.data import RECIPES
    from racm3.generator.model import get_preset
    from racm3.generator.train import TrainConfig
    from racm3.pretrained import sampling_problem
    from racm3.runtime import PRECISIONS
    from racm3.tokenizers.image import ImageTokenizerConfig, read_preset

    if raw["text_tokenizer"].get("vocab_size", 257) < 257:
        raise ValueError(f"{path}: text_tokenizer.vocab_size must be >= 257 (256 byte tokens + merges), "
                         f"got {raw['text_tokenizer']['vocab_size']}")
    if raw["encoder"].get("precision", "auto") not in PRECISIONS:
        raise ValueError(f"{path}: encoder.precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {raw['encoder']['precision']!r}")
    for part in ("generator", "generator_k0"):
        if raw[part]["recipe"] not in RECIPES:
            raise ValueError(f"{path}: {part}.recipe must be one of {', '.join(RECIPES)}, got {raw[part]['recipe']!r}")
        if raw[part]["eval_every"] % TrainConfig.log_every:  # the benefits are measured on log lines
            raise ValueError(f"{path}: {part}.eval_every must be a multiple of {TrainConfig.log_every} (the steps "
                             f"that are logged), got {raw[part]['eval_every']}")
    for key, value in raw["sampling"].items():
        problem = sampling_problem(key, value)
        if problem:
            raise ValueError(f"{path}: sampling.{key}: {problem}")
    try:
        for part in ("generator", "generator_k0"):
            get_preset(raw[part]["preset"])
        for field in ("preset", "then"):
            if raw["image_tokenizer"].get(field) is not None:
                read_preset(raw["image_tokenizer"][field])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    first, then = raw["image_tokenizer"]["preset"], raw["image_tokenizer"].get("then")
    if then is not None and ImageTokenizerConfig.from_preset(then) != ImageTokenizerConfig.from_preset(first):
        raise ValueError(f"{path}: image_tokenizer.then {then} is another architecture than {first}; it trains "
                         f"from {first}'s weights, so name a preset of the same model")
