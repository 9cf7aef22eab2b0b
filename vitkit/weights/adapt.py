"""Fitting a converted (vitkit-layout) state dict to a built model: shared steps every family's
``load_pretrained_state`` is made of, and the final strict check that lists whatever cannot be explained."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from vitkit.layers.pos_embed import get_pos_embed_resize, resample_pos_embed
from vitkit.layers.pos_embed_rel import relative_position_index, resize_rel_pos_bias_table
from vitkit.layers.window_attention import shifted_window_mask
from vitkit.weights.load_report import CheckpointMismatchError, LoadReport

__all__ = ["resample_pos_embed_state", "resize_rel_pos_tables", "reconcile_buffers", "adapt_head", "reinit_head",
           "drop_keys", "upcast", "adapt_input_channels", "input_channel_weights", "check_window_buffers",
           "finish_load"]


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
    name = model.variant_name or type(model).__name__
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


def input_channel_weights(weight: Tensor, in_chans: int) -> Tensor:
    """A first layer's (O, C_old, kh, kw) weights for ``in_chans`` input channels from weights trained on C_old, as
    timm's ``adapt_input_conv`` does: one channel sums the trained channels' filters (a grey image seen as R = G = B
    gives the trained response); N channels repeat the trained ones cyclically and scale by C_old / N (N equal
    channels give the trained response)."""
    old, w = weight.shape[1], weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)  # (O, 1, kh, kw)
    else:
        repeats = -(-in_chans // old)
        out = w.repeat(1, repeats, 1, 1)[:, :in_chans] * (old / in_chans)  # (O, in_chans, kh, kw)
    return out.to(weight.dtype)


def adapt_input_channels(state: dict[str, Tensor], model: nn.Module, report: LoadReport) -> dict[str, Tensor]:
    """Fit the weights that see the input channels (the family's ``input_weights``) to a model built for another
    ``in_chans`` (``input_channel_weights``); the report names each. A linear layer over unfolded patches (T2T-ViT's
    soft split) is viewed as (O, C, k) for it."""
    targets = model.state_dict()
    out = dict(state)
    for key in type(model).input_weights:
        w, target = state.get(key), targets.get(key)
        if w is None or target is None or w.shape == target.shape:
            continue
        if type(model).fixed_input_channels:
            raise CheckpointMismatchError(f"{report.source}: {key} {tuple(w.shape)} is for another number of input "
                                          f"channels than in_chans={model.cfg.in_chans} "
                                          f"({tuple(target.shape)}): {type(model).fixed_input_channels}")
        if w.ndim == 4 and w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:]:
            new = input_channel_weights(w, target.shape[1])
        elif w.ndim == 2 and w.shape[0] == target.shape[0] and w.shape[1] % model.cfg.in_chans == 0:
            cells = target.shape[1] // model.cfg.in_chans  # kernel cells per channel of the unfolded patch
            if w.shape[1] % cells:
                continue
            old = w.shape[1] // cells
            new = input_channel_weights(w.reshape(w.shape[0], old, cells, 1), model.cfg.in_chans)
            new = new.reshape(target.shape)  # (O, C·k)
        else:
            continue
        how = "summed over" if model.cfg.in_chans == 1 else "repeated and scaled from"
        report.notes.append(f"{key} {tuple(w.shape)} → {tuple(new.shape)}: input channels {how} the checkpoint's "
                            f"(timm adapt_input_conv), for in_chans={model.cfg.in_chans}")
        out[key] = new
    return out


def finish_load(model: nn.Module, state: dict[str, Tensor], report: LoadReport) -> None:
    """Upcast, fit the input channels, let the model adapt the state dict (resize, re-initialise), check it strictly
    and load it."""
    state = upcast(state, report)
    state = adapt_input_channels(state, model, report)
    state = model.load_pretrained_state(state, report)
    check_compatible(model, state, report.source)
    model.load_state_dict(state, strict=True)


def check_window_buffers(state: dict[str, Tensor], report, source: dict[str, Tensor] | None, *,
                         label: str, shift_of: Callable[[int], int] = lambda window: window // 2) -> None:
    """A checkpoint's ``relative_position_index`` / ``attn_mask`` buffers must be the ones the window layers compute
    for the checkpoint's own geometry: ``source``'s (computed from the configuration a vitkit file states), else the
    geometry their shapes imply: an index of N = W² tokens for a W×W window, a mask of nW windows of N tokens for a
    square grid of √nW windows shifted by ``shift_of(W)`` (Swin: W // 2; DAT: ⌈W / 2⌉). Anything else is refused
    (``CheckpointMismatchError`` naming the keys and the family ``label``); the loader then replaces them by the
    model's own."""
    wrong = []
    for key, value in state.items():
        if source is not None and key.endswith(("relative_position_index", "attn_mask")):
            expected = source.get(key)
        elif key.endswith("relative_position_index") and value.ndim == 2:
            side = math.isqrt(value.shape[0])
            expected = relative_position_index((side, side))
        elif key.endswith("attn_mask") and value.ndim == 3:
            side, per_axis = math.isqrt(value.shape[1]), math.isqrt(value.shape[0])
            shift = shift_of(side)
            expected = shifted_window_mask((per_axis * side,) * 2, (side, side), (shift, shift)) if 0 < shift < side \
                else None
        elif key.endswith(("relative_position_index", "attn_mask")):
            expected = None
        else:
            continue
        if expected is None or expected.shape != value.shape or not torch.equal(expected.to(value.dtype), value):
            wrong.append(key)
    if wrong:
        raise CheckpointMismatchError(f"{report.source}: {len(wrong)} buffer(s) are not the relative-position index "
                                      f"/ shifted-window mask {label} computes for their shape (vitkit names): "
                                      f"{', '.join(wrong[:4])}{' …' if len(wrong) > 4 else ''}")
