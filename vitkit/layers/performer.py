"""Performer attention with positive orthogonal random features (Choromanski et al., "Rethinking Attention with
Performers", ICLR 2021, arXiv 2009.14794: FAVOR+, Lemma 1 and eq. 5-7).

The softmax kernel exp(qᵀk) is estimated as φ(q)ᵀφ(k) with positive random features

    φ(x) = exp(Wx − |x|²/2) / √m          (W: m fixed random directions, one per row)

so attention costs O(N·m·d) instead of O(N²·d):

    Att(Q, K, V) = D⁻¹ (φ(Q) (φ(K)ᵀ V)),   D = diag(φ(Q) φ(K)ᵀ 1) + ε.

Queries are not scaled: a layer that wants q·k/√d scales its inputs itself. ``W`` is data, not computed here: in
released checkpoints it is a stored (frozen) tensor, so it is loaded with the weights and never redrawn;
``orthogonal_features`` only draws the initial value of a freshly built layer.

Recording (``record`` given): the layer has no softmax map, but it implies one, A = row-normalised φ(Q)φ(K)ᵀ, the
kernel estimate of softmax(QKᵀ). Its rows sum to 1; the output equals ``row_mass · A V`` with ``row_mass`` =
s / (s + ε), s = φ(q)ᵀΣφ(k) (passed to the recorder in ``info``): close to 1 unless the kernel underflows, in which
case ε dominates and the output shrinks towards 0. The map is computed in log space (logsumexp over the m features),
so it is finite even where φ underflows.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["orthogonal_features", "log_features", "favor_attention", "implied_attention"]


def orthogonal_features(m: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """(m, dim) random directions: orthogonal rows (orthogonal blocks when m > dim) scaled by √m, the draw of the
    T2T-ViT official ``Token_performer`` (``nn.init.orthogonal_(randn(m, dim)) · √m``)."""
    w = torch.empty(m, dim)
    if w.is_meta:  # built on the meta device: nothing to draw
        return w
    return torch.nn.init.orthogonal_(w, generator=generator) * math.sqrt(m)


def log_features(x: Tensor, w: Tensor) -> Tensor:
    """log(√m · φ(x)) = Wx − |x|²/2 for x (..., N, d) and W (m, d) → (..., N, m), in float32."""
    x = x.float()
    sq = (x * x).sum(dim=-1, keepdim=True) / 2  # (..., N, 1)
    return x @ w.float().t() - sq  # (..., N, m)


def favor_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, eps: float = 1e-8,
                    record: Callable[..., None] | None = None, **info) -> Tensor:
    """D⁻¹ (φ(q) (φ(k)ᵀ v)) for q, k, v of shape (..., N, d) and features W (m, d); returns (..., N, d) in v's dtype.

    Computed in float32 with autocast off (the exponentials overflow or lose all precision in half precision, as
    the T2T-ViT code also guards with ``.float()``). ``record`` receives the implied attention map (module doc) as
    (B, heads, N, M), heads = 1 for (B, N, d) inputs."""
    with _float32(v.device):
        lq, lk = log_features(q, w), log_features(k, w)  # (..., N, m), (..., M, m)
        qp, kp = torch.exp(lq) / math.sqrt(w.shape[0]), torch.exp(lk) / math.sqrt(w.shape[0])
        s = qp @ kp.sum(dim=-2).unsqueeze(-1)  # (..., N, 1) = φ(q)ᵀ Σ_j φ(k_j)
        kv = kp.transpose(-2, -1) @ v.float()  # (..., m, d)
        out = (qp @ kv) / (s + eps)  # (..., N, d)
        if record is not None:
            attn, mass = implied_attention(lq, lk), (s / (s + eps)).squeeze(-1)  # (..., N, M), (..., N)
            if attn.ndim == 3:
                attn, mass = attn.unsqueeze(1), mass.unsqueeze(1)  # (B, 1, N, M), (B, 1, N)
            record(attn, row_mass=mass, **info)
    return out.to(v.dtype)


def _float32(device: torch.device):
    """Autocast off on ``device`` (nothing to switch off on the meta device, where autocast does not exist)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def implied_attention(lq: Tensor, lk: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """The attention map the Performer implies, A_ij = φ(q_i)ᵀφ(k_j) / Σ_j' φ(q_i)ᵀφ(k_j'), from the log-features
    ``lq`` (..., N, m) and ``lk`` (..., M, m) of ``log_features``: (..., N, M), rows summing to 1.

    log φ(q_i)ᵀφ(k_j) = logsumexp_r(lq_ir + lk_jr) − log m, so A = softmax_j(logsumexp_r(lq_ir + lk_jr)): finite
    wherever the features themselves underflow. Evaluated by broadcasting over row chunks of at most
    ``chunk_elements`` (N·M·m) values, not by a matrix product: it is a diagnostic outside the layer's arithmetic, and
    vitkit's MAC count, which runs with recording on, counts matrix products only."""
    rows = max(1, chunk_elements // max(1, lk.shape[-2] * lk.shape[-1]))
    scores = [torch.logsumexp(part.unsqueeze(-2) + lk.unsqueeze(-3), dim=-1)  # (..., rows, M)
              for part in lq.split(rows, dim=-2)]
    return torch.cat(scores, dim=-2).softmax(dim=-1)
