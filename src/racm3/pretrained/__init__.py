"""The shipped model folder (emoji-small) and how one is assembled from trained components."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SHIPPED = "emoji-small"
PRETRAINED_DIR = Path(__file__).resolve().parent  # the installed model folders, one per name

# What each component folder ships: weights and configs only (no checkpoints, caches or logs).
_KEEP = {"text_tokenizer": ["tokenizer.json"], "encoder": ["config.json", "model.safetensors"],
         "image_tokenizer": ["config.json", "model.safetensors"],
         "generator": ["config.json", "model.safetensors", "racm3.json"],
         "generator_k0": ["config.json", "model.safetensors", "racm3.json"]}


SAMPLING_FILE = "sampling.json"  # a model folder's default sampling temperatures, beside its components
SAMPLING_DEFAULTS = {"image_temperature": 1.0, "text_temperature": 0.7}  # a folder without the file


def read_sampling(model_dir: str | Path) -> dict[str, float]:
    """The model folder's default temperatures: SAMPLING_DEFAULTS, overridden by its sampling.json (if any).

    A generator whose distribution is too flat to sample at 1.0 (v2 draws its held-out concepts right 0.68 of
    the time at 0.5 against 0.40 at 1.0) says so here, so every caller (the CLI, the server, the benchmarks,
    RACM3's methods) samples it as it was measured unless told otherwise. Both generators of the folder (the
    RA-CM3 one and the no-retrieval baseline) use it.
    """
    from racm3.errors import ModelFolderError, read_json_object
    from racm3.limits import TEMPERATURE_RULE

    path = Path(model_dir) / SAMPLING_FILE
    if not path.exists():
        return dict(SAMPLING_DEFAULTS)
    hint = f"it holds {sorted(SAMPLING_DEFAULTS)}, each {TEMPERATURE_RULE}; fix or delete it"
    raw = read_json_object(path, hint)
    problems = [p for k, v in raw.items() if (p := sampling_problem(k, v))]
    if problems:
        raise ModelFolderError(f"{path}: {problems[0]}; fix or delete it")
    return {**SAMPLING_DEFAULTS, **{k: float(v) for k, v in raw.items()}}


def sampling_problem(key: str, value) -> str | None:
    """Why (key, value) cannot be a model folder's default temperature, or None: the one rule for both ways in."""
    from racm3.limits import TEMPERATURE_RULE, temperature_ok

    if key not in SAMPLING_DEFAULTS:
        return f"unknown {key!r} (a model folder sets {sorted(SAMPLING_DEFAULTS)})"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not temperature_ok(value):
        return f"{key} must be {TEMPERATURE_RULE}, got {value!r}"
    return None


def shipped_model_dir() -> Path:
    """The model folder that installs with the package; each component loads with its from_pretrained."""
    return PRETRAINED_DIR / SHIPPED


def assemble(out_dir: str | Path, sampling: dict[str, float] | None = None, **components: Path | None) -> Path:
    """Write trained components into a model folder, replacing each one given and keeping the others.

    components: text_tokenizer, image_tokenizer, encoder, generator, generator_k0 (the no-retrieval
    baseline) -> trained folders. Only weights and configs are copied; the VQ is stored in float16 (half the
    size; held-out PSNR 19.39 dB in float32 and float16 alike, measured). Each component is built in a
    temporary folder and renamed into place, so a missing file fails before that component changes.
    sampling: default temperatures to set in the folder's sampling.json (read_sampling), merged with those
    already there; checked before anything is written.
    """
    import torch

    from racm3.tokenizers.image import ImageTokenizer

    out = Path(out_dir)
    unknown = set(components) - set(_KEEP)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {sorted(_KEEP)}")
    if sampling:
        _check_sampling(sampling)
    out.mkdir(parents=True, exist_ok=True)
    for name, src in components.items():
        if src is None:
            continue
        src = Path(src)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
        try:
            if name == "image_tokenizer":
                ImageTokenizer.from_pretrained(src).save_pretrained(tmp, dtype=torch.float16)
            elif name == "encoder" and _is_clip(src):
                # a CLIP loads from its whole folder (tokenizer and image processor files beside the weights)
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            else:
                for f in _KEEP[name]:
                    if not (src / f).exists():
                        raise FileNotFoundError(f"{src / f} is missing: is {src} a trained {name} folder?")
                    shutil.copy2(src / f, tmp / f)
            old = out / name
            if old.exists():
                shutil.rmtree(old)
            os.replace(tmp, old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if sampling:  # after the components: a component that fails leaves the folder's temperatures as they were
        _write_sampling(out, sampling)
    return out


def _check_sampling(sampling: dict[str, float]) -> None:
    for k, v in sampling.items():
        if problem := sampling_problem(k, v):
            raise ValueError(f"sampling: {problem}")


def _write_sampling(out: Path, sampling: dict[str, float]) -> None:
    """Merge temperatures into out/sampling.json (read_sampling's rule), written to a temporary file and renamed."""
    import json

    path = out / SAMPLING_FILE
    kept = read_sampling(out) if path.exists() else {}  # a broken file already there is refused, not merged
    tmp = out / f".{SAMPLING_FILE}.tmp"
    tmp.write_text(json.dumps({**kept, **{k: float(v) for k, v in sampling.items()}}, indent=2) + "\n")
    os.replace(tmp, path)


def _is_clip(folder: Path) -> bool:
    """Whether an encoder folder holds a CLIP (racm3.retrieval.encoder.load_encoder's test: its model_type)."""
    import json

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False  # not a readable config: the copy below names the missing file
