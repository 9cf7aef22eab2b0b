"""Exponential moving average of model weights (Polyak averaging; the ViT paper's Table 2 uses it at 0.9999).

``ema = decay * ema + (1 - decay) * weights`` after every optimiser step, for floating-point parameters and buffers
(other buffers are copied), as timm ``ModelEmaV3`` does with ``lerp``. With ``warmup`` the decay of update ``t`` is
``min(decay, (1 + t) / (10 + t))`` (TensorFlow ``ExponentialMovingAverage(num_updates=t)``), so short runs are not
dominated by the random initialisation. Under FSDP the copy is sharded as the model is (``vitkit.train.fsdp``), so
the update runs on each process's shards.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["ModelEma"]


class ModelEma:
    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = True):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay_at(self.updates)
        current = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - d)
            else:
                ema_value.copy_(value)
        self.updates += 1

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], updates: int) -> None:
        self.module.load_state_dict(tensors, strict=True)
        self.updates = updates
