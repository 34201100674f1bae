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
    # a pointer over the context (RACM3ForCausalLM, "copy head"): p = g p_vocab + (1 - g) p_copy, where p_copy
    # attends over earlier positions and puts their next text token's probability on it, so a caption piece
    # seen only a few times in training is copied from a retrieved caption as easily as a frequent one
    copy_head: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_len > self.image_base:
            raise ValueError(f"max_len {self.max_len} must not exceed image_base {self.image_base}")
        if self.image_head not in ("full", "factorized"):
            raise ValueError(f"image_head must be 'full' or 'factorized', got {self.image_head!r}")
        if self.text_after_image not in TEXT_AFTER_IMAGE:
            raise ValueError(f"text_after_image must be one of {TEXT_AFTER_IMAGE}, got {self.text_after_image!r}")


COPY_GATE_START = 3.0  # the copy head's gate bias at initialisation: g = sigmoid(3) = 0.95 on the vocabulary

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


class CopyCache:
    """What the copy head keeps while decoding, beside the KV cache: each position's pointer key and the token
    that came after it (the token the pointer copies from there). Allocated at the first call."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: torch.Tensor | None = None  # [B, capacity, H]
        self.next_ids: torch.Tensor | None = None  # [B, capacity]; -1 where the next token is not known yet

    def write(self, start: int, keys: torch.Tensor, ids: torch.Tensor) -> int:
        """Store the keys of positions start.. and the ids written there; returns the positions now filled."""
        B, n = ids.shape
        if self.keys is None:
            self.keys = keys.new_zeros((B, self.capacity, keys.shape[-1]))
            self.next_ids = ids.new_full((B, self.capacity), -1)
        self.keys[:, start:start + n] = keys
        if start > 0:
            self.next_ids[:, start - 1] = ids[:, 0]
        self.next_ids[:, start:start + n - 1] = ids[:, 1:]
        return start + n

    def reorder(self, rows: torch.Tensor) -> None:
        self.keys, self.next_ids = self.keys[rows], self.next_ids[rows]


class RACM3ForCausalLM(LlamaForCausalLM):
    """Llama over the unified vocabulary; with config.code_split = [G1, G2] an image code is one token in two parts.

    Code c = c1 * G2 + c2 enters as embed[image_offset + c1] + code_embed[c2], and leaves as
    p(c) = p(c1 | h) * p(c2 | h, c1): the first part is a row of the ordinary output layer (so text, specials and
    the image's first part share one softmax), the second a small head conditioned on c1. The output layer has
    G1 + G2 image rows instead of G1 * G2 (Open-MAGVIT2's sub-token prediction: Luo et al. 2024), the
    probability is exact (no independence assumption), and the logits this model returns over the full
    vocabulary have exactly that softmax, so decoding and guidance are unchanged.

    With config.copy_head = [lo, hi] a pointer-generator head (See et al. 2017) mixes that distribution with a
    copy distribution: p(w) = g p_vocab(w) + (1 - g) sum_j a_j [x_{j+1} = w], where a attends from the last
    hidden state over earlier positions j whose next token x_{j+1} is a text id in [lo, hi) (query and key
    rotated by the model's RoPE, so the aligned positions of a retrieved caption and of the caption being
    written meet at distance 0), and g = sigmoid(w_g . h). Its "logits" are then log-probabilities (normalised,
    so log_softmax, temperature and guidance treat them as before). Without either option it is LlamaForCausalLM.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.split = tuple(getattr(config, "code_split", None) or ())
        self.copy_range = tuple(getattr(config, "copy_head", None) or ())
        h = config.hidden_size
        if self.split:
            g1, g2 = self.split
            self.code_embed = nn.Embedding(g2, h)  # the second part's input embedding
            self.code_cond = nn.Embedding(g1, h)  # the first part, as the second part's condition
            self.code_proj = nn.Linear(h, h, bias=False)
            self.code_head = nn.Linear(h, g2, bias=False)
        if self.copy_range:
            self.copy_query = nn.Linear(h, h, bias=False)
            self.copy_key = nn.Linear(h, h, bias=False)
            self.copy_gate = nn.Linear(h, 1)
        if self.split or self.copy_range:
            self.post_init()  # the parts above were made after LlamaForCausalLM initialised its own
        if self.copy_range:  # start near the vocabulary alone (g ~ 0.95), so a fine-tuning starts where its start was
            with torch.no_grad():
                self.copy_gate.bias.fill_(COPY_GATE_START)

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
                copy_cache: CopyCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """As LlamaForCausalLM; per_token_nll=True returns .loss = -log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1]
        and no logits (what training needs, without the full-vocabulary logits of every position). With a copy
        head, a KV-cached call passes copy_cache (CopyCache) and cache_position too."""
        if not self.split and not self.copy_range:
            if not per_token_nll:
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       logits_to_keep=logits_to_keep, **kwargs)
            logits = super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, **kwargs).logits
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
            return CausalLMOutputWithPast(loss=nll)
        unsupported = sorted(k for k in ("labels", "inputs_embeds", "output_hidden_states", "output_attentions")
                             if kwargs.get(k) is not None and kwargs.get(k) is not False)
        if unsupported:  # Hugging Face options these heads do not implement: refused, never silently dropped
            raise TypeError(f"RACM3ForCausalLM with code_split or copy_head does not take {', '.join(unsupported)}; "
                            "per_token_nll=True gives the training loss")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "inputs_embeds")}
        if position_ids is None:
            start = int(kwargs["cache_position"][0]) if kwargs.get("cache_position") is not None else 0
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        embeds = self._embed(input_ids) if self.split else self.model.embed_tokens(input_ids)
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
        if per_token_nll:
            nll = self._nll(hidden[:, :-1], input_ids[:, 1:])
            if self.copy_range:
                nll = self._copy_nll(hidden, input_ids, position_ids, nll)
            return CausalLMOutputWithPast(loss=nll)
        T = hidden.shape[1]
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers allows
            keep = logits_to_keep
        else:
            keep = torch.arange(T - logits_to_keep if logits_to_keep else 0, T, device=hidden.device)
        logits = self._joint_logits(hidden[:, keep])
        if self.copy_range:
            logits = self._copy_logprobs(hidden, keep, input_ids, position_ids, attention_mask, copy_cache,
                                         kwargs.get("cache_position"), logits)
        return CausalLMOutputWithPast(logits=logits)

    # --- the copy head ------------------------------------------------------------------------------------
    def _pointer(self, hidden: torch.Tensor, position_ids: torch.Tensor, which: str) -> torch.Tensor:
        """Pointer queries or keys [B, T, H], rotated by RoPE per head as the attention's are."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        x = (self.copy_query if which == "query" else self.copy_key)(hidden)
        B, T, H = x.shape
        heads = self.config.num_attention_heads
        x = x.view(B, T, heads, H // heads).transpose(1, 2)
        cos, sin = self.model.rotary_emb(x, position_ids)
        x, _ = apply_rotary_pos_emb(x, x, cos, sin)
        return x.transpose(1, 2).reshape(B, T, H)

    def _copyable(self, ids: torch.Tensor) -> torch.Tensor:
        lo, hi = self.copy_range
        return (ids >= lo) & (ids < hi)

    def _copy_nll(self, hidden: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, vocab_nll: torch.Tensor) -> torch.Tensor:
        """-log of the mixture at every next token [B, T-1], from the vocabulary's -log p (vocab_nll)."""
        T = ids.shape[1]
        q = self._pointer(hidden[:, :-1], pos[:, :-1], "query")  # query t predicts ids[t+1]
        k = self._pointer(hidden[:, :-1], pos[:, :-1], "key")  # key j offers ids[j+1]
        nxt = ids[:, 1:]
        valid = torch.ones(T - 1, T - 1, dtype=torch.bool, device=ids.device).tril(-1) & self._copyable(nxt)[:, None, :]
        scores = (q @ k.transpose(1, 2)).float() / math.sqrt(q.shape[-1])
        attn = torch.softmax(scores.masked_fill(~valid, -1e9), dim=-1)
        p_copy = (attn * (valid & (nxt[:, None, :] == nxt[:, :, None]))).sum(-1)
        # clamped: where nothing in context matches, the copy term's log is finite and its gradient 0, not NaN
        return -self._mix(hidden[:, :-1], -vocab_nll, torch.log(p_copy.clamp(min=1e-30)), valid.any(-1))

    def _mix(self, h: torch.Tensor, logp_vocab: torch.Tensor, logp_copy: torch.Tensor, has_context: torch.Tensor) -> torch.Tensor:
        """log(g p_vocab + (1 - g) p_copy), or log p_vocab where no earlier position offers a copy."""
        z = self.copy_gate(h).float().squeeze(-1)
        if logp_vocab.dim() > z.dim():  # over the vocabulary
            z, has_context = z.unsqueeze(-1), has_context.unsqueeze(-1)
        mixed = torch.logaddexp(F.logsigmoid(z) + logp_vocab, F.logsigmoid(-z) + logp_copy)
        return torch.where(has_context, mixed, logp_vocab)

    def _copy_logprobs(self, hidden, keep, ids, pos, attention_mask, cache, cache_position, logits) -> torch.Tensor:
        """The mixture's log-probabilities over the vocabulary at the kept positions [B, K, V]."""
        B, n = ids.shape
        keys = self._pointer(hidden, pos, "key")
        if cache is not None:  # keys and next ids of every earlier call, and of this one
            start = int(cache_position[0]) if cache_position is not None else 0
            end = cache.write(start, keys, ids)
            keys, nxt = cache.keys[:, :end], cache.next_ids[:, :end]
        else:
            start, end = 0, n
            nxt = torch.cat([ids[:, 1:], ids.new_full((B, 1), -1)], dim=1)
        query_at = start + keep  # absolute positions of the kept queries
        q = self._pointer(hidden[:, keep], pos[:, keep], "query")
        before = torch.arange(end, device=ids.device)[None, :] < query_at[:, None]  # [K, end]: j < t
        valid = before[None] & self._copyable(nxt)[:, None, :]
        if attention_mask is not None:  # left padding
            valid &= attention_mask[:, None, :end].bool()
        scores = (q @ keys.transpose(1, 2)).float() / math.sqrt(q.shape[-1])
        attn = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0) * valid
        p_copy = torch.zeros_like(logits).scatter_add_(-1, nxt.clamp(min=0)[:, None, :].expand_as(attn), attn)
        return self._mix(hidden[:, keep], torch.log_softmax(logits, dim=-1), torch.log(p_copy), valid.any(-1))

    def _nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return F.cross_entropy(self.lm_head(h).float().transpose(1, 2), target, reduction="none")
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
        if not self.split:
            return lm
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
    if cfg.copy_head:  # the text ids it may copy
        extra["copy_head"] = [vocab.text_offset, vocab.image_offset]
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
    copy = getattr(config, "copy_head", None)
    vocab = Vocab(meta["text_size"], meta["image_size"])
    if copy is not None and copy != [vocab.text_offset, vocab.image_offset]:
        raise ModelFolderError(f"{cfg_file}: copy_head {copy} is not the text ids [{vocab.text_offset}, "
                               f"{vocab.image_offset}] of {meta_file}; {hint}")
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
