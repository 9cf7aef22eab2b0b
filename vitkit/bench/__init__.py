"""Benchmarks: parameter and MAC counts (``flops``), throughput / latency / memory of a step (``runner``), the
machine's GEMM peak and memory bandwidth (``machine``), and a same-process comparison against Hugging Face
``transformers`` (``compare``). Results and the commands that produced them: ``vitkit/bench/README.md``.

The submodules are imported by name (``from vitkit.bench.flops import model_stats``); nothing is imported here, so
``python -m vitkit.bench.flops`` runs its module once."""
