"""Checkpoint formats of the CCT family, and how a checkpoint's position table is fitted to a model.

One public format exists: the official release files of SHI-Labs/Compact-Transformers (``model_urls`` in
``src/cct.py``), bare state dicts that ``_cct`` passes straight to ``load_state_dict``. Neither timm
(``timm/models/``) nor transformers (``src/transformers/models/``, checked in 5.25.0) has a CCT model, so there is no
timm format, no transformers twin and no parity test against transformers. The official files are the named weights
(``catalog.WEIGHTS``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from vitkit.layers.pos_embed import sinusoid_table
from vitkit.layers.patch_embed import to_2tuple
from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import KeyMap, Rename

__all__ = ["FORMATS", "OFFICIAL", "official_hints", "fit_pos_embed", "is_sinusoid"]

# A checkpoint's position table "is" the sinusoid when it matches the official formula to this: rounding the angles
# to float32 (CCT) or not (numpy) differs by up to 3e-5; a trained table is nowhere near.
SINE_ATOL = 1e-4

# ---------------------------------------------------------------------------------------------------- official
OFFICIAL = KeyMap([
    Rename("tokenizer.conv_layers.{i}.0.", "tokenizer.convs.{i}."),  # Sequential(Conv2d, ReLU, MaxPool2d)
    Rename("classifier.positional_emb", "pos_embed"),
    Rename("classifier.blocks.{i}.pre_norm.", "blocks.{i}.norm1."),
    Rename("classifier.blocks.{i}.self_attn.", "blocks.{i}.attn."),  # qkv (no bias), proj
    Rename("classifier.blocks.{i}.norm1.", "blocks.{i}.norm2."),  # the norm of the residual stream
    Rename("classifier.blocks.{i}.linear1.", "blocks.{i}.mlp.fc1."),
    Rename("classifier.blocks.{i}.linear2.", "blocks.{i}.mlp.fc2."),
    Rename("classifier.norm.", "norm."),
    Rename("classifier.attention_pool.", "attn_pool."),
    Rename("classifier.fc.", "head."),
], name="official CCT")


def _looks_official(view: CheckpointView) -> bool:
    return view.any_startswith("tokenizer.conv_layers.") and view.has("classifier.attention_pool.weight")


def is_sinusoid(table: Tensor) -> bool:
    """Whether a (1, N, D) table is the official sinusoid of its length (to float32 rounding)."""
    if table.ndim != 3 or table.shape[0] != 1:
        return False
    ref = sinusoid_table(table.shape[1], table.shape[2], angle_dtype=torch.float32)
    return bool(torch.allclose(table.float(), ref, rtol=0.0, atol=SINE_ATOL))


def official_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Head size, and the kind of position embedding the file holds: a sine table, a learned one, or none. The
    checkpoint decides, whatever the variant's name (the official ``*_sine`` factories build learnable models)."""
    hints: dict[str, Any] = {}
    if "classifier.fc.weight" in state:
        hints["num_classes"] = int(state["classifier.fc.weight"].shape[0])
    pos = state.get("classifier.positional_emb")
    hints["positional_embedding"] = "none" if pos is None else "sine" if is_sinusoid(pos) else "learnable"
    return hints


OFFICIAL_FORMAT = SourceFormat("official", _looks_official, OFFICIAL.forward, official_hints,
                               description="SHI-Labs/Compact-Transformers release file (bare state dict)")
FORMATS = (OFFICIAL_FORMAT,)


# ----------------------------------------------------------------------------------------- fitting the table
def _source_grid(model: nn.Module, report) -> tuple[int, int] | None:
    """The checkpoint's token grid when its config says its image size (a vitkit folder; may be non-square)."""
    from vitkit.families.cct.model import token_grid
    size = report.source_config.get("img_size")
    return token_grid(model.cfg, *to_2tuple(size)) if size else None


def fit_pos_embed(model: nn.Module, state: dict[str, Tensor], report) -> dict[str, Tensor]:
    """Fit ``state['pos_embed']`` to ``model``.

    learnable, another token count: resampled bilinearly without antialiasing (official ``pe_check`` →
    ``resize_pos_embed``); sine, same count: the checkpoint's table is loaded (it is what the weights were trained
    with) and compared with the official formula, the report says which; sine, another count: regenerated, as the
    official ``_cct`` replaces a sine checkpoint's table by the model's own (a 1-D table over the flattened grid has
    no 2-D meaning to resample).
    """
    from vitkit.weights.adapt import resample_pos_embed_state
    pos = state.get("pos_embed")
    if pos is None or model.pos_embed is None:
        return state
    target = model.pos_embed
    if model.cfg.positional_embedding == "learnable":
        return resample_pos_embed_state(state, "pos_embed", target, 0, model.grid, report, _source_grid(model, report),
                                        interpolation="bilinear", antialias=False)
    own = is_sinusoid(pos)
    if pos.shape == target.shape:
        diff = (pos.float() - target.float()).abs().max().item()
        report.notes.append(f"pos_embed: the checkpoint's frozen sinusoidal table {tuple(pos.shape)} loaded; "
                            + (f"equal to the official formula's (max |diff| {diff:.1e})" if own else
                               f"it is NOT the official sinusoid (max |diff| {diff:.2e}); kept as trained"))
        return state
    if pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return state  # another width: left for the strict mismatch error
    out = dict(state)
    out["pos_embed"] = target.detach().clone()
    report.resized.append(f"pos_embed {tuple(pos.shape)} → {tuple(target.shape)}: sinusoidal table regenerated for "
                          f"{target.shape[1]} tokens (official _cct; a sine table is not resampled)"
                          + ("" if own else "; the checkpoint's table was NOT the official sinusoid"))
    return out
