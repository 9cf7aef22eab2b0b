"""The README's transfer picture: CIFAR-10 test accuracy against wall-clock minutes, pre-trained vs from scratch.

    python scripts/plot_transfer.py runs/c10_ft_30min runs/c10_30min docs/cifar10_transfer_vs_scratch.png
"""
import sys

from vitkit.train.report import plot_accuracy_vs_minutes

if __name__ == "__main__":
    finetuned, scratch, out = sys.argv[1:4]
    plot_accuracy_vs_minutes({"DeiT-Tiny, ImageNet pre-trained, fine-tuned": finetuned,
                              "ViT from scratch": scratch}, out)
    print(f"wrote {out}")
