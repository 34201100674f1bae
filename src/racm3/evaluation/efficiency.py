"""Training efficiency: held-out judge accuracy and FID against training steps, from saved generator snapshots."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from racm3.documents import Document
from racm3.evaluation.judge import drawing_judge, image_judge
from racm3.evaluation.knowledge import select_queries

# A snapshot folder is a generator folder (config.json + racm3.json) named for its step: step-1200, step_1200,
# checkpoint-1200 (the Hugging Face Trainer's name).
_SNAPSHOT = re.compile(r"^(?:step|checkpoint)[-_]?(\d+)$")


def find_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every generator snapshot under run_dir, by step; run_dir itself counts when it is a
    generator folder whose racm3.json records its step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no training run here")
    found = []
    for sub in run_dir.iterdir():
        m = _SNAPSHOT.match(sub.name)
        if m and (sub / "config.json").exists():
            found.append((int(m.group(1)), sub))
    meta = run_dir / "racm3.json"
    if (run_dir / "config.json").exists() and meta.exists():
        step = json.loads(meta.read_text()).get("step")
        if isinstance(step, int) and step not in {s for s, _ in found}:
            found.append((step, run_dir))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no generator snapshots (sub-folders step-N/ holding config.json); "
                                f"save snapshots during training to plot a curve")
    return sorted(found)


def evaluate_images(model, queries: Sequence[Document], k: int, memory, concept_names: Sequence[str],
                    name_vectors: np.ndarray, ref_features: np.ndarray | None, features_fn: Callable | None,
                    samples: int = 2, guidance: float = 3.0, seed: int = 0,
                    drawings: tuple[np.ndarray, list[str]] | None = None) -> dict:
    """Caption->image judge accuracy (by concept name and, given drawings, by nearest real drawing) and FID."""
    from racm3.evaluation.fid import fid_from_features

    images = [model.generate_image(q.text, memory=memory if k > 0 else None, k=k, num_samples=samples,
                                   guidance=guidance, seed=seed + n).image for n, q in enumerate(queries)]
    judge = image_judge(model.encoder, images, [q.meta["concept"] for q in queries], concept_names, name_vectors)
    out = {"judge_accuracy": round(judge.accuracy, 4)}
    if drawings is not None:
        dj = drawing_judge(model.encoder, images, [q.meta["concept"] for q in queries], *drawings)
        out["drawing_judge_accuracy"] = round(dj.accuracy, 4)
    if ref_features is not None and features_fn is not None:
        out["fid"] = round(fid_from_features(features_fn(images), ref_features), 2)
    return out


def training_efficiency(base_model, runs: dict[str, tuple[str | Path, int]], memory, docs: Sequence[Document],
                        limit: int = 50, samples: int = 2, fid: bool = True, features_fn: Callable | None = None,
                        load: Callable | None = None, log: Callable[[str], None] = print) -> dict:
    """For each labelled run (run_dir, k): every snapshot's held-out judge accuracy and FID at that k.

    base_model: an RACM3 whose tokenizers and encoder every snapshot shares; load(folder) -> generator
    (default racm3.generator.model.load_generator). Returns {"curves": {label: [{"step", "judge_accuracy", "fid"}]}}.
    """
    from racm3.evaluation.fid import inception_features

    if load is None:
        from racm3.generator.model import load_generator as load
    features_fn = features_fn or inception_features
    queries = select_queries(docs, limit)
    names = sorted({d.meta["concept"] for d in docs if d.meta.get("concept")})
    name_vectors = base_model.encoder.embed_text(names)
    drawn = [d for d in docs if d.image is not None and d.meta.get("concept")]
    drawings = (base_model.encoder.embed_image([d.image for d in drawn]), [d.meta["concept"] for d in drawn])
    ref = features_fn([q.image for q in queries]) if fid else None
    curves: dict[str, list[dict]] = {}
    for label, (run_dir, k) in runs.items():
        curves[label] = []
        for step, folder in find_snapshots(run_dir):
            model = type(base_model)(base_model.tokenizer, load(folder), base_model.encoder)
            point = {"step": step, **evaluate_images(model, queries, k, memory, names, name_vectors, ref,
                                                     features_fn if fid else None, samples, drawings=drawings)}
            curves[label].append(point)
            log(f"{label} step {step}: {point}")
    return {"curves": curves, "queries": len(queries), "samples": samples}


def plot_efficiency(result: dict, path: str | Path) -> Path:
    """Judge accuracy and FID against steps, one line per run, as a PNG (needs the `eval` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'racm3[eval]'") from exc
    metrics = [m for m in ("drawing_judge_accuracy", "judge_accuracy", "fid") if any(m in p for c in result["curves"].values() for p in c)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, points in result["curves"].items():
            pts = [(p["step"], p[metric]) for p in points if metric in p]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel({"drawing_judge_accuracy": "held-out drawing judge", "judge_accuracy": "held-out caption judge",
                       "fid": "held-out FID (lower is better)"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
