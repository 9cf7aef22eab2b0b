"""Benchmarks: parameter and MAC counts, throughput / latency / memory of a step, the machine's GEMM peak and memory
bandwidth, and a same-process comparison against Hugging Face ``transformers``. Results and the commands that
produced them: ``vitkit/bench/README.md``."""
from vitkit.bench.flops import ModelStats, count_flops, count_macs, count_params, model_stats
from vitkit.bench.runner import BenchResult, BenchSettings, benchmark

__all__ = ["count_params", "count_macs", "count_flops", "model_stats", "ModelStats", "BenchSettings", "BenchResult",
           "benchmark"]
