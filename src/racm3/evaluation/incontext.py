"""In-context style control: do demonstrations (demos=) in one art style steer generated drawings toward it?"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np

from racm3.documents import Document
from racm3.evaluation.judge import image_judge
from racm3.evaluation.knowledge import select_queries
from racm3.evaluation.style import STYLES


def style_control(model, docs: Sequence[Document], classifier, limit: int = 50, n_demos: int = 2,
                  samples: int = 2, guidance: float = 3.0, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict:
    """For each held-out caption: one drawing with no context, and one per style with n_demos demonstrations
    in that style (train-split documents of other concepts, so the demos carry the style, not the answer).

    Reports, per style, the share of drawings the classifier puts in that style with its demos against the
    share without any context, and the judge accuracy of each condition (steering must not cost the concept).
    """
    queries = select_queries(docs, limit, seed)
    # One caption per concept: both styles of a caption would repeat the same query.
    seen, captions = set(), []
    for q in queries:
        if q.meta["concept"] not in seen:
            seen.add(q.meta["concept"])
            captions.append(q)
    pools = {s: [d for d in docs if d.meta.get("split") == "train" and d.meta.get("style") == s
                 and d.image is not None and d.text] for s in STYLES}
    missing = [s for s, p in pools.items() if len(p) < n_demos]
    if missing:
        raise ValueError(f"too few train-split documents to demonstrate styles {missing}")
    rng = random.Random(seed)
    names = sorted({d.meta["concept"] for d in docs if d.meta.get("concept")})
    name_vectors = model.encoder.embed_text(names)
    drawn: dict[str, list] = {"none": [], **{s: [] for s in STYLES}}
    for n, q in enumerate(captions):
        drawn["none"].append(model.generate_image(q.text, memory=None, k=0, num_samples=samples,
                                                  guidance=guidance, seed=seed + n).image)
        for s in STYLES:
            demos = rng.sample(pools[s], n_demos)
            drawn[s].append(model.generate_image(q.text, demos=demos, num_samples=samples,
                                                 guidance=guidance, seed=seed + n).image)
        if (n + 1) % 10 == 0:
            log(f"  style control: {n + 1}/{len(captions)}")
    truth = [q.meta["concept"] for q in captions]
    predicted = {cond: classifier.predict(images) for cond, images in drawn.items()}
    judge = {cond: image_judge(model.encoder, images, truth, names, name_vectors).accuracy
             for cond, images in drawn.items()}
    styles = {s: {"share_with_demos": round(float(np.mean([p == s for p in predicted[s]])), 4),
                  "share_without": round(float(np.mean([p == s for p in predicted["none"]])), 4),
                  "judge_accuracy_with_demos": round(judge[s], 4)} for s in STYLES}
    return {"styles": styles, "judge_accuracy_without": round(judge["none"], 4),
            "steered": round(float(np.mean([v["share_with_demos"] for v in styles.values()])), 4),
            "queries": len(captions), "n_demos": n_demos, "samples": samples,
            "classifier_heldout_accuracy": getattr(classifier, "heldout_accuracy", None)}
