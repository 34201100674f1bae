"""The RA-CM3 generator: a decoder-only Llama over the unified vocabulary, with presets as data."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from racm3.tokenizers.sequence import DEFAULT_IMAGE_BASE, TEXT_AFTER_IMAGE
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
    # "full": one output row per image code; "factorized": a code is predicted in two parts (RACM3ForCausalLM),
    # so a 15,360-code FSQ tokenizer costs the output layer 240 + 64 rows instead of 15,360
    image_head: str = "full"
    # "plain": text at its index; "aligned": the text right after an image continues its positions, so a
    # retrieved caption is copied by the same lookup as its image (tokenizers.sequence.position_ids)
    text_after_image: str = "plain"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_len > self.image_base:
            raise ValueError(f"max_len {self.max_len} must not exceed image_base {self.image_base}")
        if self.image_head not in ("full", "factorized"):
            raise ValueError(f"image_head must be 'full' or 'factorized', got {self.image_head!r}")
        if self.text_after_image not in TEXT_AFTER_IMAGE:
            raise ValueError(f"text_after_image must be one of {TEXT_AFTER_IMAGE}, got {self.text_after_image!r}")


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


def code_split(image_size: int, fsq_levels: tuple[int, ...] | None = None) -> tuple[int, int]:
    """(G1, G2) with G1 * G2 = image_size and the least G1 + G2: a code c is the pair (c // G2, c % G2).

    For FSQ codes G2 is a product of leading levels (the fastest-varying digits of the code's mixed-radix
    index), so each part is a group of the quantizer's own dimensions; otherwise any divisor.
    """
    if fsq_levels:
        candidates = [math.prod(fsq_levels[:i]) for i in range(1, len(fsq_levels))]  # plain ints: also under torch.device('meta')
    else:
        candidates = [d for d in range(2, image_size) if image_size % d == 0]
    if not candidates:
        raise ValueError(f"{image_size} image codes cannot be split in two parts; use image_head 'full'")
    g2 = min(candidates, key=lambda d: image_size // d + d)
    return image_size // g2, g2


class RACM3ForCausalLM(LlamaForCausalLM):
    """Llama over the unified vocabulary; with config.code_split = [G1, G2] an image code is one token in two parts.

    Code c = c1 * G2 + c2 enters as embed[image_offset + c1] + code_embed[c2], and leaves as
    p(c) = p(c1 | h) * p(c2 | h, c1): the first part is a row of the ordinary output layer (so text, specials and
    the image's first part share one softmax), the second a small head conditioned on c1. The output layer has
    G1 + G2 image rows instead of G1 * G2 (Open-MAGVIT2's sub-token prediction: Luo et al. 2024), the
    probability is exact (no independence assumption), and the logits this model returns over the full
    vocabulary have exactly that softmax, so decoding and guidance are unchanged. Without code_split it is
    LlamaForCausalLM.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.split = tuple(getattr(config, "code_split", None) or ())
        if self.split:
            g1, g2 = self.split
            h = config.hidden_size
            self.code_embed = nn.Embedding(g2, h)  # the second part's input embedding
            self.code_cond = nn.Embedding(g1, h)  # the first part, as the second part's condition
            self.code_proj = nn.Linear(h, h, bias=False)
            self.code_head = nn.Linear(h, g2, bias=False)
            self.post_init()  # the parts above were made after LlamaForCausalLM initialised its own

    @property
    def code_offset(self) -> int:
        return self.config.vocab_size - self.split[0]  # the trunk's vocabulary ends with the G1 first parts

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        off, g2 = self.code_offset, self.split[1]
        image = ids >= off
        code = (ids - off).clamp(min=0)
        trunk = torch.where(image, off + code // g2, ids)
        return self.model.embed_tokens(trunk) + self.code_embed(code % g2) * image.unsqueeze(-1)

    def _second(self, h: torch.Tensor, c1: torch.Tensor | None) -> torch.Tensor:
        """Logits of c2 given h [..., H] and c1 [...]; c1 None: for every c1, [..., G1, G2]."""
        u = self.code_proj(h)
        z = u + self.code_cond(c1) if c1 is not None else u.unsqueeze(-2) + self.code_cond.weight
        return self.code_head(F.silu(z))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, per_token_nll: bool = False,
                **kwargs) -> CausalLMOutputWithPast:
        """As LlamaForCausalLM; per_token_nll=True returns .loss = -log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1]
        and no logits (what training needs, without the full-vocabulary logits of every position)."""
        if not self.split:
            if not per_token_nll:
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       logits_to_keep=logits_to_keep, **kwargs)
            logits = super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, **kwargs).logits
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
            return CausalLMOutputWithPast(loss=nll)
        unsupported = sorted(k for k in ("labels", "inputs_embeds", "output_hidden_states", "output_attentions")
                             if kwargs.get(k) is not None and kwargs.get(k) is not False)
        if unsupported:  # Hugging Face options this head does not implement: refused, never silently dropped
            raise TypeError(f"RACM3ForCausalLM with code_split does not take {', '.join(unsupported)}; "
                            "per_token_nll=True gives the training loss")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "inputs_embeds")}
        hidden = self.model(inputs_embeds=self._embed(input_ids), attention_mask=attention_mask,
                            position_ids=position_ids, **kwargs).last_hidden_state
        if per_token_nll:
            return CausalLMOutputWithPast(loss=self._nll(hidden[:, :-1], input_ids[:, 1:]))
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers allows
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self._joint_logits(hidden))

    def _nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        off, g2 = self.code_offset, self.split[1]
        image = target >= off
        code = (target - off).clamp(min=0)
        first = torch.where(image, off + code // g2, target)
        nll = F.cross_entropy(self.lm_head(h).float().transpose(1, 2), first, reduction="none")
        second = F.cross_entropy(self._second(h[image], (code // g2)[image]).float(), (code % g2)[image],
                                 reduction="none")
        return nll + torch.zeros_like(nll).masked_scatter(image, second)

    def _joint_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary [..., specials + text + G1 * G2] whose softmax is the model's p."""
        lm = self.lm_head(h).float()
        off = self.code_offset
        second = torch.log_softmax(self._second(h, None).float(), dim=-1)  # [..., G1, G2]
        return torch.cat([lm[..., :off], (lm[..., off:, None] + second).flatten(-2)], dim=-1)


def build_model(cfg: GeneratorConfig, vocab: Vocab, tokens_per_image: int,
                fsq_levels: tuple[int, ...] | None = None) -> RACM3ForCausalLM:
    """A fresh Llama whose RoPE covers text positions and the image-aligned positions image_base + k.

    image_head "factorized" splits the image codes by code_split (fsq_levels: the image tokenizer's, if FSQ).
    """
    split = code_split(vocab.image_size, fsq_levels) if cfg.image_head == "factorized" else None
    extra = {"code_split": list(split)} if split else {}
    llama = LlamaConfig(
        vocab_size=vocab.image_offset + split[0] if split else vocab.size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        # aligned text after an image runs past its cells, at most a context's length
        max_position_embeddings=cfg.image_base + tokens_per_image + (1 + cfg.max_len if cfg.text_after_image == "aligned" else 0),
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,  # input and output embeddings shared: a third fewer parameters at this size
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        rope_theta=10000.0,
        **extra,
    )
    model = RACM3ForCausalLM(llama)
    model.racm3 = {"generator": asdict(cfg), "text_size": vocab.text_size, "image_size": vocab.image_size,
                   "tokens_per_image": tokens_per_image}
    return model


def save_generator(model: RACM3ForCausalLM, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
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


def load_generator(path: str | Path) -> RACM3ForCausalLM:
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
            expected = RACM3ForCausalLM(config).state_dict()
    except Exception as exc:  # transformers validates fields with its own (non-ValueError) exception types
        raise ModelFolderError(f"{cfg_file}: not a Llama config this project can build ({one_line(exc)}); "
                               f"{hint}") from None
    split = getattr(config, "code_split", None)
    if split is not None and (not isinstance(split, list) or len(split) != 2 or split[0] * split[1] != meta["image_size"]
                              or config.vocab_size != Vocab(meta["text_size"], meta["image_size"]).image_offset + split[0]):
        raise ModelFolderError(f"{cfg_file}: code_split {split} does not split the {meta['image_size']} image codes "
                               f"of {meta_file} with vocab_size {config.vocab_size}; {hint}")
    tied = frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()
    check_shapes(weights, expected, safetensors_shapes(weights, hint), cfg_file, hint, optional=tied)
    try:
        model = RACM3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelFolderError(f"{weights}: cannot be loaded ({one_line(exc)}); {hint}") from None
    model.racm3 = meta
    names = {f.name for f in fields(GeneratorConfig)}
    model.racm3["generator"] = {k: v for k, v in settings.items() if k in names}
    model.eval()
    return model


def text_after_image(model) -> str:
    """The position rule for text after an image that a generator was trained with ("plain" before the option)."""
    return getattr(model, "racm3", {}).get("generator", {}).get("text_after_image", "plain")


def check_vocab(model: RACM3ForCausalLM, vocab: Vocab, tokens_per_image: int, where: str = "",
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
