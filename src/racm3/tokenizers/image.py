"""VQ image tokenizer: a small convolutional autoencoder around vector-quantize-pytorch's VectorQuantize."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "racm3-vq"
QUANTIZERS = ("vq", "fsq")


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """Architecture and quantizer settings. The code grid is image_size / 2**(len(channels) - 1) per side.

    channels[i] is the width at resolution image_size / 2**i; each level has num_res_blocks residual blocks.
    quantizer "vq" (VQGAN-style, with the fixes of Yu et al. 2022 "ViT-VQGAN" for codebook use): an
    L2-normalised (cosine) codebook, looked up in codebook_dim dimensions (None: latent_dim; a small one, e.g. 8,
    is LlamaGen's low-dimensional lookup, through learned projections), k-means initialised on the first batch,
    EMA updates, and codes whose EMA use falls below dead_code_threshold replaced by batch vectors.
    quantizer "fsq" (Mentzer et al. 2023, finite scalar quantization): latents projected to len(fsq_levels)
    numbers, each rounded to one of its levels; the codes are the grid's points (codebook_size = their product),
    with no codebook to learn and none to collapse.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_blocks: int = 1
    latent_dim: int = 32
    codebook_size: int | None = None  # vq: the codebook's rows (None: 1,024); fsq: the product of the levels
    use_cosine_sim: bool = True
    kmeans_init: bool = True
    ema_decay: float = 0.9
    dead_code_threshold: float = 0.5
    commitment_weight: float = 0.25
    quantizer: str = "vq"
    codebook_dim: int | None = None
    fsq_levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            levels = tuple(int(v) for v in self.fsq_levels or ())
            # a level of 2 needs vector-quantize-pytorch's symmetric variant; 3 and up are the paper's grid
            if not levels or any(v < 3 for v in levels):
                raise ValueError(f"an fsq quantizer needs fsq_levels, each >= 3 (e.g. [8, 8, 8, 6, 5]), got {self.fsq_levels}")
            points = int(np.prod(levels))  # the grid's points are the codes
            if self.codebook_size not in (None, points) or self.codebook_dim is not None:
                raise ValueError(f"an fsq quantizer's codes are its levels' grid ({points} for {list(levels)}): "
                                 "drop codebook_size and codebook_dim, which are for 'vq'")
            object.__setattr__(self, "fsq_levels", levels)
            object.__setattr__(self, "codebook_size", points)
        elif self.fsq_levels is not None:
            raise ValueError("fsq_levels is for quantizer 'fsq'; a 'vq' quantizer sets codebook_size")
        elif self.codebook_size is None:
            object.__setattr__(self, "codebook_size", 1024)
        if self.codebook_dim is not None and not 1 <= self.codebook_dim:
            raise ValueError(f"codebook_dim must be >= 1, got {self.codebook_dim}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive widths, got {self.channels}")
        down = 2 ** (len(self.channels) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**(len(channels)-1) = {down}")
        if self.codebook_size < 2 or self.latent_dim < 1 or self.num_res_blocks < 0:
            raise ValueError(f"invalid codebook_size {self.codebook_size} / latent_dim {self.latent_dim} / "
                             f"num_res_blocks {self.num_res_blocks}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // 2 ** (len(self.channels) - 1)
        return side, side

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        if self.fsq_levels is not None:
            d["fsq_levels"] = list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageTokenizerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"model_type"}
        if unknown:
            raise ValueError(f"unknown image tokenizer config keys {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_preset(cls, name: str | os.PathLike) -> "ImageTokenizerConfig":
        """The architecture of a preset: image_presets/NAME.json or a path to such a file."""
        path, raw = read_preset(name)
        try:
            return cls.from_dict(raw["model"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: model: {exc}") from None


# Presets as data: one JSON file per preset, {"about": one line, "model": ImageTokenizerConfig fields, "train":
# ImageTrainConfig fields (steps, losses) that `racm3 train image-tokenizer --preset NAME` uses unless told
# otherwise}. "tiny" is for tests (16x16 images, 4x4 codes); the emoji presets take 64x64 images.
PRESET_DIR = Path(__file__).with_name("image_presets")


def image_tokenizer_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_preset(name: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(path, {"model": {...}, "train": {...}}) of a preset by name or path; a clear ValueError otherwise."""
    from racm3.errors import read_preset_file

    path, raw = read_preset_file(name, PRESET_DIR, "image tokenizer")
    if not isinstance(raw.get("model"), dict) or not isinstance(raw.get("train", {}), dict) or \
            set(raw) - {"model", "train"}:
        raise ValueError(f'{path}: a preset is a JSON object {{"about": "...", "model": {{...}}, "train": {{...}}}}')
    return path, {"model": raw["model"], "train": raw.get("train", {})}


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class Encoder(nn.Module):
    """[B, 3, S, S] in [-1, 1] -> latents [B, latent_dim, S/2^L, S/2^L]."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            layers += [ResBlock(c) for _ in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, ch[i + 1], 4, stride=2, padding=1))  # halves the side
        layers += [nn.GroupNorm(min(8, ch[-1]), ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Quantized latents [B, latent_dim, h, w] -> images [B, 3, S, S] in [-1, 1] (unclamped)."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        ch = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            layers += [ResBlock(c) for _ in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                # nearest upsampling + conv: no checkerboard artefacts of transposed convolutions
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, ch[i + 1], 3, padding=1)]
        layers += [nn.GroupNorm(min(8, ch[-1]), ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ImageTokenizer(nn.Module):
    """encode(images) -> codes [B, N]; decode(codes) -> images [B, 3, H, W] in [0, 1]. N = grid h * w."""

    def __init__(self, config: ImageTokenizerConfig | str | os.PathLike = "emoji-8x8") -> None:
        super().__init__()
        from vector_quantize_pytorch import FSQ, VectorQuantize  # heavy import kept off module import

        self.config = config if isinstance(config, ImageTokenizerConfig) else ImageTokenizerConfig.from_preset(config)
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.quantizer == "fsq":
            self.quantizer = FSQ(levels=list(cfg.fsq_levels), dim=cfg.latent_dim)
        else:
            self.quantizer = VectorQuantize(
                dim=cfg.latent_dim,
                codebook_size=cfg.codebook_size,
                codebook_dim=cfg.codebook_dim,
                use_cosine_sim=cfg.use_cosine_sim,
                kmeans_init=cfg.kmeans_init,
                kmeans_iters=10,
                decay=cfg.ema_decay,
                threshold_ema_dead_code=cfg.dead_code_threshold,
                commitment_weight=cfg.commitment_weight,
            )

    # --- shape facts --------------------------------------------------------------------------------
    codebook_size = property(lambda self: self.config.codebook_size)
    grid = property(lambda self: self.config.grid)
    tokens_per_image = property(lambda self: self.config.tokens_per_image)
    image_size = property(lambda self: self.config.image_size)

    def code_fingerprint(self) -> str:
        """12 hex digits naming what the codes mean: a hash of the encoder and codebook (float16-rounded, so a
        float16 copy keeps it). A generator records it; the decoder may be retrained without changing it."""
        import hashlib

        h = hashlib.sha256()
        if self.config.quantizer == "fsq":
            h.update(repr(self.config.fsq_levels).encode())
        for key, value in sorted(self.state_dict().items()):
            # the encoder, the projection into the lookup space and the codebook: not the EMA statistics
            if key.startswith(("encoder.", "quantizer.project_in.")) or key.endswith("_codebook.embed"):
                h.update(key.encode())
                h.update(value.detach().cpu().to(torch.float16).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] -> the quantized latents [B, N, latent_dim] they stand for (codebook rows, projected out)."""
        codes = codes.to(next(self.parameters()).device)
        with torch.autocast(codes.device.type, enabled=False):
            if self.config.quantizer == "fsq":
                return self.quantizer.indices_to_codes(codes)
            return self.quantizer.get_output_from_indices(codes)

    # --- pixels <-> tensors -------------------------------------------------------------------------
    def to_tensor(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL list or float [B, 3, H, W] in [0, 1] -> float [B, 3, S, S] in [0, 1], resized to image_size."""
        s = self.image_size
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected images as a float tensor [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
            if x.shape[-2:] != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            return x
        arrays = []
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"expected PIL images, got {type(im).__name__}")
            if im.mode != "RGB":
                raise ValueError(f"expected an RGB image, got mode {im.mode}; convert with racm3.documents.to_rgb")
            if im.size != (s, s):
                im = im.resize((s, s), Image.Resampling.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.uint8))
        if not arrays:
            return torch.zeros(0, 3, s, s)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """float [B, 3, H, W] in [0, 1] -> list of RGB PIL images."""
        arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arr]

    # --- the model ----------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] in [0, 1] -> (quantized latents [B, N, D], codes [B, N], commitment loss)."""
        z = self.encoder(x * 2 - 1)  # [B, D, h, w]
        z = z.flatten(2).transpose(1, 2).float()  # [B, N, D], cells in row-major order
        with torch.autocast(z.device.type, enabled=False):  # k-means, EMA and distances stay in float32
            if self.config.quantizer == "fsq":
                q, codes = self.quantizer(z)
                return q, codes, z.new_zeros(())  # nothing to commit to: the levels are fixed
            return self.quantizer(z)

    def decode_latents(self, q: torch.Tensor, decoder: nn.Module | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, 3, S, S] in [0, 1] space (unclamped, for the loss); decoder: self.decoder or it
        wrapped (DDP)."""
        h, w = self.grid
        z = q.transpose(1, 2).reshape(q.shape[0], -1, h, w)  # [B, D, h, w]
        return ((decoder or self.decoder)(z) + 1) / 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] in [0, 1] -> (reconstruction [B, 3, S, S], codes [B, N], commitment loss)."""
        q, codes, commit = self.quantize(x)
        return self.decode_latents(q), codes, commit

    @torch.no_grad()
    def encode(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL RGB list or float [B, 3, H, W] in [0, 1] -> LongTensor [B, N] of codes in [0, codebook_size)."""
        was_training = self.training
        self.eval()
        try:
            x = self.to_tensor(images).to(next(self.parameters()).device)
            return self.quantize(x)[1].long()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, N] -> float [B, 3, S, S] in [0, 1]."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected codes [B, {self.tokens_per_image}], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        return self.decode_latents(self.lookup(codes)).clamp(0, 1)

    # --- persistence (Hugging Face layout: config.json + model.safetensors) -------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
                 for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})
        os.replace(tmp, out / WEIGHTS_FILE)  # never leave half a checkpoint behind
        (out / CONFIG_FILE).write_text(json.dumps({"model_type": MODEL_TYPE, **self.config.to_dict()}, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "ImageTokenizer":
        from racm3.errors import ModelFolderError, load_safetensors, one_line, read_json_object

        d = Path(directory)
        cfg_file, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
        hint = "train one with `racm3 train image-tokenizer DATASET_DIR OUT_DIR`"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: missing; {d} is not an image tokenizer folder ({hint})")
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; the image tokenizer's weights are not in {d} ({hint})")
        fix = f"restore {d} from the model it came from or retrain it ({hint})"
        raw = read_json_object(cfg_file, fix)
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ModelFolderError(f"{cfg_file}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
        try:
            model = cls(ImageTokenizerConfig.from_dict(raw))
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise ModelFolderError(f"{cfg_file}: not an image tokenizer config ({one_line(exc)}); {fix}") from None
        state = load_safetensors(weights, fix, device=map_location)
        ref = model.state_dict()
        state = {k: (v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v) for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:3]
            raise ModelFolderError(f"{weights} does not match {cfg_file} ({' '.join(first)}); the two files come "
                                   "from different models: re-save the tokenizer or retrain it") from None
        # A loaded tokenizer is fixed: even a never-trained one must not k-means-initialise its codebook from
        # the first images it encodes (codes would depend on what was encoded first).
        if model.config.quantizer == "vq":
            model.quantizer._codebook.initted.fill_(True)
        return model.eval()
