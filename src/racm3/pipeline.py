"""RACM3: the public object tying retriever, tokenizers and generator together (caption->image, image->caption)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from racm3.documents import Document, to_rgb
from racm3.generator.data import document_tokens
from racm3.generator.decode import Sampling, generate_image_codes, generate_text_ids
from racm3.generator.model import check_vocab, load_generator
from racm3.retrieval.memory import Hit, Memory
from racm3.tokenizers.multimodal import MultimodalTokenizer
from racm3.tokenizers.sequence import Prompt, task_prompt


@dataclass
class Output:
    """One generation: the best sample, every sample with its encoder score, the sources it drew on."""

    image: Image.Image | None = None
    text: str | None = None
    samples: list = field(default_factory=list)  # images or captions, best first
    scores: list[float] = field(default_factory=list)  # encoder text-image cosine of each sample
    # retrieved (or demonstration) documents in the context, in its order: those the length rule kept
    sources: list[Hit] = field(default_factory=list)
    seconds: float = 0.0
    codes: torch.Tensor | None = None  # image outputs: the VQ codes of each sample [num_samples, N], best first

    def to_json(self) -> dict:
        return {"text": self.text, "scores": self.scores, "seconds": round(self.seconds, 3),
                "sources": [{"id": h.id, "score": None if h.score is None else round(h.score, 4),
                             "text": h.document.text} for h in self.sources]}


def _caption(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the caption must be a non-empty string, got {text!r}")
    return text.strip()


def _prompt_document(segments: Sequence[str | Image.Image]) -> Document:
    """An interleaved prompt as a Document: captions stripped (non-empty), images made RGB."""
    if isinstance(segments, (str, Image.Image)) or not isinstance(segments, Sequence) or not segments:
        raise ValueError(f"segments must be a non-empty list of captions and PIL images, got {segments!r:.60}")
    for s in segments:
        if not isinstance(s, (str, Image.Image)):
            raise TypeError(f"a segment is a caption (str) or a PIL image, got {type(s).__name__}")
    return Document("prompt", tuple(_caption(s) if isinstance(s, str) else to_rgb(s) for s in segments))


class RACM3:
    """Retrieval-augmented generation of images from text and text from images (Yasunaga et al. 2023), and the
    continuation of interleaved documents (continue_document).

    A prompt's top-k documents from a memory (or the given demonstrations) are placed before it as
    `<doc> ... </doc>` blocks, in the same order of caption and image as the prompt, and the generator
    continues: after `<img>` exactly N image codes (caption->image), after `</img>` a caption. Prompts follow
    the training sequence format token for token (tokenizers.sequence.task_prompt), its length rule included:
    documents that do not fit the generator's context are dropped, the worst ranked first, and `.sources` of
    the output lists those that were used.
    """

    def __init__(self, tokenizer: MultimodalTokenizer, generator, encoder, sampling: dict[str, float] | None = None):
        from racm3.pretrained import SAMPLING_DEFAULTS

        self.tokenizer, self.generator, self.encoder = tokenizer, generator, encoder
        # default temperatures (image_temperature, text_temperature): the model folder's sampling.json
        self.sampling = {**SAMPLING_DEFAULTS, **(sampling or {})}
        self.vocab = tokenizer.vocab
        check_vocab(generator, self.vocab, tokenizer.tokens_per_image, image_codes=tokenizer.image_code_fingerprint())
        self.image_base = int(generator.racm3["generator"]["image_base"])
        self.max_len = int(generator.racm3["generator"]["max_len"])  # the context it was trained on
        self.device = next(generator.parameters()).device
        tokenizer.image.to(self.device)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, generator: str = "generator",
                        device: str | torch.device = "auto", dtype: torch.dtype = torch.float32) -> "RACM3":
        """A model folder with text_tokenizer/, image_tokenizer/, encoder/ and a generator folder; None = shipped.

        device: auto (CUDA when present), cpu, cuda or cuda:N; the generator and the image tokenizer run there.
        dtype: the generator's weights; float32 by default, as decoding is evaluated (bf16 cached and uncached
        decoding disagree on some tokens).
        """
        from racm3.generator.train import load_tokenizers
        from racm3.pretrained import read_sampling, shipped_model_dir
        from racm3.retrieval.encoder import load_encoder
        from racm3.runtime import resolve_device

        dev = resolve_device(device)
        root = Path(path) if path is not None else shipped_model_dir()
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no model folder here")
        gen = load_generator(root / generator).to(device=dev, dtype=dtype)
        return cls(load_tokenizers(root), gen, load_encoder(root / "encoder").to(dev), read_sampling(root))

    def _temperature(self, given: float | None, output: str) -> float:
        """The temperature asked for, or the model's default for that output ("image" or "text")."""
        return self.sampling[f"{output}_temperature"] if given is None else given

    def _random(self, seed: int) -> torch.Generator:
        """Sampling's random generator, on the device the logits are on (torch refuses a CPU one for CUDA)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    # --- context -------------------------------------------------------------------------------
    def retrieve(self, query: str | Image.Image | Document, memory: Memory, k: int,
                 exclude_ids: Iterable[str] = ()) -> list[Hit]:
        """Top-k documents by the paper's rules, with no near-duplicate cut: a query found in memory answers itself.
        exclude_ids: documents never returned (a benchmark hiding what a query must not see)."""
        from racm3.retrieval.retriever import Retriever, RetrieverConfig

        if k == 0:
            return []
        return Retriever(memory, self.encoder, RetrieverConfig(k=k, max_similarity=None)).retrieve(
            query, exclude_ids=exclude_ids)

    def _context(self, query, memory: Memory | None, k: int, demos: Sequence[Document] | None,
                 exclude_ids: Iterable[str] = ()) -> list[Hit]:
        if demos is not None:
            return [Hit(d.id, d, None, i) for i, d in enumerate(demos)]  # in-context learning: no retrieval
        if memory is None or k == 0:
            return []
        return self.retrieve(query, memory, k, exclude_ids)

    def check_request(self, k: int, caption: str | None = None, max_new_tokens: int = 32) -> None:
        """Refuse, before any retrieval, a k or a caption the generator's context cannot hold (one-line ValueError).

        With a caption: caption -> image (the caption, <img> and N codes); without: image -> caption (the image
        and up to max_new_tokens). k is refused past the documents that could ever fit beside that query (each
        at least <doc> <img> N codes </img> </doc>); below it, the length rule drops what does not fit.
        """
        n = self.tokenizer.tokens_per_image
        if caption is not None:
            tokens = len(self.tokenizer.text.encode(caption))
            room = self.max_len - 2 - (tokens + 1) - (n + 1)  # <bos>, <eos>; caption <img>; N codes </img>
            if room < 0:
                raise ValueError(f"the caption is {tokens} tokens long ({len(caption)} characters); the generator's "
                                 f"{self.max_len}-token context leaves room for {tokens + room}: shorten the caption")
        else:
            room = self.max_len - 2 - (n + 2) - max_new_tokens
        k_max = max(0, room // (n + 4))
        if k > k_max:
            raise ValueError(f"k={k} is more documents than the generator's {self.max_len}-token context holds "
                             f"(at most {k_max} beside this query); use a smaller k")

    def _prompts(self, sources: list[Hit], text_first: bool, query: list[int], generate: int,
                 uncond_query: list[int] | None = None) -> tuple[Prompt, Prompt | None, list[Hit]]:
        """The prompt (and guidance's unconditional prompt) for a query and its sources, in the training format;
        the sources the length rule kept."""
        docs = [t.ids(text_first) for t in document_tokens([h.document for h in sources], self.tokenizer)]
        prompt = task_prompt(docs, query, self.vocab, generate, self.max_len)
        kept = docs[:prompt.documents]
        uncond = task_prompt(kept, uncond_query, self.vocab, generate, self.max_len) if uncond_query else None
        return prompt, uncond, sources[:prompt.documents]

    # --- caption -> image ----------------------------------------------------------------------------
    def generate_image(self, text: str, memory: Memory | None = None, k: int = 2, num_samples: int = 8,
                       guidance: float = 3.0, temperature: float | None = None, top_k: int = 0, top_p: float = 0.9,
                       seed: int = 0, demos: Sequence[Document] | None = None, rerank: str = "source",
                       exclude_ids: Iterable[str] = ()) -> Output:
        """Sample num_samples images for the caption and keep the best by the encoder's score; exclude_ids are
        memory documents retrieval must not return. temperature None: the model's (self.sampling).

        rerank="caption" is the paper's rule: the text-image score with the caption. rerank="source" (default)
        scores each sample by image similarity to the source whose caption matches the prompt best (the text
        tower is pretrained and knows every name; the image tower cannot name concepts it never saw, so the
        caption score is near chance on held-out concepts), falling back to "caption" without image sources.
        """
        if rerank not in ("caption", "source"):
            raise ValueError(f"rerank must be 'caption' or 'source', got {rerank!r}")
        t0 = time.perf_counter()
        text = _caption(text)
        v, n = self.vocab, self.tokenizer.tokens_per_image
        # CM3Leon: the unconditional stream is the prompt with its caption masked
        prompt, uncond, sources = self._prompts(self._context(text, memory, k, demos, exclude_ids), True,
                                                v.text_to_vocab(self.tokenizer.text.encode(text)) + [v.img_id], n + 1,
                                                uncond_query=[v.mask_id(0), v.img_id])
        codes = generate_image_codes(self.generator, v, [prompt.ids] * num_samples, n, self.image_base,
                                     Sampling(self._temperature(temperature, "image"), top_k, top_p, guidance),
                                     uncond_prompts=[uncond.ids] * num_samples, generator=self._random(seed))
        with torch.no_grad():
            images = self.tokenizer.image.to_pil(self.tokenizer.image.decode(codes))
        scores = (self.encoder.embed_image(images) @ self._rerank_target(text, sources, rerank)).tolist()
        order = sorted(range(num_samples), key=lambda i: -scores[i])
        return Output(image=images[order[0]], samples=[images[i] for i in order], scores=[scores[i] for i in order],
                      sources=sources, seconds=time.perf_counter() - t0, codes=codes[order])

    def _rerank_target(self, text: str, sources: list[Hit], rerank: str):
        """The vector samples are scored against: the caption's, or the image of the best-matching source."""
        caption = self.encoder.embed_text([text])[0]
        drawn = [h.document for h in sources if h.document.image is not None and h.document.text]
        if rerank == "caption" or not drawn:
            return caption
        anchor = drawn[int((self.encoder.embed_text([d.text for d in drawn]) @ caption).argmax())]
        return self.encoder.embed_image([anchor.image])[0]

    def _caption_target(self, image: Image.Image, sources: list[Hit], rerank: str):
        """The vector captions are scored against: the query image's, or the caption of the best-matching source."""
        query = self.encoder.embed_image([image])[0]
        named = [h.document for h in sources if h.document.image is not None and h.document.text]
        if rerank == "image" or not named:
            return query
        anchor = named[int((self.encoder.embed_image([d.image for d in named]) @ query).argmax())]
        return self.encoder.embed_text([anchor.text])[0]

    # --- image -> caption ----------------------------------------------------------------------------
    def generate_text(self, image: Image.Image, memory: Memory | None = None, k: int = 2, num_samples: int = 4,
                      guidance: float = 1.0, temperature: float | None = None, top_k: int = 0, top_p: float = 0.9,
                      max_new_tokens: int = 32, seed: int = 0, demos: Sequence[Document] | None = None,
                      rerank: str = "image", exclude_ids: Iterable[str] = ()) -> Output:
        """Sample num_samples captions for the image and keep the best by the encoder's score; exclude_ids are
        memory documents retrieval must not return. temperature None: the model's (self.sampling).

        rerank="image" is the paper's rule: the text-image score of each caption with the query image.
        rerank="source" scores each caption by text similarity to the caption of the source whose image matches
        the query best (the mirror of generate_image's rule: a held-out drawing's name is known to the text
        tower, and its retrieved twin says which name it is), falling back to "image" without captioned sources.
        """
        if rerank not in ("image", "source"):
            raise ValueError(f"rerank must be 'image' or 'source', got {rerank!r}")
        t0 = time.perf_counter()
        if not isinstance(image, Image.Image):
            raise TypeError(f"generate_text takes a PIL image, got {type(image).__name__}")
        image = to_rgb(image)
        v = self.vocab
        codes = self.tokenizer.encode_images([image])[0].tolist()
        prompt, uncond, sources = self._prompts(self._context(image, memory, k, demos, exclude_ids), False,
                                                [v.img_id, *v.image_to_vocab(codes), v.img_end_id], max_new_tokens,
                                                uncond_query=[v.img_id, v.mask_id(0), v.img_end_id])
        ids = generate_text_ids(self.generator, v, [prompt.ids] * num_samples, self.tokenizer.tokens_per_image,
                                self.image_base, Sampling(self._temperature(temperature, "text"), top_k, top_p, guidance),
                                max_new_tokens=max_new_tokens, uncond_prompts=[uncond.ids] * num_samples,
                                generator=self._random(seed))
        captions = [self.tokenizer.text.decode(v.vocab_to_text(t)).strip() or "?" for t in ids]
        scores = (self.encoder.embed_text(captions) @ self._caption_target(image, sources, rerank)).tolist()
        order = sorted(range(num_samples), key=lambda i: -scores[i])
        return Output(text=captions[order[0]], samples=[captions[i] for i in order],
                      scores=[scores[i] for i in order], sources=sources, seconds=time.perf_counter() - t0)

    # --- interleaved documents: text and images in any order -> an image or text ------------------------------
    def continue_document(self, segments: Sequence[str | Image.Image], output: str = "image",
                          memory: Memory | None = None, k: int = 2, num_samples: int = 4,
                          temperature: float | None = None, top_k: int = 0, top_p: float = 0.9,
                          max_new_tokens: int = 32, seed: int = 0, demos: Sequence[Document] | None = None,
                          exclude_ids: Iterable[str] = ()) -> Output:
        """Continue an interleaved prompt (captions and PIL images in order, e.g. text, image, text) with an image
        (output="image") or text (output="text"), keeping the best of num_samples by the encoder's score.

        The prompt is the training sequence format's (docs/design.md, "Interleaved documents"): the retrieved
        documents (or demos) in context, in the order the prompt begins with, then the prompt's segments in order,
        then `<img>` and N codes (an image), or text until `<eos>`: after an image a new text, after text its
        continuation (.text holds what follows the prompt's last text). The retrieval query is the prompt as a
        document, its vector the renormalised mean of its segments' vectors (the memory's rule); each sample is
        scored by the encoder's cosine with that vector. temperature None: the model's for that output (as
        generate_image and generate_text). No guidance: its unconditional stream masks the prompt in
        one span, and a training span never crosses a text/image boundary, so no such stream was ever trained.
        """
        if output not in ("image", "text"):
            raise ValueError(f"output must be 'image' or 'text', got {output!r}")
        t0 = time.perf_counter()
        doc = _prompt_document(segments)
        v, n, tt = self.vocab, self.tokenizer.tokens_per_image, self.tokenizer.text
        runs = self.tokenizer.document_runs(doc)
        query = [t for run in runs for t in run] + ([v.img_id] if output == "image" else [])
        generate = n + 1 if output == "image" else max_new_tokens  # N codes and </img>, or the text
        if len(query) + generate + 2 > self.max_len:  # with <bos> and <eos>: task_prompt's rule, said for segments
            raise ValueError(f"the prompt is {len(query)} tokens and {generate} more are to be generated, beyond the "
                             f"generator's {self.max_len}-token context even with no document in it: drop a segment")
        prompt, _, sources = self._prompts(self._context(doc, memory, k, demos, exclude_ids),
                                           isinstance(doc.segments[0], str), query, generate)
        target = self.encoder.embed_documents([doc])[0]
        sampling = Sampling(self._temperature(temperature, output), top_k, top_p)
        made = None
        if output == "image":
            made = generate_image_codes(self.generator, v, [prompt.ids] * num_samples, n, self.image_base, sampling,
                                        generator=self._random(seed))
            with torch.no_grad():
                samples = self.tokenizer.image.to_pil(self.tokenizer.image.decode(made))
            scores = (self.encoder.embed_image(samples) @ target).tolist()
        else:
            ids = generate_text_ids(self.generator, v, [prompt.ids] * num_samples, n, self.image_base, sampling,
                                    max_new_tokens=max_new_tokens, generator=self._random(seed))
            # after text, decode together with it (byte-level BPE pieces only join correctly in one sequence) and
            # keep what follows it
            head = v.vocab_to_text(runs[-1]) if isinstance(doc.segments[-1], str) else []
            skip = len(tt.decode(head)) if head else 0
            samples = [tt.decode(head + v.vocab_to_text(t))[skip:].strip() or "?" for t in ids]
            scores = (self.encoder.embed_text(samples) @ target).tolist()
        order = sorted(range(num_samples), key=lambda i: -scores[i])
        best = samples[order[0]]
        return Output(image=best if made is not None else None, text=best if made is None else None,
                      samples=[samples[i] for i in order], scores=[scores[i] for i in order], sources=sources,
                      seconds=time.perf_counter() - t0, codes=made[order] if made is not None else None)

    # --- infilling (CM3: the hole is a <mask:0> in place, its content generated after a trailing <mask:0>) -----
    def infill_image(self, image: Image.Image, rows: tuple[int, int], caption: str | None = None,
                     memory: Memory | None = None, k: int = 2, num_samples: int = 4, temperature: float | None = None,
                     top_p: float = 0.9, seed: int = 0, demos: Sequence[Document] | None = None) -> Output:
        """Redraw code-grid rows [r0, r1) of an image, given the rest of it (and its caption, if any).

        Retrieval uses the caption when given, else the image. Samples are reranked by the encoder's score
        with the caption (or with the original image when there is no caption).
        """
        t0 = time.perf_counter()
        image = to_rgb(image)
        grid_h, grid_w = self.tokenizer.image.grid
        r0, r1 = rows
        if not 0 <= r0 < r1 <= grid_h:
            raise ValueError(f"rows {rows} are not a range inside the {grid_h}-row code grid")
        caption = _caption(caption) if caption is not None else None
        v = self.vocab
        codes = self.tokenizer.encode_images([image])[0]  # [N], raster order
        first, count = r0 * grid_w, (r1 - r0) * grid_w
        kept = v.image_to_vocab(codes.tolist())
        hole = [v.img_id, *kept[:first], v.mask_id(0), *kept[first + count:], v.img_end_id]
        text = v.text_to_vocab(self.tokenizer.text.encode(caption)) if caption else []
        prompt, _, sources = self._prompts(self._context(caption if caption is not None else image, memory, k, demos),
                                           True, text + hole + [v.mask_id(0)], count)
        new = generate_image_codes(self.generator, v, [prompt.ids] * num_samples, self.tokenizer.tokens_per_image,
                                   self.image_base, Sampling(self._temperature(temperature, "image"), 0, top_p),
                                   generator=self._random(seed),
                                   n_codes=count, first_cell=first)
        full = codes.to(new.device).repeat(num_samples, 1)
        full[:, first:first + count] = new
        with torch.no_grad():
            images = self.tokenizer.image.to_pil(self.tokenizer.image.decode(full))
        target = self.encoder.embed_text([caption])[0] if caption else self.encoder.embed_image([image])[0]
        scores = (self.encoder.embed_image(images) @ target).tolist()
        order = sorted(range(num_samples), key=lambda i: -scores[i])
        return Output(image=images[order[0]], samples=[images[i] for i in order], scores=[scores[i] for i in order],
                      sources=sources, seconds=time.perf_counter() - t0, codes=full[order])

    def infill_text(self, image: Image.Image, before: str, after: str = "", memory: Memory | None = None, k: int = 2,
                    num_samples: int = 4, temperature: float | None = None, max_new_tokens: int = 16, seed: int = 0,
                    demos: Sequence[Document] | None = None) -> Output:
        """Fill the blank between `before` and `after` in an image's caption ("flag: ___"); .text is the full caption."""
        t0 = time.perf_counter()
        image = to_rgb(image)
        v, tt = self.vocab, self.tokenizer.text
        codes = self.tokenizer.encode_images([image])[0].tolist()
        img = [v.img_id, *v.image_to_vocab(codes), v.img_end_id]
        hole = (v.text_to_vocab(tt.encode(before)) if before else []) + [v.mask_id(0)] + \
            (v.text_to_vocab(tt.encode(after)) if after else [])
        prompt, _, sources = self._prompts(self._context(image, memory, k, demos), False, img + hole + [v.mask_id(0)],
                                           max_new_tokens)
        ids = generate_text_ids(self.generator, v, [prompt.ids] * num_samples, self.tokenizer.tokens_per_image,
                                self.image_base, Sampling(self._temperature(temperature, "text"), 0, 0.9),
                                max_new_tokens=max_new_tokens,
                                generator=self._random(seed))
        # decode the whole caption at once: byte-level BPE pieces only join correctly in one sequence
        fills = [tt.decode(tt.encode(before) + v.vocab_to_text(t) + tt.encode(after)).strip() if before or after
                 else tt.decode(v.vocab_to_text(t)).strip() for t in ids]
        scores = (self.encoder.embed_text(fills) @ self.encoder.embed_image([image])[0]).tolist()
        order = sorted(range(num_samples), key=lambda i: -scores[i])
        return Output(text=fills[order[0]], samples=[fills[i] for i in order], scores=[scores[i] for i in order],
                      sources=sources, seconds=time.perf_counter() - t0)
