"""Generation speed: seconds per image (N samples, guidance) and per caption, decoding tokens/s vs the FLOP bound.

    python benchmarks/generation_speed.py [--model DIR] [--samples 8] [--repeats 3]

The FLOP bound: a decoder step costs about 2 x (parameters touched per token) FLOPs; at the matrix-multiply
rate measured in this process (float32, like decoding) that gives the most tokens/s the machine could do.
The KV cache is measured against full recomputation in the same process (a ratio: this machine is noisy).
Prints a table and writes benchmarks/results/generation_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def main(argv: list[str] | None = None) -> dict:
    from racm3.generator.decode import Sampling, generate_image_codes
    from racm3.pipeline import RACM3

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/generation_speed.json"))
    args = p.parse_args(argv)

    model = RACM3.from_pretrained(args.model)
    gen, vocab, n = model.generator, model.vocab, model.tokenizer.tokens_per_image
    # A k=2 caption->image prompt of typical length: two documents of an 8-token caption and an image in context.
    prompt = [vocab.bos_id] + ([vocab.doc_id] + [vocab.text_offset] * 8 + [vocab.img_id] +
                               [vocab.image_offset] * n + [vocab.img_end_id, vocab.doc_end_id]) * 2
    prompt += [vocab.text_offset] * 6 + [vocab.img_id]
    uncond = prompt[:-7] + [vocab.mask_id(0), vocab.img_id]

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    s = args.samples
    guided = timed(lambda: generate_image_codes(gen, vocab, [prompt] * s, n, model.image_base,
                                                Sampling(guidance=3.0), uncond_prompts=[uncond] * s))
    plain = timed(lambda: generate_image_codes(gen, vocab, [prompt] * s, n, model.image_base, Sampling()))
    nocache = timed(lambda: generate_image_codes(gen, vocab, [prompt] * s, n, model.image_base, Sampling(),
                                                 use_cache=False))
    image = model.tokenizer.image.to_pil(model.tokenizer.image.decode(torch.zeros(1, n, dtype=torch.long)))[0]
    caption = timed(lambda: model.generate_text(image, memory=None, num_samples=4))
    full_image = timed(lambda: model.generate_image("flag: France", memory=None, num_samples=s, guidance=3.0))

    params = sum(p.numel() for p in gen.parameters())  # tied embeddings: the LM head's matmul touches them once
    flops_per_token = 2 * params
    gflops = matmul_gflops()
    bound = gflops * 1e9 / flops_per_token
    tokens = s * n
    rows = {
        "parameters": params,
        "matmul_gflops_fp32": round(gflops, 1),
        "flop_bound_tokens_per_s": round(bound),
        "prompt_tokens": len(prompt),
        "image_tokens_per_sample": n,
        "seconds_per_image_guided": round(guided, 3),
        "seconds_per_image_unguided": round(plain, 3),
        "seconds_per_image_no_cache": round(nocache, 3),
        "decode_tokens_per_s_unguided": round(tokens / plain),
        "decode_tokens_per_s_guided": round(2 * tokens / guided),
        "share_of_flop_bound": round(tokens / plain / bound, 4),
        "kv_cache_speedup": round(nocache / plain, 2),
        "seconds_per_caption_4_samples": round(caption, 3),
        "seconds_generate_image_end_to_end": round(full_image, 3),
        "samples": s,
        "threads": torch.get_num_threads(),
    }
    print(f"{'metric':36s} value")
    for k, v in rows.items():
        print(f"{k:36s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
