"""vitkit against Hugging Face ``transformers`` on the same architecture, weights and input, in one process.

``to_transformers(model)`` builds ``ViTForImageClassification`` (or ``DeiTForImageClassificationWithTeacher`` for a
distilled DeiT) with vitkit's dimensions (hidden size, layers, heads, intermediate size, patch, image size,
``layer_norm_eps``, activation, qkv bias), in eval mode and with transformers' default attention implementation
(``sdpa``), and copies vitkit's weights into it: the fused qkv projection is split into q/k/v in (q, k, v) order,
the inverse of ``vitkit.weights.hf``. Equal logits (``max |diff|``) show the two run the same function before their
speed is compared.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.bench.runner import (BenchResult, BenchSettings, logits_of, make_step, peak_memory_mb, run_interleaved,
                                 step_flops, summarize, warm_up)

__all__ = ["transformers_config", "transformers_state_dict", "to_transformers", "randomize_heads_", "Comparison",
           "compare_to_transformers"]

_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _is_distilled(model: nn.Module) -> bool:
    return getattr(model, "num_dist_tokens", 0) > 0


def _check_supported(cfg) -> None:
    """transformers' ViT has no GAP pooling, fc_norm, pre-logits layer or LayerScale: refuse rather than differ."""
    unsupported = {
        "global_pool": cfg.global_pool != "token",
        "class_token": not cfg.class_token,
        "fc_norm": bool(cfg.fc_norm),
        "representation_size": bool(cfg.representation_size),
        "init_values": bool(cfg.init_values),
        "act_layer": cfg.act_layer not in _ACT,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"transformers' ViT cannot express {', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)}")


def transformers_config(model: nn.Module):
    """A ``ViTConfig`` / ``DeiTConfig`` with the dimensions of the vitkit ``model``."""
    from transformers import DeiTConfig, ViTConfig
    cfg = model.cfg
    _check_supported(cfg)
    config_cls = DeiTConfig if _is_distilled(model) else ViTConfig
    return config_cls(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act=_ACT[cfg.act_layer],
        image_size=tuple(model.patch_embed.img_size), patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.norm_eps, num_labels=cfg.num_classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def transformers_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """vitkit's state dict under the in-memory names of transformers 5.x (``vit.layers.{i}.attention.q_proj`` …).

    Pure: returns new tensors (clones), so the two models never share storage.
    """
    base = "deit" if _is_distilled(model) else "vit"
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        f"{base}.embeddings.cls_token": sd["cls_token"],
        f"{base}.embeddings.position_embeddings": sd["pos_embed"],
        f"{base}.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{base}.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{base}.layernorm.weight": sd["norm.weight"],
        f"{base}.layernorm.bias": sd["norm.bias"],
    }
    if _is_distilled(model):
        out[f"{base}.embeddings.distillation_token"] = sd["dist_token"]
    heads = {"head": "cls_classifier", "head_dist": "distillation_classifier"} if _is_distilled(model) else \
        {"head": "classifier"}
    for ours, theirs in heads.items():
        if f"{ours}.weight" in sd:
            out[f"{theirs}.weight"], out[f"{theirs}.bias"] = sd[f"{ours}.weight"], sd[f"{ours}.bias"]
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}.", f"{base}.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{ours}attn.qkv.{kind}" in sd:
                q, k, v = sd[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)  # fused qkv is (q, k, v) × heads
                out.update({f"{theirs}attention.q_proj.{kind}": q, f"{theirs}attention.k_proj.{kind}": k,
                            f"{theirs}attention.v_proj.{kind}": v})
            for src, dst in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                             ("attn.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{theirs}{dst}.{kind}"] = sd[f"{ours}{src}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def to_transformers(model: nn.Module) -> nn.Module:
    """The transformers twin of a vitkit ViT/DeiT, eval mode, same device and dtype, weights copied."""
    from transformers import DeiTForImageClassificationWithTeacher, ViTForImageClassification
    model_cls = DeiTForImageClassificationWithTeacher if _is_distilled(model) else ViTForImageClassification
    hf = model_cls(transformers_config(model))
    hf.load_state_dict(transformers_state_dict(model), strict=True)
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def randomize_heads_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Draw zero-initialised classifier heads from N(0, std): a fresh vitkit model has all-zero logits, which would
    make an output comparison vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in getattr(model, "heads", lambda: [])():
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_logit_diff(model: nn.Module, hf: nn.Module, x: Tensor) -> float:
    model.eval()
    hf.eval()
    with torch.inference_mode():
        return (logits_of(model(x)).float() - logits_of(hf(pixel_values=x)).float()).abs().max().item()


def compare_to_transformers(model: nn.Module, settings: BenchSettings = BenchSettings(),
                            input_size: tuple[int, int, int] | None = None, hf: nn.Module | None = None
                            ) -> Comparison:
    """Benchmark ``model`` and its transformers twin in interleaved rounds (see ``vitkit.bench.runner``)."""
    input_size = tuple(input_size or model.data_cfg.input_size)
    model.to(settings.device)
    hf = hf if hf is not None else to_transformers(model)
    x = torch.randn(settings.batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(settings.device)
    diff = max_logit_diff(model, hf, x)
    num_classes = getattr(model, "num_classes", None)
    steps = {"vitkit": make_step(model, x, settings, num_classes),
             "transformers": make_step(hf, x, settings, num_classes)}
    flops = step_flops(model, input_size, settings.mode)
    first = warm_up(steps, settings)
    mem = {name: peak_memory_mb(step, settings.device) for name, step in steps.items()}
    timed = run_interleaved(steps, settings)
    samples = timed.probe_gflops
    peak = statistics.median(samples) if samples else None
    res = {name: summarize(name, timed.times[name], settings.batch_size, first[name], mem[name], flops, peak,
                           timed.foreign[name], timed.faults[name]) for name in steps}
    for r in res.values():
        r.discarded_rounds = timed.discarded_rounds
    ratio = res["vitkit"].images_per_s / res["transformers"].images_per_s
    return Comparison(res["vitkit"], res["transformers"], diff, ratio, peak, max(samples) if samples else None,
                      str(getattr(hf.config, "_attn_implementation", "?")))
