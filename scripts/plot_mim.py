"""Pre-training with masked image modelling then fine-tuning, against training from scratch, for the same minutes.

    python scripts/plot_mim.py --scratch runs/exp/scratch --mim runs/exp/mim --finetune runs/exp/ft \
        --tokenizer-s 47.6 --mim-step-s 0.70 --step-s 0.68 --out docs/mim_vs_scratch.png

The runs are given step counts, not time budgets, so their results do not depend on what else the machine ran;
their minutes are the steps times the seconds per step measured alone on the same CPU (``--mim-step-s`` for the
pre-training steps, which include the tokenizer's forward pass, ``--step-s`` for classification steps), plus the
tokenizer's training (``--tokenizer-s``) for the pre-trained arm. Evaluation time is left out of both arms.
Prints a markdown table (test top-1 at each validation) and draws test accuracy against training minutes.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def curve(run: Path, step_s: float, offset_min: float = 0.0) -> list[tuple[int, float, float]]:
    """(step, minutes, test top-1 %) at each validation of ``run`` with a test score, then its final test."""
    with open(run / "metrics.csv") as f:
        rows = [(int(r["step"]), 100.0 * float(r["test_top1"])) for r in csv.DictReader(f) if r.get("test_top1")]
    summary = json.loads((run / "summary.json").read_text())
    final = (summary["steps"], 100.0 * summary["test"]["top1"])
    if not rows or rows[-1][0] != final[0]:
        rows.append(final)
    return [(step, offset_min + step * step_s / 60.0, acc) for step, acc in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("scratch", "mim", "finetune", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--tokenizer-s", type=float, required=True)
    p.add_argument("--mim-step-s", type=float, required=True)
    p.add_argument("--step-s", type=float, required=True)
    a = p.parse_args()
    mim = json.loads((Path(a.mim) / "summary.json").read_text())
    pre_min = (a.tokenizer_s + mim["steps"] * a.mim_step_s) / 60.0
    arms = {"from scratch": curve(Path(a.scratch), a.step_s),
            f"MIM pre-training ({pre_min:.1f} min) then fine-tuning": curve(Path(a.finetune), a.step_s, pre_min)}
    print(f"pre-training: tokenizer {a.tokenizer_s / 60:.1f} min + {mim['steps']} MIM steps "
          f"({mim['steps'] * a.mim_step_s / 60:.1f} min), masked-token top-1 {100 * mim['test']['mim_top1']:.2f}% "
          f"on the test images")
    print("| arm | step | training minutes | test top-1 |\n|---|---|---|---|")
    for label, pts in arms.items():
        for step, minutes, acc in pts:
            print(f"| {label} | {step} | {minutes:.1f} | {acc:.2f}% |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, pts in arms.items():
        start = (0.0, 10.0) if label == "from scratch" else (pre_min, 10.0)  # chance when classification starts
        ax.plot([start[0]] + [m for _, m, _ in pts], [start[1]] + [acc for *_, acc in pts], marker="o",
                markersize=3, label=f"{label} ({pts[-1][2]:.2f}%)")
    ax.axvspan(0, pre_min, color="grey", alpha=0.12, label="pre-training without labels")
    ax.set_xlabel("training minutes (2-core CPU, measured alone; evaluation excluded)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main()
