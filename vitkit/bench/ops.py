"""Micro-benchmarks of the operations of one ViT block, each against its alternatives, interleaved.

The evidence behind the shape of vitkit's forward pass (vitkit/bench/README.md, "Where the time goes"):

    python -m vitkit.bench.ops [--batch-size 8] [--tokens 197] [--dim 768] [--heads 12] [--quiet 0.05]

Every group times its variants in alternating rounds (``runner.interleave``), under ``torch.inference_mode``, and
prints median milliseconds per call. Variants of one group compute the same values.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from vitkit.bench.runner import interleave

__all__ = ["groups", "main"]


def groups(B: int, N: int, D: int, heads: int, hidden: int) -> dict[str, dict[str, Callable[[], object]]]:
    """name → {variant → zero-argument callable}. Shapes are those of one block at batch B, N tokens, width D."""
    g = torch.Generator().manual_seed(0)
    d = D // heads

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    x, h = rnd(B, N, D), rnd(B, N, hidden)
    w_qkv, b_qkv = rnd(3 * D, D, std=D ** -0.5), rnd(3 * D)
    w1, b1 = rnd(hidden, D, std=D ** -0.5), rnd(hidden)
    qkv = F.linear(x, w_qkv, b_qkv).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    q, k, v = qkv.unbind(0)  # strided views into the fused projection
    img = rnd(B, 3, 224, 224)
    w_pe, b_pe = rnd(D, 3, 16, 16, std=(3 * 256) ** -0.5), rnd(D)

    from vitkit.layers import Block
    block = Block(D, heads, hidden / D).eval()

    def denormals_flushed() -> torch.Tensor:
        torch.set_flush_denormal(True)
        try:
            return block(x)
        finally:
            torch.set_flush_denormal(False)

    def without_mkldnn(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.backends.mkldnn.flags(enabled=False):
                return fn()
        return run

    def explicit() -> torch.Tensor:
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return attn @ v

    return {
        "dense layer (qkv)": {
            "F.linear on (B, N, D)": lambda: F.linear(x, w_qkv, b_qkv),
            "addmm on a (B·N, D) view": lambda: torch.addmm(b_qkv, x.view(B * N, D), w_qkv.t()),
            "mm, then bias add_": lambda: torch.mm(x.view(B * N, D), w_qkv.t()).add_(b_qkv),
        },
        "attention kernel": {
            "SDPA on strided q/k/v views": lambda: F.scaled_dot_product_attention(q, k, v),
            "contiguous() copies + SDPA": lambda: F.scaled_dot_product_attention(
                q.contiguous(), k.contiguous(), v.contiguous()),
            "explicit softmax path": explicit,
            "SDPA + transpose/reshape to (B, N, D)": lambda: F.scaled_dot_product_attention(q, k, v)
            .transpose(1, 2).reshape(B, N, D),
        },
        "activation (B, N, hidden)": {
            "F.gelu (new buffer)": lambda: F.gelu(h),
            "gelu_ in place": lambda: torch.ops.aten.gelu_(h),
        },
        "fc1 + GELU": {
            "linear, then F.gelu": lambda: F.gelu(F.linear(x, w1, b1)),
            "linear, then gelu_ in place": lambda: torch.ops.aten.gelu_(F.linear(x, w1, b1)),
        },
        "LayerNorm": {"F.layer_norm": lambda: F.layer_norm(x, (D,), eps=1e-6)},
        "patch embedding": {
            "conv2d, NCHW input": lambda: F.conv2d(img, w_pe, b_pe, stride=16),
            "conv2d, channels_last input": lambda: F.conv2d(img.contiguous(memory_format=torch.channels_last),
                                                            w_pe, b_pe, stride=16),
            "conv2d, oneDNN (mkldnn) disabled": without_mkldnn(lambda: F.conv2d(img, w_pe, b_pe, stride=16)),
        },
        "whole block, process-wide switches": {
            "defaults": lambda: block(x),
            "torch.set_flush_denormal(True)": denormals_flushed,
            "torch.backends.mkldnn disabled": without_mkldnn(lambda: block(x)),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", type=float, help="wait for other processes to use at most this many cores")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"B={args.batch_size} N={args.tokens} D={args.dim} heads={args.heads}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for name, variants in groups(args.batch_size, args.tokens, args.dim, args.heads,
                                     int(args.dim * args.mlp_ratio)).items():
            for fn in variants.values():
                fn()
            timed = interleave(variants, args.iters, "cpu", quiet=args.quiet, max_wait=1800)
            print(f"\n{name}")
            for variant, times in timed.times.items():
                faults = [f for f in timed.faults[variant] if f is not None]
                print(f"  {variant:40s} {1e3 * statistics.median(times):8.2f} ms"
                      + (f"   {statistics.median(faults):6.0f} page faults" if faults else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
