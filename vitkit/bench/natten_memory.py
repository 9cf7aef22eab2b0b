"""Peak memory of neighbourhood attention in PyTorch (``vitkit.layers.neighborhood_attention``) against the
brute-force masked attention, on the CPU:

    python -m vitkit.bench.natten_memory                 # 28x28 and 56x56 maps, 64 channels, 2 heads, k = 7, batch 8
    python -m vitkit.bench.natten_memory --sizes 56 --batch-size 1

Each implementation runs in a fresh child process (so no allocator cache of an earlier run hides memory): q, k, v and
the bias table are made first, then the resident-set high-water mark is reset and one attention call (no autograd)
is measured above that baseline (``vitkit.bench.runner.peak_memory_mb``), then timed. The tiled and explicit paths
grow as H·W·k² (times (T + k − 1)² / k² for the tiles); the brute force as (H·W)²: its (heads, H·W, H·W) mask with
the fused kernel (which never holds the attention matrix), plus the (B, heads, H·W, H·W) matrix when the softmax is
written out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

IMPLEMENTATIONS = ("tiled", "explicit", "dense", "dense_matrix")
_LABELS = {"tiled": "tiled (vitkit default)", "explicit": "explicit k² gather (recording)",
           "dense": "dense mask, fused SDPA", "dense_matrix": "dense mask, softmax(QKᵀ + M) V"}


def _inputs(size: int, channels: int, heads: int, kernel: int, batch: int):
    g = torch.Generator().manual_seed(0)
    d = channels // heads
    q, k, v = (torch.randn(batch, heads, size, size, d, generator=g) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g)
    return q, k, v, rpb, d ** -0.5


def _call(impl: str, q, k, v, rpb, kernel: int, scale: float) -> torch.Tensor:
    from vitkit.layers.neighborhood_attention import neighborhood_attention, neighborhood_attention_dense
    if impl in ("dense", "dense_matrix"):
        return neighborhood_attention_dense(q, k, v, rpb, kernel, scale=scale, fused=impl == "dense")
    record = (lambda attn, **info: None) if impl == "explicit" else None
    return neighborhood_attention(q, k, v, rpb, kernel, scale=scale, record=record)


def measure_one(impl: str, size: int, channels: int, heads: int, kernel: int, batch: int, repeats: int) -> dict:
    """Peak MiB above the inputs, median ms and max |difference| from the dense result (in this process)."""
    from vitkit.bench.runner import peak_memory_mb
    q, k, v, rpb, scale = _inputs(size, channels, heads, kernel, batch)
    with torch.no_grad():
        peak = peak_memory_mb(lambda: _call(impl, q, k, v, rpb, kernel, scale), "cpu")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = _call(impl, q, k, v, rpb, kernel, scale)
            times.append((time.perf_counter() - start) * 1e3)
        diff = 0.0
        if impl != "dense" and size <= 56:
            diff = (out - _call("dense", q, k, v, rpb, kernel, scale)).abs().max().item()
    return {"impl": impl, "size": size, "peak_mib": peak, "ms": statistics.median(times), "max_diff": diff}


def _child(impl: str, args: argparse.Namespace, size: int) -> dict:
    cmd = [sys.executable, "-m", "vitkit.bench.natten_memory", "--only", impl, "--sizes", str(size),
           "--channels", str(args.channels), "--heads", str(args.heads), "--kernel", str(args.kernel),
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkit.bench.natten_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 56], help="map sides H = W")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(measure_one(args.only, args.sizes[0], args.channels, args.heads, args.kernel,
                                     args.batch_size, args.repeats)))
        return 0
    from vitkit.hardware import machine_line
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads; neighbourhood attention, {args.channels} channels "
          f"({args.heads} heads), k = {args.kernel}, batch {args.batch_size}, float32, inference (no autograd)")
    print(f"{'map':>7}  {'implementation':<32} {'peak MiB':>9} {'ms':>9} {'max |diff| vs dense':>20}")
    for size in args.sizes:
        for impl in IMPLEMENTATIONS:
            r = _child(impl, args, size)
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            diff = "(reference)" if impl == "dense" else f"{r['max_diff']:.1e}"
            print(f"{size:>3}x{size:<3}  {_LABELS[impl]:<32} {peak:>9} {r['ms']:>9.1f} {diff:>20}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
