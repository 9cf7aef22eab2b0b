"""Fitting a converted (vitkit-layout) state dict to a built model: shared steps every family's
``load_pretrained_state`` is made of, and the final strict check that lists whatever cannot be explained."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vitkit.layers.pos_embed import resample_pos_embed
from vitkit.weights.report import CheckpointMismatchError, LoadReport

__all__ = ["resample_pos_embed_state", "adapt_head", "reinit_head", "drop_keys", "upcast", "finish_load"]


def resample_pos_embed_state(state: dict[str, Tensor], key: str, target: Tensor, num_prefix_tokens: int,
                             grid: tuple[int, int], report: LoadReport,
                             old_grid: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """Resample ``state[key]`` (1, prefix + h·w, D) to the model's grid when only the number of patches differs."""
    pos = state.get(key)
    if pos is None or pos.shape == target.shape or pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return state
    n_old = pos.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            return state  # not a square grid: leave it for the mismatch error
        old_grid = (side, side)
    out = dict(state)
    out[key] = resample_pos_embed(pos, grid, old_grid, num_prefix_tokens)
    report.resized.append(f"{key} {tuple(pos.shape)} → {tuple(out[key].shape)} (grid {old_grid[0]}x{old_grid[1]} → "
                          f"{grid[0]}x{grid[1]}, bicubic, {num_prefix_tokens} prefix token(s) kept)")
    return out


def adapt_head(state: dict[str, Tensor], prefix: str, head: nn.Module | None, report: LoadReport) -> dict[str, Tensor]:
    """Replace a classifier whose class count differs by a zero-initialised one (ViT paper App. B.1.1)."""
    w_key, b_key = f"{prefix}.weight", f"{prefix}.bias"
    if w_key not in state:
        return state
    out = dict(state)
    if not isinstance(head, nn.Linear):
        out.pop(w_key), out.pop(b_key, None)
        report.ignored.append(f"{prefix} ({state[w_key].shape[0]} classes): the model has no classifier there")
        return out
    if state[w_key].shape == head.weight.shape:
        return state
    if state[w_key].shape[1] != head.weight.shape[1]:
        return state  # a feature-size mismatch is not a head change: let the strict check report it
    out[w_key] = torch.zeros_like(head.weight)
    out[b_key] = torch.zeros_like(head.bias)
    report.reinitialized.append(f"{prefix}: {state[w_key].shape[0]} → {head.weight.shape[0]} classes, "
                                f"zero-initialised")
    return out


def reinit_head(state: dict[str, Tensor], prefix: str, head: nn.Module | None, report: LoadReport,
                why: str) -> dict[str, Tensor]:
    """Replace a checkpoint's classifier by zeros of the model's shape, whatever its size (e.g. its input was removed)."""
    w_key, b_key = f"{prefix}.weight", f"{prefix}.bias"
    if w_key not in state or not isinstance(head, nn.Linear):
        return state
    out = dict(state)
    out[w_key] = torch.zeros_like(head.weight)
    out[b_key] = torch.zeros_like(head.bias)
    report.reinitialized.append(f"{prefix}: {why}, zero-initialised ({head.out_features} classes)")
    return out


def drop_keys(state: dict[str, Tensor], prefix: str, report: LoadReport, why: str) -> dict[str, Tensor]:
    dropped = [k for k in state if k.startswith(prefix)]
    if not dropped:
        return state
    report.ignored.append(f"{', '.join(dropped)}: {why}")
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def upcast(state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """Half-precision floating tensors → float32 (integer buffers keep their dtype)."""
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                     if v.is_floating_point() and v.dtype != torch.float32})
    if dtypes:
        report.upcast.append(f"{'/'.join(dtypes)} → float32")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _describe(keys: list[str], shapes: dict[str, tuple], limit: int = 12) -> str:
    lines = [f"    {k} {list(shapes[k])}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"    … and {len(keys) - limit} more")
    return "\n".join(lines)


def check_compatible(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise ``CheckpointMismatchError`` listing missing, unexpected and mis-shaped keys (with shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    # listed in the model's (or the file's) own order: embeddings first, then blocks, then the head
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and given[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    name = getattr(model, "variant_name", type(model).__name__)
    parts = [f"{source} does not fit {name}:"]
    if missing:
        parts.append(f"  missing from the checkpoint ({len(missing)}), model expects:\n{_describe(missing, expected)}")
    if unexpected:
        parts.append(f"  unexpected in the checkpoint ({len(unexpected)}):\n{_describe(unexpected, given)}")
    if wrong:
        rows = [f"    {k}: checkpoint {list(given[k])} vs model {list(expected[k])}" for k in wrong[:12]]
        if len(wrong) > 12:
            rows.append(f"    … and {len(wrong) - 12} more")
        parts.append(f"  shape mismatch ({len(wrong)}):\n" + "\n".join(rows))
    parts.append("  (is this a checkpoint of another architecture or size? pass the matching model name / overrides)")
    raise CheckpointMismatchError("\n".join(parts))


def finish_load(model: nn.Module, state: dict[str, Tensor], report: LoadReport) -> None:
    """Upcast, let the model adapt the state dict (resize, re-initialise), check it strictly and load it."""
    state = upcast(state, report)
    state = model.load_pretrained_state(state, report)
    check_compatible(model, state, report.source)
    model.load_state_dict(state, strict=True)
