"""Random draws from an explicit ``torch.Generator`` only, never from the global RNGs (``random``, ``numpy.random``,
``torch``'s default generator), so that a resumed run reproduces its augmentations bit for bit.

Per-sample generators are derived from ``(seed, epoch, index)`` by hashing (the counter-based seeding JAX/big_vision
use, instead of timm's per-worker ``worker_init_fn`` seeding), so a sample's augmentation does not depend on the
number of DataLoader workers or on which worker loads it.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

__all__ = ["stream_seed", "sample_seed", "sample_generator", "uniform", "randrange", "coin", "gauss", "log_uniform", "beta"]


def stream_seed(seed: int, stream: str, *counters: int) -> int:
    """A 63-bit seed for a named random stream at given counters (e.g. ``("dropout", step, rank)``), by hashing, so
    every stream is reproducible from the step alone (counter-based seeding, as in JAX / big_vision)."""
    text = ":".join([str(seed), stream, *map(str, counters)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from a BLAKE2b hash of the three integers (stable across platforms and Python versions)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A fresh CPU generator for sample ``index`` of ``epoch`` in a run seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, epoch, index))
    return g


def uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """A float in ``[low, high)``."""
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def log_uniform(g: torch.Generator, low: float, high: float) -> float:
    """``exp(uniform(log low, log high))``: the aspect-ratio draw of Inception crops and random erasing."""
    return math.exp(uniform(g, math.log(low), math.log(high)))


def randrange(g: torch.Generator, low: int, high: int) -> int:
    """An int in ``[low, high)`` (Python's ``random.randrange``; ``random.randint(a, b)`` is ``randrange(a, b + 1)``)."""
    return int(torch.randint(low, high, (), generator=g).item())


def coin(g: torch.Generator, p: float) -> bool:
    """True with probability ``p``; no number is drawn when ``p`` is 0 or 1."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return uniform(g) < p


def gauss(g: torch.Generator, mean: float = 0.0, std: float = 1.0) -> float:
    return mean + std * torch.randn((), generator=g, dtype=torch.float64).item()


def beta(g: torch.Generator, a: float, b: float) -> float:
    """A Beta(a, b) draw. torch's samplers take no generator, so one 63-bit draw seeds a NumPy generator."""
    seed = int(torch.randint(0, 2**63 - 1, (), generator=g).item())
    return float(np.random.default_rng(seed).beta(a, b))
