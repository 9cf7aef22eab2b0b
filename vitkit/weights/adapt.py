"""Fitting a converted (vitkit-layout) state dict to a built model: shared steps every family's
``load_pretrained_state`` is made of, and the final strict check that lists whatever cannot be explained."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vitkit.layers.pos_embed import get_pos_embed_resize, resample_pos_embed
from vitkit.layers.pos_embed_rel import resize_rel_pos_bias_table
from vitkit.weights.report import CheckpointMismatchError, LoadReport

__all__ = ["resample_pos_embed_state", "resize_rel_pos_tables", "reconcile_buffers", "adapt_head", "reinit_head",
           "drop_keys", "upcast", "finish_load"]


def resample_pos_embed_state(state: dict[str, Tensor], key: str, target: Tensor, num_prefix_tokens: int,
                             grid: tuple[int, int], report: LoadReport,
                             old_grid: tuple[int, int] | None = None, *, scheme: str | None = None, source: str = "",
                             interpolation: str = "bicubic", antialias: bool = True) -> dict[str, Tensor]:
    """Resample ``state[key]`` (1, prefix + h·w, D) to the model's ``grid`` when the number of patches differs.

    The checkpoint's grid is ``old_grid`` when the caller knows it (a non-square checkpoint), else the square grid
    its length implies; a length that fits neither is left for the strict mismatch error. ``scheme`` names one of
    ``vitkit.layers.pos_embed.POS_EMBED_RESIZES`` (the family's choice for the checkpoint's source,
    ``vitkit.specs.ResizeRule``) and ``source`` the official file@commit it follows; the report names both. Without
    a scheme, ``resample_pos_embed(interpolation, antialias)`` runs (default bicubic antialiased: timm's
    ``resample_abs_pos_embed``, not DeiT's or BEiT's, which do not antialias)."""
    pos = state.get(key)
    if pos is None or pos.shape == target.shape or pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return state
    n_old = pos.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            return state  # not a square grid: leave it for the mismatch error
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        return state
    out = dict(state)
    if scheme is None:
        out[key] = resample_pos_embed(pos, grid, old_grid, num_prefix_tokens, interpolation, antialias)
        how = f"{interpolation}{'' if antialias else ' without antialiasing'}"
    else:
        resize = get_pos_embed_resize(scheme)
        out[key] = resize.fn(pos, grid, old_grid, num_prefix_tokens)
        how = f"{resize.describe}: {source or resize.origin}"
    report.resized.append(f"{key} {tuple(pos.shape)} → {tuple(out[key].shape)} (grid {old_grid[0]}x{old_grid[1]} → "
                          f"{grid[0]}x{grid[1]}, {how}, {num_prefix_tokens} prefix token(s) kept)")
    return out


def resize_rel_pos_tables(state: dict[str, Tensor], model: nn.Module, suffix: str, report: LoadReport,
                          method: str, window_of, extra_rows: int = 0, source: str = "") -> dict[str, Tensor]:
    """Resize every relative-position bias table (``*{suffix}``, (rows, heads)) whose row count differs from the
    model's, with ``resize_rel_pos_bias_table(method=...)``; ``window_of(rows)`` names the (Wh, Ww) window a table of
    that many rows belongs to. The report says which method ran (they differ by ~1e-2 in the logits) and ``source``,
    the official file@commit it follows."""
    targets = {k: v for k, v in model.state_dict().items() if k.endswith(suffix)}
    out = dict(state)
    for key, target in targets.items():
        table = state.get(key)
        if table is None or table.shape == target.shape or table.shape[1:] != target.shape[1:]:
            continue
        old, new = window_of(table.shape[0] - extra_rows), window_of(target.shape[0] - extra_rows)
        if old is None or new is None:
            continue
        out[key] = resize_rel_pos_bias_table(table, old, new, extra_rows, method)
        report.resized.append(f"{key} {tuple(table.shape)} → {tuple(target.shape)} (window {old[0]}x{old[1]} → "
                              f"{new[0]}x{new[1]}, {method}{': ' + source if source else ''})")
    return out


def reconcile_buffers(state: dict[str, Tensor], model: nn.Module, suffixes: tuple[str, ...], report: LoadReport,
                      why: str) -> dict[str, Tensor]:
    """Buffers vitkit computes itself (relative-position indices, attention masks) that a checkpoint also carries are
    checked, not trusted: equal to ours → kept (ours), absent → ours, different → an error naming them, unless the
    model's geometry changed (another input size or window), which ``why`` then explains in the report."""
    ours = {k: v for k, v in model.state_dict().items() if k.endswith(suffixes)}
    out = dict(state)
    differ = []
    for key, value in ours.items():
        theirs = state.get(key)
        if theirs is not None and (theirs.shape != value.shape or not torch.equal(theirs.to(value.dtype), value)):
            differ.append(key)
        out[key] = value
    stray = [k for k in state if k.endswith(suffixes) and k not in ours]
    for key in stray:  # e.g. an attention mask of a block that has no shifted windows at this size
        out.pop(key)
    if (differ or stray) and not why:
        raise CheckpointMismatchError(f"{report.source}: computed buffers differ from the model's: "
                                      f"{', '.join((differ + stray)[:6])}" + (" …" if len(differ + stray) > 6 else ""))
    if differ or stray:
        report.notes.append(f"{len(differ) + len(stray)} computed buffer(s) ({', '.join(sorted({k.rsplit('.', 1)[-1] for k in differ + stray}))}) "
                            f"recomputed: {why}")
    checked = len([k for k in ours if k in state]) - len(differ)
    if checked:
        report.notes.append(f"{checked} computed buffer(s) in the checkpoint checked equal to vitkit's")
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
