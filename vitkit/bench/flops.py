"""Parameter and multiply-accumulate (MAC) counts.

Convention (the papers' "FLOPs"): the ViT, DeiT, Swin, PVT, CvT, T2T and DAT tables report multiply-accumulates of
one image's forward pass, so ``count_macs`` returns FLOPs / 2 as counted by ``torch.utils.flop_counter
.FlopCounterMode``: convolutions, dense layers and matrix products, **including the two attention products**
(Q·Kᵀ and A·V, 2·N²·D per block for ViT). Softmax, LayerNorm, GELU, additions and the bias of each layer are not
counted. This reproduces ViT-B/16 = 17.56 G and DeiT-Ti⚗ = 1.26 G (research/architectures.md §1.1-1.2).

How the attention products are counted: ``FlopCounterMode`` has formulas for the CUDA flash/efficient kernels but not
for the CPU flash kernel that ``scaled_dot_product_attention`` dispatches to (it counts 0 there). The count therefore
runs every vitkit attention layer on its explicit softmax path (``record_attention``), whose two ``matmul`` calls are
counted on any device. Counting is fastest on the meta device: ``model_stats`` builds the model there, so no weight
is allocated and no arithmetic runs, and all registered variants are counted in seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.layers.attention import record_attention

__all__ = ["count_params", "count_macs", "count_flops", "ModelStats", "model_stats"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> tuple[int, int, int]:
    if input_size is None:
        data_cfg = getattr(model, "data_cfg", None)
        if data_cfg is None:
            raise ValueError("pass input_size=(C, H, W): the model has no data_cfg to take it from")
        input_size = data_cfg.input_size
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)}")
    return tuple(int(s) for s in input_size)


def count_flops(model: nn.Module, input_size: tuple[int, int, int] | None = None, backward: bool = False,
                batch_size: int = 1) -> int:
    """FLOPs of ``batch_size`` images through ``model`` (forward, or forward + backward of the summed output).

    Runs on the model's device and dtype; on the meta device nothing is computed. Eval mode is used for the
    forward-only count (no dropout); the model's mode is restored afterwards.
    """
    C, H, W = _input_size(model, input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(batch_size, C, H, W, device=device, dtype=dtype)
    was_training = model.training
    model.train(backward)
    counter = FlopCounterMode(display=False)
    try:
        with record_attention(model), counter, torch.set_grad_enabled(backward):
            out = model(x)
            if backward:
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.float().sum().backward()
    finally:
        model.train(was_training)
        if backward:
            model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one image's forward pass (the papers' "FLOPs"; attention products included).

    ``input_size`` is (C, H, W); it defaults to ``model.data_cfg.input_size`` (the native resolution).
    """
    return count_flops(model, input_size) // 2


@dataclass(frozen=True)
class ModelStats:
    """One row of ``vitkit models``."""

    name: str
    family: str
    input_size: tuple[int, int, int]
    params: int  # parameter elements, with the default head (1000 classes)
    macs: int  # forward MACs of one image at ``input_size``

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        """GMACs, reported as "GFLOPs" by the papers."""
        return self.macs / 1e9

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["input_size"] = list(self.input_size)
        row.update(params_m=round(self.params_m, 3), gflops=round(self.gflops, 3))
        return row


def model_stats(name: str, **overrides: Any) -> ModelStats:
    """Parameters and forward MACs of a registered variant at its native resolution, built on the meta device."""
    from vitkit.registry import create_model, get_spec
    spec = get_spec(name)
    with torch.device("meta"):
        model = create_model(name, **overrides)
    input_size = model.data_cfg.input_size
    return ModelStats(name, spec.family, tuple(input_size), count_params(model), count_macs(model, input_size))
