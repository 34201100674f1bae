"""The one error a model file that cannot be loaded raises, and the checked readers every loader shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelFolderError(ValueError):
    """A model file (config, weights, tokenizer) that cannot be loaded; the message names the file and the fix."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to limit characters (library messages can be tables)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_object(path: Path, hint: str, error: type[ValueError] = ModelFolderError) -> dict[str, Any]:
    """A JSON file that must hold an object, or ModelFolderError naming the file and hint (what to do)."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8
        raise error(f"{path}: not a readable JSON file ({one_line(exc)}); {hint}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: must hold a JSON object, got {type(raw).__name__}; {hint}")
    return raw


def safetensors_shapes(path: Path, hint: str,
                       error: type[ModelFolderError] = ModelFolderError) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header; ModelFolderError for a missing, truncated or foreign file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise error(f"{path}: weights file missing; {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path}: truncated or not a safetensors file ({one_line(exc)}); {hint}") from None


def load_safetensors(path: Path, hint: str, device: str = "cpu",
                     error: type[ModelFolderError] = ModelFolderError) -> dict:
    """A .safetensors file's tensors; ModelFolderError (naming the file and hint) when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_shapes(path, hint, error)  # the header check names a truncated file before load_file reads it
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise error(f"{path}: truncated or not a safetensors file ({one_line(exc)}); {hint}") from None


def check_shapes(weights: Path, expected: dict[str, Any], found: dict[str, list[int]], config: Path, hint: str,
                 optional: frozenset[str] = frozenset(), error: type[ModelFolderError] = ModelFolderError) -> None:
    """Refuse weights whose tensors are missing or of another shape than the config builds (names the first)."""
    for name, tensor in expected.items():
        want = list(tensor.shape)
        if name not in found:
            if name in optional:
                continue
            raise error(f"{weights}: tensor {name} missing (the weights do not match {config}); {hint}")
        if found[name] != want:
            raise error(f"{weights}: tensor {name} has shape {found[name]} but {config} builds {want}: "
                        f"the two files come from different models; {hint}")


def read_preset_file(name: str | Path, folder: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """A preset by name (folder/NAME.json) or a path to a .json file: (its path, its JSON object without "about").
    ValueError naming the file, or the presets there are to choose from."""
    path = Path(name) if str(name).endswith(".json") else folder / f"{name}.json"
    if not path.is_file():
        where = f"{path}: no such file" if str(name).endswith(".json") else f"unknown {kind} preset {name!r}"
        names = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
        raise ValueError(f"{where}; choose a preset from {names} or give a PRESET.json")
    raw = read_json_object(path, f"a {kind} preset is a JSON object", error=ValueError)
    raw.pop("about", None)  # a preset's one-line description
    return path, raw

