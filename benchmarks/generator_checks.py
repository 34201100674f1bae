"""The generator's acceptance checks (issue 5) on held-out concepts, with the shipped model.

    python benchmarks/generator_checks.py [--model DIR] [--memory DIR] [--dataset DIR] [--samples 4] [--limit 60]
        [--judge-encoder DIR] [--rows NAME ...]

Rows (judge: the generated image's nearest concept name under the encoder is the right one; drawing judge:
its nearest real drawing under the encoder's image tower belongs to the right concept, see judge.drawing_judge):
  flags_k2 / flags_k0    every held-out flag, caption -> image, default memory, with and without retrieval
  concepts_k2 / _k0      held-out concepts (one document each), caption -> image
  cross_style            only the other style's drawing of the concept as context (demos=)
  distractor             the concept's drawing and another held-out concept's drawing as context, in random
                         order; also the share of outputs judged as the distractor's concept (copied the wrong one)
  distractor_only        only another concept's drawing as context: does the model check the caption?
  caption_k2 / _k0       image -> caption names the concept (normalised match)
Writes benchmarks/results/generator_checks.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    import torch

    from racm3.embedded import ensure_emoji_dataset, ensure_emoji_memory
    from racm3.evaluation.judge import drawing_judge, image_judge, name_accuracy
    from racm3.pipeline import RACM3
    from racm3.readers import read_documents
    from racm3.retrieval.encoder import load_encoder
    from racm3.retrieval.memory import Memory

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--memory", type=Path)
    p.add_argument("--dataset", type=Path)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--limit", type=int, default=60, help="held-out concepts for the non-flag rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rerank", choices=("caption", "source"), default="source")
    p.add_argument("--rows", nargs="*", help="only these rows (the two ceilings always run)")
    p.add_argument("--judge-encoder", type=Path, help="encoder the judges use (default: the model's own); e.g. "
                   "a tower trained on every concept: racm3 train encoder DATA OUT --split all")
    p.add_argument("--out", type=Path, default=RESULTS / "generator_checks.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = RACM3.from_pretrained(args.model)
    docs = list(read_documents(args.dataset or ensure_emoji_dataset()))
    memory = Memory.open(args.memory or ensure_emoji_memory(model.encoder))
    judge_encoder = load_encoder(args.judge_encoder) if args.judge_encoder else model.encoder
    names = sorted({d.concept for d in docs})
    name_vectors = judge_encoder.embed_text(names)
    drawn = [d for d in docs if d.image is not None]
    drawings = (judge_encoder.embed_image([d.image for d in drawn]), [d.concept for d in drawn])
    held = [d for d in docs if d.split == "heldout"]
    rng = random.Random(0)
    by_concept: dict[str, list] = {}
    for d in held:
        by_concept.setdefault(d.concept, []).append(d)
    flags = sorted({d.concept for d in held if d.meta.get("flag")})
    concepts = sorted(by_concept)
    rng.shuffle(concepts)
    concepts = concepts[: args.limit]
    queries = [sorted(by_concept[c], key=lambda d: d.id)[rng.randrange(len(by_concept[c]))] for c in concepts]

    def caption_rows(captions, contexts, k):
        images, t = [], time.perf_counter()
        for i, (cap, demos) in enumerate(zip(captions, contexts)):
            out = model.generate_image(cap, memory=memory, k=k, num_samples=args.samples, seed=i, demos=demos,
                                       rerank=args.rerank)
            images.append(out.image)
        return images, (time.perf_counter() - t) / max(1, len(captions))

    rows: dict[str, dict] = {}

    def judge(name, captions, concepts_, contexts=None, k=2, distractors=None):
        if args.rows and name not in args.rows:
            return
        images, sec = caption_rows(captions, contexts or [None] * len(captions), k)
        res = image_judge(judge_encoder, images, concepts_, names, name_vectors)
        dj = drawing_judge(judge_encoder, images, concepts_, *drawings)
        row = {"judge_accuracy": round(res.accuracy, 3), "drawing_judge_accuracy": round(dj.accuracy, 3),
               "n": len(captions), "seconds_per_image": round(sec, 2)}
        if distractors is not None:
            row["copied_distractor"] = round(sum(p == d for p, d in zip(dj.predictions, distractors)) / len(captions), 3)
        rows[name] = row
        print(f"{name:18s} {row}", file=sys.stderr, flush=True)

    # Ceilings: the judges on the real held-out drawings and on their VQ reconstructions (what a perfect copy gets).
    import torch as _t

    refs = queries
    with _t.no_grad():
        recon = model.tokenizer.image.to_pil(model.tokenizer.image.decode(model.tokenizer.encode_images(
            [q.image for q in refs])))
    for name, imgs in (("real_drawings", [q.image for q in refs]), ("vq_reconstructions", recon)):
        res = image_judge(judge_encoder, imgs, [q.concept for q in refs], names, name_vectors)
        dj = drawing_judge(judge_encoder, imgs, [q.concept for q in refs], *drawings)
        rows[name] = {"judge_accuracy": round(res.accuracy, 3), "drawing_judge_accuracy": round(dj.accuracy, 3),
                      "n": len(refs)}
        print(f"{name:18s} {rows[name]}", file=sys.stderr, flush=True)
    judge("flags_k2", flags, flags, k=2)
    judge("flags_k0", flags, flags, k=0)
    caps = [q.text for q in queries]
    cons = [q.concept for q in queries]
    judge("concepts_k2", caps, cons, k=2)
    judge("concepts_k0", caps, cons, k=0)
    # Context chosen by hand (demos=): the other style's drawing; the right drawing beside a distractor; a distractor.
    other = [next((d for d in by_concept[q.concept] if d.style != q.style), q) for q in queries]
    judge("cross_style", caps, cons, contexts=[[o] for o in other])
    distractor_docs = [by_concept[concepts[(i + 1) % len(concepts)]][0] for i in range(len(queries))]
    pairs = [[q, d] if rng.random() < 0.5 else [d, q] for q, d in zip(queries, distractor_docs)]
    judge("distractor", caps, cons, contexts=pairs, distractors=[d.concept for d in distractor_docs])
    judge("distractor_only", caps, cons, contexts=[[d] for d in distractor_docs],
          distractors=[d.concept for d in distractor_docs])
    for k in (2, 0):
        if args.rows and f"caption_k{k}" not in args.rows:
            continue
        t = time.perf_counter()
        texts = [model.generate_text(q.image, memory=memory, k=k, seed=i).text for i, q in enumerate(queries)]
        res = name_accuracy(texts, caps, cons)
        rows[f"caption_k{k}"] = {"name_accuracy": round(res.accuracy, 3), "n": len(texts),
                                 "seconds_per_caption": round((time.perf_counter() - t) / len(texts), 2),
                                 "examples": [[c, g] for c, g in list(zip(caps, texts))[:8]]}
        print(f"caption_k{k:<10d} {rows[f'caption_k{k}']['name_accuracy']}", file=sys.stderr, flush=True)
    memory.close()
    result = {"rows": rows, "samples": args.samples, "rerank": args.rerank, "model": str(args.model or "shipped"),
              "sampling": model.sampling, "judge_encoder": judge_encoder.name}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"{'row':18s} {'judge':>6s} {'drawing judge':>14s} {'name':>6s} {'copied distractor':>18s} {'n':>4s}")
    for name, r in rows.items():
        print(f"{name:18s} {r.get('judge_accuracy', ''):>6} {r.get('drawing_judge_accuracy', ''):>14} "
              f"{r.get('name_accuracy', ''):>6} {r.get('copied_distractor', ''):>18} {r['n']:>4}")
    return result


if __name__ == "__main__":
    main()
