"""The README's CIFAR-10 picture: test accuracy against wall-clock minutes, one curve per run folder (recorded with
``log.test_curve``), and single points for runs known only by their end.

    python scripts/plot_transfer.py "CCT-2/3x2 from scratch=runs/cct_30min" \
        "DeiT-Tiny fine-tuned (EPYC-bf16)@29.5=94.96" "ViT from scratch (EPYC-bf16)@23.7=55.7" docs/cifar10_30min.png

A ``LABEL=RUN`` argument is a run folder; ``LABEL@MINUTES=ACCURACY`` a point; the last argument the output PNG.
``--key val_top1`` draws the held-out curve (runs without ``log.test_curve``), still ending at the final test.
"""
import sys

from vitkit.train.run_outputs import plot_accuracy_vs_minutes

if __name__ == "__main__":
    args = sys.argv[1:]
    key = "test_top1"
    if args[:1] == ["--key"]:
        key, args = args[1], args[2:]
    *items, out = args
    runs, points = {}, {}
    for item in items:
        label, value = item.rsplit("=", 1)
        if "@" in label:
            label, minutes = label.rsplit("@", 1)
            points[label] = (float(minutes), float(value))
        else:
            runs[label] = value
    plot_accuracy_vs_minutes(runs, out, key=key, points=points)
    print(f"wrote {out}")
