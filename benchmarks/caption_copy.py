"""Which caption tokens a generator can copy: per-token NLL of a caption with its own document in context.

Usage: python benchmarks/caption_copy.py [MODEL_DIR ...] [--dataset DIR] [--concepts 40] [--out NAME]
For the first --concepts held-out and train concepts of the data set (one document each), the image -> caption
prompt holds the document itself (image first, as generate_text builds it) or nothing, and the generator scores
the document's true caption and <eos>. Tokens are grouped by how often they occur in the train split's captions:
a copy that works for common tokens and fails for rare ones says the copy is learned per token embedding, not
as a lookup that holds for any id. Prints a table, writes benchmarks/results/NAME.json (caption_copy by default).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

from racm3.embedded import ensure_emoji_dataset
from racm3.pipeline import RACM3
from racm3.readers import read_documents
from racm3.retrieval.memory import Hit
from racm3.tokenizers.sequence import position_ids

RESULTS = Path(__file__).parent / "results"
RARE, COMMON = 5, 50  # occurrences in the train captions: rare below RARE, common from COMMON


def _option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def caption_nlls(model: RACM3, docs, freq: Counter, split: str, concepts: int) -> list[dict]:
    """One record per caption token (and <eos>): its index, train frequency, NLL with the document and without."""
    v, tt, out, seen = model.vocab, model.tokenizer.text, [], set()
    text_after_image = model.generator.racm3["generator"].get("text_after_image", "plain")
    for d in docs:
        if d.split != split or d.concept in seen or len(seen) >= concepts:
            continue
        seen.add(d.concept)
        codes = model.tokenizer.encode_images([d.image])[0].tolist()
        query = [v.img_id, *v.image_to_vocab(codes), v.img_end_id]
        text = tt.encode(d.text)
        target = v.text_to_vocab(text) + [v.eos_id]
        nll = {}
        for context in ("self", "none"):
            sources = [Hit(d.id, d, 1.0, 0)] if context == "self" else []
            prompt, _, _ = model._prompts(sources, False, query, len(target))
            ids = prompt.ids + target
            pos = position_ids(ids, v, model.image_base, model.tokenizer.tokens_per_image, text_after_image)
            with torch.no_grad():
                logits = model.generator(input_ids=torch.tensor([ids]), position_ids=pos[None]).logits.float()
            logp = torch.log_softmax(logits[0, len(prompt.ids) - 1:len(ids) - 1], -1)
            nll[context] = (-logp[torch.arange(len(target)), torch.tensor(target)]).tolist()
        for j, t in enumerate(text + [None]):
            out.append({"index": j, "train_count": freq[t] if t is not None else None,
                        "self": nll["self"][j], "none": nll["none"][j]})
    return out


def summarize(records: list[dict]) -> dict:
    groups = {"all": records, "first token": [r for r in records if r["index"] == 0],
              f"rare (< {RARE} in train captions)": [r for r in records if r["train_count"] is not None
                                                    and r["train_count"] < RARE],
              f"common (>= {COMMON})": [r for r in records if r["train_count"] is not None
                                        and r["train_count"] >= COMMON]}
    return {name: {"tokens": len(g), "nll_self": round(statistics.mean(r["self"] for r in g), 3),
                   "nll_none": round(statistics.mean(r["none"] for r in g), 3)} for name, g in groups.items() if g}


def main(argv: list[str]) -> None:
    options = {"--dataset", "--concepts", "--out"}
    models = [a for i, a in enumerate(argv) if not a.startswith("--") and not (i and argv[i - 1] in options)]
    dataset = _option(argv, "--dataset", "") or ensure_emoji_dataset()
    concepts, name = int(_option(argv, "--concepts", "40")), _option(argv, "--out", "caption_copy")
    torch.set_num_threads(1)
    docs = list(read_documents(dataset))
    rows = []
    for model_dir in models or [None]:
        model = RACM3.from_pretrained(model_dir, device="cpu")
        freq = Counter(i for d in docs if d.split == "train" for i in model.tokenizer.text.encode(d.text))
        row = {"model": str(model_dir or "shipped")}
        for split in ("heldout", "train"):
            row[split] = summarize(caption_nlls(model, docs, freq, split, concepts))
        rows.append(row)
        for split in ("heldout", "train"):
            cells = "  ".join(f"{g} {s['nll_self']:.2f}/{s['nll_none']:.2f} (n={s['tokens']})" for g, s in row[split].items())
            print(f"{row['model']:40s} {split:8s} NLL with the document / without: {cells}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
