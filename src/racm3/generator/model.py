"""The RA-CM3 generator: a decoder-only Llama over the unified vocabulary, with presets as data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from racm3.tokenizers.sequence import DEFAULT_IMAGE_BASE
from racm3.tokenizers.vocab import Vocab

RACM3_FILE = "racm3.json"  # beside config.json: what the generator needs beyond the Llama config


@dataclass(frozen=True)
class GeneratorConfig:
    """Transformer size; the vocabulary and image layout come from the tokenizers."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int = 688
    max_len: int = 384  # the context: every training sequence and inference prompt (+ output) fits in it
    image_base: int = DEFAULT_IMAGE_BASE  # image code k sits at RoPE position image_base + k (image-aligned)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_len > self.image_base:
            raise ValueError(f"max_len {self.max_len} must not exceed image_base {self.image_base}")


PRESET_DIR = Path(__file__).with_name("presets")  # architectures as data: one JSON file per preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def get_preset(name: str | Path) -> GeneratorConfig:
    """A preset by name (generator/presets/NAME.json) or a path to such a JSON file; unknown keys are refused."""
    from racm3.errors import read_preset_file

    path, raw = read_preset_file(name, PRESET_DIR, "generator")
    unknown = set(raw) - {f.name for f in fields(GeneratorConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown fields {sorted(unknown)}; a preset sets {[f.name for f in fields(GeneratorConfig)]}")
    try:
        return GeneratorConfig(**raw)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None


def build_model(cfg: GeneratorConfig, vocab: Vocab, tokens_per_image: int) -> LlamaForCausalLM:
    """A fresh Llama whose RoPE covers text positions and the image-aligned positions image_base + k."""
    llama = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.image_base + tokens_per_image,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,  # input and output embeddings shared: a third fewer parameters at this size
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(llama)
    model.racm3 = {"generator": asdict(cfg), "text_size": vocab.text_size, "image_size": vocab.image_size,
                   "tokens_per_image": tokens_per_image}
    return model


def save_generator(model: LlamaForCausalLM, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors (Hugging Face layout) + racm3.json; dtype=bfloat16 halves the size.

    Written to a temporary folder beside out_dir and moved in file by file (weights last), so a kill
    mid-save never leaves a truncated model.safetensors.
    """
    import copy
    import os
    import shutil
    import tempfile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        to_save = copy.deepcopy(model).to(dtype)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
    try:
        to_save.save_pretrained(tmp, safe_serialization=True)
        (tmp / RACM3_FILE).write_text(json.dumps(model.racm3, indent=2))
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "model.safetensors"):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_generator(path: str | Path) -> LlamaForCausalLM:
    """Load a generator folder; float32 for decoding (bf16 cached and uncached decoding disagree, docs/design.md).

    A missing, truncated or foreign file raises ModelFolderError naming it; weights of another shape than
    config.json builds are refused before transformers would re-initialise them.
    """
    from racm3.errors import ModelFolderError, check_shapes, one_line, read_json_object, safetensors_shapes

    path = Path(path)
    meta_file = path / RACM3_FILE
    if not (path / "config.json").exists() or not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a racm3 generator folder (config.json and {RACM3_FILE} expected); "
                                "train one with `racm3 train generator`")
    hint = f"restore {path} from the model it came from or retrain it with `racm3 train generator`"
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    meta = read_json_object(meta_file, hint)
    settings = meta.get("generator")
    needed = ("text_size", "image_size", "tokens_per_image")
    if (not isinstance(settings, dict) or not isinstance(settings.get("image_base"), int)
            or not all(isinstance(meta.get(k), int) for k in needed)):
        raise ModelFolderError(f"{meta_file}: needs generator.image_base and {', '.join(needed)} as integers; {hint}")
    read_json_object(cfg_file, hint)
    try:
        config = LlamaConfig.from_pretrained(path)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = LlamaForCausalLM(config).state_dict()
    except Exception as exc:  # transformers validates fields with its own (non-ValueError) exception types
        raise ModelFolderError(f"{cfg_file}: not a Llama config this project can build ({one_line(exc)}); "
                               f"{hint}") from None
    tied = frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()
    check_shapes(weights, expected, safetensors_shapes(weights, hint), cfg_file, hint, optional=tied)
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelFolderError(f"{weights}: cannot be loaded ({one_line(exc)}); {hint}") from None
    model.racm3 = meta
    names = {f.name for f in fields(GeneratorConfig)}
    model.racm3["generator"] = {k: v for k, v in settings.items() if k in names}
    model.eval()
    return model


def check_vocab(model: LlamaForCausalLM, vocab: Vocab, tokens_per_image: int, where: str = "",
                image_codes: str | None = None) -> None:
    """Refuse a generator trained with other tokenizers: its ids would mean other tokens. image_codes is the
    image tokenizer's code_fingerprint(), compared with the one recorded at training (older generators: none)."""
    meta = model.racm3
    if image_codes and meta.get("image_codes") and meta["image_codes"] != image_codes:
        raise ValueError(f"generator {where} was trained on the codes of image tokenizer {meta['image_codes']}, "
                         f"but this image tokenizer's codes are {image_codes}: its image ids would mean other "
                         "pictures; use the image tokenizer it was trained with, or retrain the generator")
    mine = (meta["text_size"], meta["image_size"], meta["tokens_per_image"])
    theirs = (vocab.text_size, vocab.image_size, tokens_per_image)
    if mine != theirs:
        raise ValueError(f"generator {where} was trained for text/image vocabularies and tokens per image {mine}, "
                         f"but the tokenizers give {theirs}: use the tokenizers it was trained with")
