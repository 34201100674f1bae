"""The knowledge benchmark (issue 6): on held-out concepts, what retrieval buys, plus in-context style control.

Usage:
  python benchmarks/knowledge.py [--model DIR] [--baseline DIR] [--memory DIR] [--dataset DIR] [--limit 100]
                                 [--samples 4] [--threads 2] [--style-control] [--style-limit 50] [--style-only]
                                 [--tag TAG]
Prints the table and writes benchmarks/results/knowledge.json (and style_control.json with --style-control;
knowledge_TAG.json and style_control_TAG.json with --tag).
Equivalent to `racm3 eval knowledge --json` for the main table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from racm3.evaluation.knowledge import KnowledgeConfig, format_table, knowledge, load_models

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--baseline", type=Path)
    p.add_argument("--memory", type=Path)
    p.add_argument("--dataset", type=Path)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--style-control", action="store_true", help="also run in-context style control (item 4)")
    p.add_argument("--style-limit", type=int, default=50)
    p.add_argument("--style-only", action="store_true",
                   help="run only the style control (implies --style-control; the table: racm3 eval knowledge)")
    p.add_argument("--tag", default="", help="results go to knowledge_TAG.json / style_control_TAG.json (another model's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    if args.tag and not re.fullmatch(r"[\w.-]+", args.tag):
        p.error(f"--tag {args.tag!r}: letters, digits, '_', '.' and '-' only (it names files in {RESULTS})")
    suffix = f"_{args.tag}" if args.tag else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.style_only:
        cfg = KnowledgeConfig(limit=args.limit, samples=args.samples, fid=not args.no_fid)
        result = knowledge(args.model, args.baseline, args.memory, args.dataset, cfg, log=log)
        result["command"] = "python benchmarks/knowledge.py " + " ".join(argv)
        out = RESULTS / f"knowledge{suffix}.json"
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(format_table(result))
        print(f"{result['queries']} held-out queries, {result['elapsed_s']} s -> {out}")

    if args.style_control or args.style_only:
        from racm3.embedded import ensure_emoji_dataset
        from racm3.evaluation.incontext import style_control
        from racm3.evaluation.style import load_or_train_style_classifier
        from racm3.readers import read_documents

        dataset = args.dataset or ensure_emoji_dataset(log=log)
        clf = load_or_train_style_classifier(dataset, Path("runs") / "style_classifier.json", log=log)
        model, _ = load_models(args.model, args.baseline)
        res = style_control(model, list(read_documents(dataset)), clf, limit=args.style_limit,
                            samples=min(args.samples, 2), log=log)
        res["command"] = "python benchmarks/knowledge.py " + " ".join(argv)
        (RESULTS / f"style_control{suffix}.json").write_text(json.dumps(res, indent=2))
        print(f"style classifier held-out accuracy {clf.heldout_accuracy:.3f}")
        for s, v in res["styles"].items():
            print(f"{s:9s} share in style: {v['share_with_demos']:.2f} with {res['n_demos']} demos "
                  f"vs {v['share_without']:.2f} without; judge {v['judge_accuracy_with_demos']:.2f} "
                  f"(without demos {res['judge_accuracy_without']:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
