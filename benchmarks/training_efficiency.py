"""Training efficiency (issue 6, item 3): held-out judge accuracy and FID against training steps, RA-CM3 vs baseline.

Usage:
  python benchmarks/training_efficiency.py MODEL_DIR RA_RUN_DIR BASELINE_RUN_DIR [--memory DIR] [--dataset DIR]
                                           [--limit 50] [--samples 2] [--threads 2] [--no-fid]
RUN_DIRs hold generator snapshots step-N/ (written during `racm3 train generator`); RA-CM3 is queried with k=2,
the baseline with k=0. Writes benchmarks/results/training_efficiency.json and training_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from racm3.evaluation.efficiency import plot_efficiency, training_efficiency

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("ra_run", type=Path)
    p.add_argument("baseline_run", type=Path)
    p.add_argument("--memory", type=Path)
    p.add_argument("--dataset", type=Path)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fid", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    from racm3.embedded import ensure_emoji_dataset, ensure_emoji_memory
    from racm3.pipeline import RACM3
    from racm3.readers import read_documents
    from racm3.retrieval.memory import Memory

    model = RACM3.from_pretrained(args.model)
    dataset = args.dataset or ensure_emoji_dataset(log=log)
    memory = Memory.open(args.memory or ensure_emoji_memory(model.encoder, log=log))
    res = training_efficiency(model, {"RA-CM3 (k=2)": (args.ra_run, 2), "baseline (k=0)": (args.baseline_run, 0)},
                              memory, list(read_documents(dataset)), limit=args.limit, samples=args.samples,
                              fid=not args.no_fid, log=log)
    res["command"] = "python benchmarks/training_efficiency.py " + " ".join(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training_efficiency.json").write_text(json.dumps(res, indent=2))
    png = plot_efficiency(res, RESULTS / "training_efficiency.png")
    print(f"| run | step | caption judge | drawing judge | FID |\n|---|---|---|---|---|")
    for label, points in res["curves"].items():
        for pt in points:
            print(f"| {label} | {pt['step']} | {pt['judge_accuracy']:.3f} | {pt.get('drawing_judge_accuracy', '-')} "
                  f"| {pt.get('fid', '-')} |")
    print(f"wrote {RESULTS / 'training_efficiency.json'} and {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
