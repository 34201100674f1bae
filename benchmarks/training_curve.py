"""The generator's training curve: loss and held-out context benefit per step (image codes, and captions where
the run logged them), RA-CM3 vs the k=0 baseline.

    python benchmarks/training_curve.py runs/gen-ra runs/gen-k0

Reads each run's train_log.jsonl; writes benchmarks/results/training_curve.png and training_curve.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(a).name: [json.loads(line) for line in (Path(a) / "train_log.jsonl").read_text().splitlines()]
            for a in argv}
    captions = any("caption_nll_self" in r for log in runs.values() for r in log)
    fig, axes = plt.subplots(1, 3 if captions else 2, figsize=(15 if captions else 10, 3.6))
    ax1, ax2 = axes[0], axes[1]
    for name, log in runs.items():
        ax1.plot([r["step"] for r in log], [r["main"] for r in log], label=f"{name}: L_main")
        ev = [r for r in log if "nll_self" in r]
        ax2.plot([r["step"] for r in ev], [r["nll_none"] for r in ev], "--", label=f"{name}: no context")
        ax2.plot([r["step"] for r in ev], [r["nll_self"] for r in ev], label=f"{name}: concept's drawing in context")
        ax2.plot([r["step"] for r in ev], [r["nll_cross_style"] for r in ev], ":", label=f"{name}: other style's drawing")
        cap = [r for r in ev if "caption_nll_self" in r]
        if captions and cap:
            axes[2].plot([r["step"] for r in cap], [r["caption_nll_none"] for r in cap], "--", label=f"{name}: no context")
            axes[2].plot([r["step"] for r in cap], [r["caption_nll_self"] for r in cap],
                         label=f"{name}: the document in context")
    ax1.set(xlabel="step", ylabel="training loss (main document)", title="training loss")
    ax2.set(xlabel="step", ylabel="NLL per image code", title="held-out concepts: does it read its context?")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    if captions:
        axes[2].set(xlabel="step", ylabel="NLL per caption token", title="held-out captions (image first)")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "training_curve.png", dpi=110)
    summary = {name: [r for r in log if "nll_self" in r] for name, log in runs.items()}
    (RESULTS / "training_curve.json").write_text(json.dumps(summary, indent=1))
    for name, ev in summary.items():
        print(name, [(r["step"], round(r["nll_none"], 2), round(r["nll_self"], 2), round(r["nll_cross_style"], 2),
                      *((round(r["caption_nll_none"], 2), round(r["caption_nll_self"], 2)) if "caption_nll_self" in r else ()))
                     for r in ev])


if __name__ == "__main__":
    main(sys.argv[1:])
