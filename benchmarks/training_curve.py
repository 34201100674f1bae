"""The generator's training curve: loss and held-out context benefit per step, RA-CM3 vs the k=0 baseline.

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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, log in runs.items():
        ax1.plot([r["step"] for r in log], [r["main"] for r in log], label=f"{name}: L_main")
        ev = [r for r in log if "nll_self" in r]
        ax2.plot([r["step"] for r in ev], [r["nll_none"] for r in ev], "--", label=f"{name}: no context")
        ax2.plot([r["step"] for r in ev], [r["nll_self"] for r in ev], label=f"{name}: concept's drawing in context")
        ax2.plot([r["step"] for r in ev], [r["nll_cross_style"] for r in ev], ":", label=f"{name}: other style's drawing")
    ax1.set(xlabel="step", ylabel="training loss (main document)", title="training loss")
    ax2.set(xlabel="step", ylabel="NLL per image code", title="held-out concepts: does it read its context?")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "training_curve.png", dpi=110)
    summary = {name: [r for r in log if "nll_self" in r] for name, log in runs.items()}
    (RESULTS / "training_curve.json").write_text(json.dumps(summary, indent=1))
    for name, ev in summary.items():
        print(name, [(r["step"], round(r["nll_none"], 2), round(r["nll_self"], 2), round(r["nll_cross_style"], 2))
                     for r in ev])


if __name__ == "__main__":
    main(sys.argv[1:])
