"""Generator training speed: tokens/s and MFU of the real training step, against the bf16 matmul rate measured here.

    python benchmarks/training_speed.py [--dataset DIR] [--preset emoji-small] [--steps 8] [--variants ...]
    python benchmarks/training_speed.py --device cuda --preset medium     # on a GPU: batch sizes, fused AdamW
    python benchmarks/training_speed.py --preset v2-small --image-tokenizers src/racm3/pretrained/emoji-v2/image_tokenizer \
        --variants "1 thread, batch 24, fused AdamW" --ceiling      # the MFU bound the model's matmul shapes set
    python benchmarks/training_speed.py --image-tokenizers shipped runs/tok/A runs/tok/B --max-len 1024 \
        --variants "2 threads, batch 24, fused AdamW"      # the generator's cost of each image tokenizer

Each variant runs the real step (the recipe's sequences from the emoji documents, collation, bf16 autocast,
forward, RA-CM3 loss, backward, clipping, AdamW) for a few steps after warm-up, in this one process, so the
rows are ratios measured under the same machine load. MFU = model FLOP/s / the bf16 matrix-multiply rate of
both cores measured in the same process (a large square matmul: the best this CPU does; on CUDA, the GPU's). Model FLOPs per
token: 6 x parameters + 12 x layers x hidden x sequence length (attention; PaLM's appendix B), counted on
real (non-padding) tokens. Prints a table and writes benchmarks/results/training_speed.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    # name: (threads, batch size, fused AdamW, attention implementation)
    "shipped: 1 thread, batch 24": (1, 24, False, "sdpa"),
    "1 thread, batch 24, fused AdamW": (1, 24, True, "sdpa"),
    "2 threads, batch 24": (2, 24, False, "sdpa"),
    "2 threads, batch 24, fused AdamW": (2, 24, True, "sdpa"),
    "2 threads, batch 48": (2, 48, False, "sdpa"),
    "2 threads, batch 48, fused AdamW": (2, 48, True, "sdpa"),
    "2 threads, batch 96, fused AdamW": (2, 96, True, "sdpa"),
    "2 threads, batch 48, fused AdamW, eager attention": (2, 48, True, "eager"),
    "2 threads, batch 24, fused AdamW, eager attention": (2, 24, True, "eager"),
}
CUDA_VARIANTS = {  # threads do not matter there
    "batch 24": (1, 24, False, "sdpa"),
    "batch 64": (1, 64, False, "sdpa"),
    "batch 128": (1, 128, False, "sdpa"),
    "batch 128, fused AdamW": (1, 128, True, "sdpa"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, threads: int, device: torch.device, repeats: int = 10) -> float:
    """The best GFLOP/s of square matmuls in dtype (1,024 and 2,048 on `threads` CPU threads; 8,192 on a GPU)."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in ((8192,) if device.type == "cuda" else (1024, 2048)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


def linear_rate(model, tokens: int, threads: int, device: torch.device, repeats: int = 3) -> float:
    """GFLOP/s of the model's own matrix multiplies at its training shapes, in bf16: each Linear's forward
    (x W^T) and its two backward products (dY W, dY^T x) over `tokens` rows. No step can run its matmuls faster,
    so this over the square-matmul rate bounds the MFU of that width on this machine."""
    torch.set_num_threads(threads)
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops, seconds = 0.0, 0.0
    for fan_in, fan_out in shapes:
        x = torch.randn(tokens, fan_in, dtype=torch.bfloat16, device=device)
        w = torch.randn(fan_out, fan_in, dtype=torch.bfloat16, device=device)
        dy = torch.randn(tokens, fan_out, dtype=torch.bfloat16, device=device)
        for timed in (False, True):
            sync(device)
            t = time.perf_counter()
            for _ in range(repeats if timed else 1):
                x @ w.T, dy @ w, dy.T @ x
            sync(device)
            if timed:
                seconds += time.perf_counter() - t
                flops += 3 * 2 * tokens * fan_in * fan_out * repeats
    return flops / seconds / 1e9


def profile_shares(prof) -> dict[str, float]:
    """Each kind of work's share of a profiled step's self CPU time: matmuls, attention, the optimizer, the rest."""
    kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm"),
             "attention": ("flash_attention", "scaled_dot_product", "efficient_attention"),
             "optimizer": ("adam",)}
    totals = dict.fromkeys([*kinds, "other"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, keys in kinds.items() if any(key.lower() in name for key in keys)), "other")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in totals.items()}


def flops_per_token(model, seq_len: float) -> float:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once: the LM head's matmul
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def main(argv: list[str] | None = None) -> dict:
    from racm3.embedded import ensure_emoji_dataset
    from racm3.generator.data import ExampleBank, Recipe, batch, tokenize_documents
    from racm3.generator.loss import ra_cm3_loss, token_nll
    from racm3.generator.model import build_model, get_preset
    from racm3.generator.train import _load_split_documents, load_tokenizers
    from racm3.runtime import resolve_device, resolve_precision
    from racm3.tokenizers.image import ImageTokenizer
    from racm3.tokenizers.multimodal import MultimodalTokenizer
    from racm3.training import decay_groups

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=None, help="default: the embedded emoji set")
    p.add_argument("--preset", default="emoji-small")
    p.add_argument("--documents", type=int, default=1500, help="training documents tokenized for the sequences")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--variants", nargs="*", default=None, help=f"subset of: {list(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the best eager variant")
    p.add_argument("--device", default="cpu", help="cpu (the default: the thread variants) or cuda[:N]")
    p.add_argument("--image-tokenizers", nargs="*", default=["shipped"],
                   help="image tokenizer folders to time the generator with (its vocabulary and sequence length "
                        "follow each one's codes); 'shipped': the shipped model's")
    p.add_argument("--max-len", type=int, default=None, help="the generator's context (default: the preset's)")
    p.add_argument("--image-heads", nargs="*", default=None, choices=["full", "factorized"],
                   help="time each output layer for the image codes (default: the preset's)")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure each row's MFU bound: its model's matmuls at its shapes on its threads "
                        "(linear_rate) over the square-matmul rate on the same threads")
    p.add_argument("--profile", action="store_true",
                   help="also profile 2 more steps of each row: shares of CPU time in matmuls, attention, optimizer")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/training_speed.json"))
    args = p.parse_args(argv)

    dataset = args.dataset or ensure_emoji_dataset(log=lambda m: None)
    shipped = load_tokenizers(None)
    train_docs, _ = _load_split_documents(dataset)
    docs = random.Random(0).sample(train_docs, min(args.documents, len(train_docs)))
    gen_cfg = get_preset(args.preset)
    if args.max_len is not None:
        gen_cfg = replace(gen_cfg, max_len=args.max_len)
    recipe = Recipe()
    device = resolve_device(args.device)
    variants = CUDA_VARIANTS if device.type == "cuda" else VARIANTS
    peak = matmul_rate(torch.bfloat16, 2, device)
    fp32_peak = matmul_rate(torch.float32, 2, device)
    precision = resolve_precision("auto", device)

    def tokenizers(name: str):
        """(tokenizer name, multimodal tokenizer, bank of training sequences) for 'shipped' or a VQ folder."""
        mt = shipped if name == "shipped" else MultimodalTokenizer(shipped.text, ImageTokenizer.from_pretrained(name))
        return name, mt, ExampleBank(tokenize_documents(docs, mt), max_len=gen_cfg.max_len)  # lessons, k <= 2

    def run(name: str, threads: int, batch_size: int, fused: bool, attn: str, compiled: bool = False) -> dict:
        tok_name, mt, bank = current
        vocab, n_img = mt.vocab, mt.tokens_per_image
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_model(replace(gen_cfg, image_head=head), vocab, n_img, mt.image.config.fsq_levels).to(device)
        model.config._attn_implementation = attn
        model.train()
        opt = torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), fused=fused or None)
        t_compile = time.perf_counter()
        step_fn = torch.compile(model) if compiled else model
        rng = np.random.default_rng(0)

        def step(b):
            with precision.autocast():
                nll = token_nll(step_fn, b)
            loss = ra_cm3_loss(nll, b["loss_weights"], b["main_mask"])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync(device)

        def next_batch():
            seqs = [bank.sample(bank.ids[j], vocab, recipe, rng) for j in rng.integers(0, len(bank), batch_size)]
            return seqs, {k: t.to(device) for k, t in batch(seqs, vocab, gen_cfg.image_base, n_img).items()}

        build_s, step_s, tokens, lengths = 0.0, 0.0, 0, []
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            seqs, b = next_batch()
            sync(device)
            t1 = time.perf_counter()
            step(b)
            t2 = time.perf_counter()
            if i == 1:
                warmup_s = time.perf_counter() - t_compile
            if i >= 2:  # warm-up steps (allocator, compilation) are not timed
                build_s += t1 - t0
                step_s += t2 - t1
                tokens += sum(len(s) for s in seqs)
                lengths += [len(s) for s in seqs]
        seq_len = float(np.mean(lengths))
        tps = tokens / (build_s + step_s)
        achieved = tps * flops_per_token(model, seq_len) / 1e9
        row = {"variant": name, "image_tokenizer": tok_name, "image_head": head, "tokens_per_image": n_img,
               "vocab": vocab.size,
               "parameters": sum(p.numel() for p in model.parameters()), "threads": threads, "batch": batch_size, "fused_adamw": fused, "attention": attn,
               "compiled": compiled, "tokens_per_s": round(tps), "tokens_per_s_step_only": round(tokens / step_s),
               "batch_build_share": round(build_s / (build_s + step_s), 3), "mean_seq_len": round(seq_len, 1),
               "model_gflops": round(achieved, 1), "mfu": round(achieved / peak, 4),
               "warmup_s": round(warmup_s, 1)}
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    step(next_batch()[1])
            row["profile"] = profile_shares(prof)
            print("  profile: " + ", ".join(f"{k} {v:.0%}" for k, v in row["profile"].items()), flush=True)
        if args.ceiling:
            same = matmul_rate(torch.bfloat16, threads, device)
            shaped = linear_rate(model, batch_size * round(seq_len), threads, device)
            row.update({"bf16_matmul_gflops_same_threads": round(same, 1), "linear_gflops": round(shaped, 1),
                        "mfu_same_threads": round(achieved / same, 4), "mfu_ceiling": round(shaped / same, 4)})
            print(f"  matmul {same:.0f} GFLOP/s on {threads} thread(s); its own matmul shapes {shaped:.0f} "
                  f"(ceiling {shaped / same:.1%}); this step {achieved / same:.1%} of the same-threads rate", flush=True)
        print(f"{name:44s} {tok_name[-24:]:>24s} {head:10s} {row['mean_seq_len']:6.0f} {row['tokens_per_s']:7d} tok/s  (step only {row['tokens_per_s_step_only']:7d})  "
              f"build {row['batch_build_share']:.0%}  MFU {row['mfu']:.1%}", flush=True)
        return row

    chosen = args.variants or list(variants)
    rows = []
    for tok in args.image_tokenizers:
        current = tokenizers(tok)
        for head in args.image_heads or [gen_cfg.image_head]:
            rows += [run(name, *variants[name]) for name in chosen]
    if args.compile:
        best = max(rows, key=lambda r: r["tokens_per_s"])
        head = best["image_head"]
        rows.append(run(best["variant"] + ", torch.compile", best["threads"], best["batch"], best["fused_adamw"],
                        best["attention"], compiled=True))
    model = build_model(gen_cfg, shipped.vocab, shipped.tokens_per_image)
    result = {"preset": args.preset, "max_len": gen_cfg.max_len,
              "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
              "bf16_matmul_gflops": round(peak, 1), "fp32_matmul_gflops": round(fp32_peak, 1),
              "precision": precision.name, "steps_timed": args.steps, "rows": rows}
    print(f"bf16 matmul {peak:.0f} GFLOP/s (fp32 {fp32_peak:.0f}) on {device} (2 threads on a CPU); "
          f"{result['parameters']:,} parameters")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
