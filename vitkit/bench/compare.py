"""vitkit against Hugging Face ``transformers`` on the same architecture, weights and input, in one process.

``to_transformers(model)`` asks the model's family for its transformers twin: the family's ``hf`` checkpoint format
builds the transformers model with vitkit's dimensions (eval mode, transformers' default attention implementation)
and writes vitkit's weights into it through the inverse of the same rename table that reads transformers files. Equal
logits (``max |diff|``) show the two run the same function before their speed is compared.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.bench.runner import (BenchResult, BenchSettings, logits_of, make_step, peak_memory_mb, run_interleaved,
                                 step_flops, summarize, warm_up)

__all__ = ["to_transformers", "randomize_heads_", "Comparison", "compare_to_transformers"]


def to_transformers(model: nn.Module) -> nn.Module:
    """The transformers twin of a vitkit model (same weights, eval mode), from the family's ``hf`` format."""
    from vitkit.registry import get_spec
    spec = get_spec(model.variant_name)
    fmt = spec.format("hf")
    if fmt is None or fmt.twin is None:
        raise ValueError(f"{spec.family} has no transformers counterpart to compare against")
    return fmt.twin(model)


def randomize_heads_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Draw zero-initialised classifier heads from N(0, std): a fresh vitkit model has all-zero logits, which would
    make an output comparison vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.classifiers():
            if not head.weight.any():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
    return model


@dataclass
class Comparison:
    ours: BenchResult
    theirs: BenchResult
    max_abs_diff: float  # logits, fp32, eval mode, on the benchmark batch
    speed_ratio: float  # ours / theirs images/s (> 1: vitkit is faster)
    peak_gflops_median: float | None
    peak_gflops_best: float | None
    attn_implementation: str
    others: dict[str, BenchResult] = field(default_factory=dict)  # further vitkit runtimes, same rounds
    other_diffs: dict[str, float] = field(default_factory=dict)  # their max |logits diff| to transformers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ratios(self) -> dict[str, float]:
        """images/s of every vitkit runtime over transformers', measured in the same interleaved rounds."""
        base = self.theirs.images_per_s
        return {"vitkit": self.ours.images_per_s / base,
                **{name: r.images_per_s / base for name, r in self.others.items()}}


def max_logit_diff(model: nn.Module, hf: nn.Module, x: Tensor) -> float:
    model.eval()
    hf.eval()
    with torch.inference_mode():
        return (logits_of(model(x)).float() - logits_of(hf(pixel_values=x)).float()).abs().max().item()


def compare_to_transformers(model: nn.Module, settings: BenchSettings = BenchSettings(),
                            input_size: tuple[int, int, int] | None = None, hf: nn.Module | None = None,
                            others: dict[str, nn.Module] | None = None) -> Comparison:
    """Benchmark ``model`` and its transformers twin in interleaved rounds (see ``vitkit.bench.runner``); ``others``
    (e.g. the same model exported to ONNX Runtime / OpenVINO) join the same rounds, so every ratio comes from one run
    under the same load."""
    input_size = tuple(input_size or model.data_cfg.input_size)
    model.to(settings.device)
    hf = hf if hf is not None else to_transformers(model)
    x = torch.randn(settings.batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(settings.device)
    named = {"vitkit": model, **(others or {})}
    diffs = {name: max_logit_diff(m, hf, x) for name, m in named.items()}
    num_classes = model.num_classes
    steps = {name: make_step(m, x, settings, num_classes) for name, m in named.items()}
    steps["transformers"] = make_step(hf, x, settings, num_classes)
    flops = step_flops(model, input_size, settings.mode)
    first = warm_up(steps, settings)
    mem = {name: peak_memory_mb(step, settings.device) for name, step in steps.items()}
    timed = run_interleaved(steps, settings, settle=1 if others else 0)  # other runtimes' threads spin after a step
    samples = timed.probe_gflops
    peak = statistics.median(samples) if samples else None
    res = {name: summarize(name, timed.times[name], settings.batch_size, first[name], mem[name], flops, peak,
                           timed.foreign[name], timed.faults[name]) for name in steps}
    for r in res.values():
        r.discarded_rounds = timed.discarded_rounds
    ratio = res["vitkit"].images_per_s / res["transformers"].images_per_s
    extra = {name: res[name] for name in others or {}}
    return Comparison(res["vitkit"], res["transformers"], diffs["vitkit"], ratio, peak, max(samples) if samples else None,
                      str(getattr(hf.config, "_attn_implementation", "?")), extra,
                      {name: diffs[name] for name in others or {}})
