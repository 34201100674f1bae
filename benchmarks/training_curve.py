"""The generator's training curve: loss, held-out image-code NLL with and without context, and every context
benefit the run logged (racm3.generator.train.BENEFITS), for each run (e.g. RA-CM3 vs the k=0 baseline).

    python benchmarks/training_curve.py runs/emoji-small/generator runs/emoji-small/generator_k0 [--out DIR]

Reads each run's train_log.jsonl; writes DIR/training_curve.png and DIR/training_curve.json (the evaluated log
lines; DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from racm3.generator.train import BENEFITS

RESULTS = Path(__file__).parent / "results"
# the image-code NLLs, where the log has them (a data set with one style has no nll_cross_style)
NLLS = {"nll_none": ("--", "no context"), "nll_self": ("-", "the document in context"),
        "nll_cross_style": (":", "the other style's drawing")}
RUN_STYLES = ("-", "--", ":", "-.")  # the benefits panel: a colour per benefit, a line style per run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding train_log.jsonl")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {run.name: [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            for run in args.runs}
    evaluated = {name: [r for r in log if "nll_none" in r] for name, log in runs.items()}  # every evaluation has it
    fig, (loss_ax, nll_ax, benefit_ax) = plt.subplots(1, 3, figsize=(16, 3.8))
    for n, (name, log) in enumerate(runs.items()):
        loss_ax.plot([r["step"] for r in log], [r["main"] for r in log], color=f"C{n}", label=name)
        for key, (style, what) in NLLS.items():
            ev = [r for r in evaluated[name] if key in r]
            if ev:
                nll_ax.plot([r["step"] for r in ev], [r[key] for r in ev], style, color=f"C{n}",
                            label=f"{name}: {what}")
        for b, benefit in enumerate(BENEFITS):
            ev = [r for r in evaluated[name] if benefit in r]
            if ev:
                benefit_ax.plot([r["step"] for r in ev], [r[benefit] for r in ev], RUN_STYLES[n % len(RUN_STYLES)],
                                color=f"C{b}", label=f"{name}: {benefit}")
    loss_ax.set(xlabel="step", ylabel="training loss (main document)", title="training loss")
    nll_ax.set(xlabel="step", ylabel="NLL per image code", title="held-out concepts: does it read its context?")
    benefit_ax.axhline(0, color="grey", linewidth=0.5)
    benefit_ax.set(xlabel="step", ylabel="nats per token", title="held-out context benefits (0: context unused)")
    for ax in (loss_ax, nll_ax, benefit_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "training_curve.png", dpi=110)
    (args.out / "training_curve.json").write_text(json.dumps(evaluated, indent=1))
    for name, ev in evaluated.items():
        print(name, [{"step": r["step"], **{b: round(r[b], 2) for b in BENEFITS if b in r}} for r in ev])


if __name__ == "__main__":
    main()
