"""Decoding as small functions: modality-constrained sampling, classifier-free guidance, prefill and KV-cached steps.

A caption->image prompt ends with <img>: exactly N image codes follow, each chosen among image ids only.
An image->caption prompt ends with </img>: text ids follow (or <eos>, after at least one token).
Guidance (CM3Leon, Yu et al. 2023, Sec. 3.2) mixes a conditional stream with an unconditional one whose
prompt is masked: logp = logp_u + s * (logp_c - logp_u); s = 1 is plain conditional decoding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, StaticCache

from racm3.generator.model import CopyCache, text_after_image
from racm3.tokenizers.sequence import position_ids
from racm3.tokenizers.vocab import Vocab


# transformers renamed `past_key_values` to `cache` (5.x deprecates the old name); use what this version takes.
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; guidance 1 = no unconditional stream."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.guidance < 0:
            raise ValueError(f"invalid sampling settings {self}")


def allowed_ids(vocab: Vocab, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [V]: the ids a position may take. 'image' = image codes; 'text' = text ids and <eos>."""
    ids = torch.arange(vocab.size, device=device)
    if kind == "image":
        return vocab.is_image(ids)
    if kind == "text":
        return vocab.is_text(ids) | (ids == vocab.eos_id)
    raise ValueError(f"unknown modality {kind!r}")


def constrained_logprobs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log-softmax over the allowed ids only; -inf elsewhere. logits [B, V], allowed [V] or [B, V]."""
    return torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log-probabilities [B, V]; -inf stays -inf (disallowed ids)."""
    if uncond is None or scale == 1.0:
        return cond
    mixed = uncond + scale * (cond - uncond)
    return mixed.masked_fill(torch.isinf(cond), float("-inf"))


NUCLEUS_FIRST_TRY = 256  # ids searched for the top-p nucleus before a full sort


def filter_top(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k ids and the smallest set whose probability reaches top_p; others get -inf."""
    if top_k > 0:
        kth = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        # The nucleus is rarely more than a few hundred ids: look for it among the top 256 (a partial sort,
        # ~8x cheaper than sorting 17k ids) and sort everything only when some row's top 256 fall short of top_p.
        V = logp.shape[-1]
        for m in (min(NUCLEUS_FIRST_TRY, V), V):
            top, order = torch.topk(logp, m, dim=-1)  # descending
            probs = torch.softmax(top, dim=-1) if m == V else torch.softmax(logp, dim=-1).gather(-1, order)
            cum = probs.cumsum(-1)
            if m == V or bool((cum[..., -1] >= top_p).all()):  # one host sync per decoding step
                break
        # keep an id while the mass before it is below top_p (the first id is always kept); past the top m, none
        keep = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, cum - probs < top_p)
        logp = logp.masked_fill(~keep, float("-inf"))
    return logp


def sample(logp: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row [B] from log-probabilities [B, V]."""
    if s.temperature == 0:
        return logp.argmax(-1)
    logp = filter_top(logp / s.temperature, s.top_k, s.top_p)
    return torch.multinomial(torch.softmax(logp, -1), 1, generator=generator).squeeze(-1)


class Streams:
    """A left-padded batch of prompts decoded together, with or without a KV cache.

    Rows are independent sequences (samples, and the unconditional copies used by guidance). Positions
    follow the image-aligned rule of tokenizers.sequence.position_ids; the caller gives each new token's.
    Everything that grows is allocated once for prompt + max_new tokens: a static KV cache and the attention
    mask (a view of it is passed each step), so a decoding step copies nothing that came before it.
    """

    def __init__(self, model, prompts: list[list[int]], vocab: Vocab, image_base: int, tokens_per_image: int,
                 use_cache: bool = True, max_new: int = 0):
        self.model, self.use_cache = model, use_cache
        device = next(model.parameters()).device
        T = max(len(p) for p in prompts)
        B = len(prompts)
        total = T + max_new
        ids = torch.full((B, total), vocab.pad_id, dtype=torch.long)  # [B, prompt + new], prompts left-padded
        mask = torch.ones((B, total), dtype=torch.long)  # a view [:, :length] is passed: new tokens count as filled
        pos = torch.zeros((B, total), dtype=torch.long)
        rule = text_after_image(model)
        next_text = []
        for b, p in enumerate(prompts):
            ids[b, T - len(p):T] = torch.tensor(p)
            mask[b, :T - len(p)] = 0
            # the prompt and one text token more: where the first text token written after it sits (its plain
            # index, or right after an image's cells where the model aligns text after images); each next +1
            with_text = position_ids([*p, vocab.text_offset], vocab, image_base, tokens_per_image, rule)
            pos[b, T - len(p):T] = with_text[:-1]
            next_text.append(int(with_text[-1]))
        self.ids, self.mask, self.pos = ids.to(device), mask.to(device), pos.to(device)
        self.next_text = torch.tensor(next_text, device=device)
        self.length, self.capacity = T, total
        self.cache = StaticCache(config=model.config, max_cache_len=total) if use_cache else None
        # a copy head keeps its pointer keys beside the KV cache (RACM3ForCausalLM)
        self.copy = CopyCache(total) if use_cache and getattr(model, "copy_range", ()) else None
        # samples share their prompt (and guidance's copies theirs): each distinct prompt is prefilled once and
        # its cache rows copied to every stream that starts from it (8 samples: an 8x smaller prefill)
        index: dict[tuple[int, ...], int] = {}
        inverse = [index.setdefault(tuple(p), len(index)) for p in prompts]
        if use_cache and len(index) < B:
            first = [inverse.index(u) for u in range(len(index))]
            logits = self._forward(self.ids[first, :T], self.pos[first, :T], rows=first)
            rows = torch.tensor(inverse, device=device)
            self.cache.reorder_cache(rows)  # the cache's public row gather (beam search's)
            if self.copy is not None:
                self.copy.reorder(rows)
            self.logits = logits[rows]
        else:  # every prompt distinct, or the no-cache reference
            self.logits = self._forward(self.ids[:, :T], self.pos[:, :T])

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        n, start = ids.shape[1], self.length - ids.shape[1]
        mask = self.mask[:, :self.length] if rows is None else self.mask[rows, :self.length]
        if self.use_cache:
            extra = {"copy_cache": self.copy} if self.copy is not None else {}
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             cache_position=torch.arange(start, start + n, device=ids.device), **{_CACHE_ARG: self.cache},
                             **extra)
        else:  # recompute the whole prefix: the reference the cache must reproduce
            out = self.model(input_ids=self.ids[:, :self.length], attention_mask=mask,
                             position_ids=self.pos[:, :self.length], use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one token per row [B] at the given positions [B]; returns next-token logits [B, V]."""
        if self.length == self.capacity:
            raise ValueError(f"decoding past the {self.capacity} tokens these streams were allocated for")
        t = self.length
        self.ids[:, t] = tokens
        self.pos[:, t] = positions
        self.length += 1
        self.logits = self._forward(self.ids[:, t:t + 1], self.pos[:, t:t + 1])
        return self.logits


def _split(logits: torch.Tensor, n_cond: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (logits[:n_cond], logits[n_cond:]) if guided else (logits, None)


@torch.no_grad()
def generate_image_codes(model, vocab: Vocab, prompts: list[list[int]], tokens_per_image: int, image_base: int,
                         sampling: Sampling = Sampling(), uncond_prompts: list[list[int]] | None = None,
                         generator: torch.Generator | None = None, use_cache: bool = True,
                         n_codes: int | None = None, first_cell: int = 0) -> torch.Tensor:
    """Codes [B, n] (0..image_size-1); exactly n image ids, nothing else.

    Caption->image: prompts end with <img>, n = N cells from cell 0. Image infilling: prompts end with the
    <mask:i> that opens the tail span, n = the hidden cells, first_cell = the first hidden cell.
    """
    if any(p[-1] != vocab.img_id and not vocab.is_mask(p[-1]) for p in prompts):
        raise ValueError("an image prompt must end with <img> (generation) or <mask:i> (infilling)")
    n_codes = tokens_per_image - first_cell if n_codes is None else n_codes
    if first_cell < 0 or n_codes < 1 or first_cell + n_codes > tokens_per_image:
        raise ValueError(f"cells {first_cell}..{first_cell + n_codes} do not fit an image of {tokens_per_image}")
    guided = uncond_prompts is not None and sampling.guidance != 1.0
    rows = prompts + (uncond_prompts if guided else [])
    streams = Streams(model, rows, vocab, image_base, tokens_per_image, use_cache, max_new=n_codes)
    allowed = allowed_ids(vocab, "image", streams.ids.device)
    B = len(prompts)
    out = []
    for k in range(n_codes):
        cond, uncond = _split(streams.logits, B, guided)
        uncond_lp = constrained_logprobs(uncond, allowed) if uncond is not None else None
        logp = guide(constrained_logprobs(cond, allowed), uncond_lp, sampling.guidance)
        tok = sample(logp, sampling, generator)  # [B]
        out.append(tok)
        if k + 1 < n_codes:
            both = torch.cat([tok, tok]) if guided else tok
            # the code of cell c sits at image_base + c in every image (image-aligned positions)
            streams.step(both, torch.full_like(both, image_base + first_cell + k))
    return vocab.vocab_to_image(torch.stack(out, 1))


@torch.no_grad()
def generate_text_ids(model, vocab: Vocab, prompts: list[list[int]], tokens_per_image: int, image_base: int,
                      sampling: Sampling = Sampling(), max_new_tokens: int = 32,
                      uncond_prompts: list[list[int]] | None = None, generator: torch.Generator | None = None,
                      use_cache: bool = True) -> list[list[int]]:
    """Text vocabulary ids per prompt, up to <eos> (excluded); only text ids are ever produced."""
    guided = uncond_prompts is not None and sampling.guidance != 1.0
    rows = prompts + (uncond_prompts if guided else [])
    streams = Streams(model, rows, vocab, image_base, tokens_per_image, use_cache, max_new=max_new_tokens)
    device = streams.ids.device
    allowed = allowed_ids(vocab, "text", device)
    no_eos = allowed.clone()
    no_eos[vocab.eos_id] = False  # a caption has at least one token
    B = len(prompts)
    toks = torch.full((B, max_new_tokens), vocab.eos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for k in range(max_new_tokens):
        cond, uncond = _split(streams.logits, B, guided)
        mask = no_eos if k == 0 else allowed
        uncond_lp = constrained_logprobs(uncond, mask) if uncond is not None else None
        tok = sample(guide(constrained_logprobs(cond, mask), uncond_lp, sampling.guidance), sampling, generator)
        tok = tok.masked_fill(done, vocab.eos_id)  # a finished row stays finished
        toks[:, k] = tok
        done |= tok == vocab.eos_id
        # one host sync every few tokens to stop early, not one per row and token
        if k + 1 == max_new_tokens or (k % 4 == 3 and bool(done.all())):
            break
        both = torch.cat([tok, tok]) if guided else tok
        streams.step(both, streams.next_text + k)
    return [row[:row.index(vocab.eos_id)] if vocab.eos_id in row else row for row in toks.tolist()]
