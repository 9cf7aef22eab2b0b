"""Checkpoint formats of DAT (CVPR 2022): the official release files of LeapLabTHU/DAT, and the rename table that also
reads DAT++'s (``vitkit.families.dat_pp.formats`` declares that format with it).

Both versions save ``{'model': state_dict}`` (Swin-style ``save_checkpoint``) with NCHW module names: per stage
``layer_norms.{2d, 2d+1}`` (the two norms of block d), ``attns.{d}``, ``mlps.{d}``, DAT++'s ``layer_scales.{2d, 2d+1}``
and ``local_perception_units.{d}``; ``down_projs.{i}`` between stages; ``cls_norm``, ``cls_head``. Window blocks carry
their computed ``relative_position_index`` / ``attn_mask`` buffers (checked by the model's loader, never trusted);
deformable blocks ``conv_offset`` (0 = depth-wise conv, 1 = LayerNorm, 3 = 1×1 conv), ``proj_{q,k,v,out}`` and
``rpe_table`` (the bias table, the fixed bias, or with ``dwc_pes`` the depth-wise conv, ``lepe`` here). The
1×1 convs become dense layers (``_to_dense``). vitkit opens stage i + 1 with ``down_projs.{i}``, names the two block
norms ``norm1`` / ``norm2`` and every output projection ``proj``.

A DAT++ file is told from a v1 file (``is_dat_pp``) by a part only DAT++ has (neighbourhood attention ``rpb``, local
perception units, layer scales, its conv-MLP ``linear1.0``, the two-conv stem, the log-CPB MLP ``rpe_table.0``); every
released DAT++ model has several. Weights: the release files are published only behind share links (Google Drive /
Tsinghua Cloud / OneDrive in the two READMEs), with no stable download URL and no hash, so they are not in a catalog
(each catalog's ``NO_STABLE_SOURCE`` says where they are): download them by hand and pass the path. timm and
transformers have no DAT.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import KeyMap, Rename

__all__ = ["FORMATS", "official_keymap", "from_official", "official_hints", "is_dat_layout", "is_dat_pp"]

_MAX_BLOCKS = 64  # per stage, for the generated norm / layer-scale rules (DAT-B has 18)
_ATTN = "stages.{i}.attns.{j}."
_BLOCK = "stages.{i}.blocks.{j}."
_DAT_PP_MARKERS = (".rpb", "local_perception_units.", "layer_scales.", ".linear1.0.", "patch_proj.3.", ".rpe_table.0.")


def official_keymap(conv_stem: bool) -> KeyMap:
    """Official → vitkit rename table (either version); ``conv_stem``: DAT++'s two-conv ``patch_proj``."""
    stem = [Rename("patch_proj.0.", "stem.0.proj."), Rename("patch_proj.1.norm.", "stem.0.norm."),
            Rename("patch_proj.3.", "stem.2.proj."), Rename("patch_proj.4.norm.", "stem.2.norm.")] if conv_stem else \
        [Rename("patch_proj.0.", "stem.proj."), Rename("patch_proj.1.norm.", "stem.norm.")]
    pairs = [rule for d in range(_MAX_BLOCKS) for rule in (
        Rename(f"stages.{{i}}.layer_norms.{2 * d}.norm.", f"stages.{{i}}.blocks.{d}.norm1."),
        Rename(f"stages.{{i}}.layer_norms.{2 * d + 1}.norm.", f"stages.{{i}}.blocks.{d}.norm2."),
        Rename(f"stages.{{i}}.layer_scales.{2 * d}.weight", f"stages.{{i}}.blocks.{d}.ls1.gamma"),
        Rename(f"stages.{{i}}.layer_scales.{2 * d + 1}.weight", f"stages.{{i}}.blocks.{d}.ls2.gamma"))]
    mlp = "stages.{i}.mlps.{j}."
    return KeyMap([
        *stem,
        Rename("down_projs.{i}.0.", "stages.{i+1}.downsample.proj."),
        Rename("down_projs.{i}.1.norm.", "stages.{i+1}.downsample.norm."),
        Rename("stages.{i}.proj.", "stages.{i}.proj."),
        *pairs,
        Rename(mlp + "chunk.linear1.", _BLOCK + "mlp.fc1."),  # TransformerMLP
        Rename(mlp + "chunk.linear2.", _BLOCK + "mlp.fc2."),
        Rename(mlp + "linear1.0.", _BLOCK + "mlp.fc1."),  # DAT++ TransformerMLPWithConv (1×1 convs in Sequentials)
        Rename(mlp + "linear2.0.", _BLOCK + "mlp.fc2."),
        Rename(mlp + "linear1.", _BLOCK + "mlp.fc1."),  # DAT v1 TransformerMLPWithConv
        Rename(mlp + "linear2.", _BLOCK + "mlp.fc2."),
        Rename(mlp + "dwc.", _BLOCK + "mlp.dwconv."),
        Rename("stages.{i}.local_perception_units.{j}.", _BLOCK + "lpu."),
        Rename(_ATTN + "proj_qkv.", _BLOCK + "attn.qkv."),  # local / shifted windows
        Rename(_ATTN + "proj_out.", _BLOCK + "attn.proj."),  # windows and deformable attention
        Rename(_ATTN + "proj_ds.0.", _BLOCK + "attn.sr."),  # DAT++ 'P' blocks: the reduction conv and its norm
        Rename(_ATTN + "proj_ds.1.norm.", _BLOCK + "attn.norm."),
        Rename("stages.{i}.ln_cnvnxt.{j}.norm.", _BLOCK + "norm."),  # DAT++ 'X' blocks (their conv: attns.{j})
        Rename(_ATTN + "conv_offset.0.", _BLOCK + "attn.offsets.conv."),
        Rename(_ATTN + "conv_offset.1.norm.", _BLOCK + "attn.offsets.norm."),
        Rename(_ATTN + "conv_offset.3.", _BLOCK + "attn.offsets.proj."),
        Rename(_ATTN + "rpe_table.weight", _BLOCK + "attn.lepe.weight"),  # dwc_pe: the depth-wise conv is rpe_table
        Rename(_ATTN + "rpe_table.bias", _BLOCK + "attn.lepe.bias"),
        Rename(_ATTN + "rpe_table.", _BLOCK + "attn.rpe_mlp."),  # DAT++ log-CPB MLP (the table itself: next rule)
        Rename(_ATTN, _BLOCK + "attn."),  # proj_q/k/v, rpe_table, window buffers and tables, NATTEN qkv/proj/rpb
        Rename("cls_norm.norm.", "norm."),
        Rename("cls_head.", "head."),
    ], name="official DAT")


_DENSE = (".proj_q.weight", ".proj_k.weight", ".proj_v.weight", ".attn.proj.weight", ".offsets.proj.weight",
          ".mlp.fc1.weight", ".mlp.fc2.weight", "stages.0.proj.weight", ".attn.q.weight", ".attn.kv.weight")


def _to_dense(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official 1×1 convs (out, in, 1, 1) as dense-layer weights (out, in)."""
    return {k: v.flatten(1) if v.ndim == 4 and v.shape[2:] == (1, 1) and k.endswith(_DENSE) else v
            for k, v in state.items()}


def from_official(state: dict[str, Tensor], report=None) -> dict[str, Tensor]:
    """An official state dict (either version) in vitkit's layout: renamed, 1×1 convs as dense weights."""
    return _to_dense(official_keymap("patch_proj.3.weight" in state).forward(state, report))


def is_dat_layout(view: CheckpointView) -> bool:
    """The official layout of either version (``is_dat_pp`` tells them apart)."""
    return view.has("patch_proj.0.weight", "cls_head.weight", "down_projs.0.0.weight") and \
        view.any_startswith("stages.0.")


def is_dat_pp(keys) -> bool:
    """A part only DAT++ has (module docstring)."""
    return any(marker in k for k in keys for marker in _DAT_PP_MARKERS)


def official_hints(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    head = state.get("cls_head.weight")
    return {"num_classes": int(head.shape[0])} if head is not None else {}


OFFICIAL_FORMAT = SourceFormat(
    "official", lambda view: is_dat_layout(view) and not is_dat_pp(view.keys), from_official, official_hints,
    description="LeapLabTHU/DAT release file of DAT v1 (tag CVPR2022): {'model': state_dict}, window buffers included")

FORMATS = (OFFICIAL_FORMAT,)
