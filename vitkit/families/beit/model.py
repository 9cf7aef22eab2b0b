"""BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022, arXiv 2106.08254), the fine-tuning
model of microsoft/unilm ``beit/modeling_finetune.py``.

A ViT (eq. 1-3 of the ViT paper; ``vitkit.families.vit``, its parent: ``BeitConfig`` and ``Beit`` subclass ViT's
config and model) with four changes, each taken from the official code:

    attention logits   A = q kᵀ / √d + B_rel,  B_rel[h, i, j] = table[index(i, j), h]  (official Attention; per block)
    projections        q = x W_q + b_q,  k = x W_k,  v = x W_v + b_v                     (no key bias)
    residual branches  x = x + γ₁ ⊙ MSA(LN(x)),  x = x + γ₂ ⊙ MLP(LN(x))                (layer scale)
    pooling            y = LN_fc(mean of the patch tokens)                                (no class-token head)

The relative-position table has (2Wh−1)(2Ww−1) rows for the patch-to-patch offsets plus three for class-to-token,
token-to-class and class-to-class (``vitkit.layers.pos_embed_rel``). Fine-tuned models have one table per block and
no absolute position embedding; the self-supervised pre-training shares one table across blocks
(``use_shared_rel_pos_bias``), and a pre-trained checkpoint's shared table is copied into every block's, as the
official fine-tuning script (``run_class_finetuning.py``) does. Module names follow vitkit's ViT (LayerScale
``ls1.gamma`` for the official ``gamma_1``, the table inside ``attn.rel_pos``); ``formats.py`` renames.

Masked image modelling (BEiT §2.3; ``mim_vocab_size`` > 0), the pre-training model of ``beit/modeling_pretrain.py``
``VisionTransformerForMaskedImageModeling``: the embeddings of the masked patches are replaced by a learned
``mask_token`` before the class token and the blocks, and a linear ``lm_head`` on the final-norm output predicts
each masked patch's visual token (one of ``mim_vocab_size``, 8192 for the DALL-E tokenizer):

    e_i = (1 − m_i) · x_i W_p + m_i · e_[M]        (w = bool_masked_pos.unsqueeze(-1); x * (1 - w) + mask_token * w)
    logits = lm_head(LN(h_L)[:, 1:][m])             (forward(x, bool_masked_pos, return_all_tokens=False))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError
from vitkit.families.contract import block_layer_id, check_input
from vitkit.families.vit.model import ViTConfig, VisionTransformer
from vitkit.layers import Attention, Block, RelativePositionBias, num_relative_distances

__all__ = ["BeitConfig", "Beit"]


@dataclass
class BeitConfig(ViTConfig):
    """ViT's fields with BEiT-base's defaults (timm's names; official ``VisionTransformer`` + fine-tuning flags)."""

    qkv_bias: bool = True  # BEiT: separate q and v biases, no k bias
    global_pool: Literal["token", "avg"] = "avg"  # official --use_mean_pooling (default) / --use_cls
    init_values: float | None = 0.1  # official --layer_scale_init_value: 0.1 base, 1e-5 large; None = no layer scale
    use_abs_pos_emb: bool = False  # official --abs_pos_emb (False for every released BEiT v1 model)
    use_rel_pos_bias: bool = True  # one relative-position table per block (official fine-tuning default)
    use_shared_rel_pos_bias: bool = False  # one table for all blocks (official pre-training)
    # official init_scale: the head starts as trunc_normal(std=0.02) · init_scale (official default 0.001), bias 0;
    # None: vitkit's zero head (ViT paper App. B.1.1). Initialisation only.
    init_scale: float | None = None
    # official modeling_pretrain.py vocab_size: a masked-image-modelling head (mask_token, lm_head) predicting that
    # many visual tokens (8192: the DALL-E tokenizer of the released pre-training); 0 = none, the fine-tuning model
    mim_vocab_size: int = 0
    # official modeling_pretrain.py init_std: the std (and the ±truncation) of the pre-training model's initial draws;
    # initialisation only, read when mim_vocab_size > 0 (the fine-tuning model draws with 0.02, truncated at ±2)
    init_std: float = 0.02

    # ViT's refusals name arguments modeling_finetune.py does not have; these are modeling_pretrain.py's
    refused_options: ClassVar[dict[str, str]] = {
        "vocab_size": "the masked-image-modelling head's vocabulary is mim_vocab_size here (0: no head)",
        "attn_head_dim": "no released BEiT sets it (every one has head width embed_dim / num_heads, the official "
                         "default); vitkit's attention has no separate head width",
    }

    def validate(self) -> None:
        if not self.add_position_embedding:
            raise ConfigError("add_position_embedding: BEiT's absolute position embedding is use_abs_pos_emb")
        if self.head_bias_init:
            raise ConfigError("head_bias_init: BEiT's head initialisation is init_scale")
        super().validate()
        if self.representation_size:
            raise ConfigError("representation_size: BEiT has no pre-logits layer")
        if not self.class_token:
            raise ConfigError("class_token: BEiT always has a class token (its bias table has class-token rows)")
        if self.dynamic_img_size and (self.use_rel_pos_bias or self.use_shared_rel_pos_bias):
            raise ConfigError("dynamic_img_size: BEiT's relative-position tables belong to one patch grid; build the "
                              "model for the input size with img_size=")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}")
        if self.mim_vocab_size < 0:
            raise ConfigError(f"mim_vocab_size must be >= 0 (0: no masked-image-modelling head), got "
                              f"{self.mim_vocab_size}")
        if self.mim_vocab_size and (self.global_pool == "avg" if self.fc_norm is None else self.fc_norm):
            raise ConfigError("mim_vocab_size: the masked-image-modelling head reads every token after the final norm "
                              "(modeling_pretrain.py), which fc_norm replaces; build it with fc_norm=False or "
                              "global_pool='token'")


class Beit(VisionTransformer):
    config_cls = BeitConfig

    def __init__(self, cfg: BeitConfig):
        super().__init__(cfg)
        # registered after the blocks and the head: its layer id is the last one, as in BEiT's layer decay
        self.rel_pos_bias = (RelativePositionBias(self.patch_embed.grid_size, cfg.num_heads, class_token=True)
                             if cfg.use_shared_rel_pos_bias else None)
        # masked image modelling (modeling_pretrain.py): registered after the head, lm_head's layer id is the last
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.mim_vocab_size else None
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.mim_vocab_size) if cfg.mim_vocab_size else None
        if self.lm_head is not None:
            self.init_weights()  # again, now that its parts exist: the pre-training initialisation

    # ----------------------------------------------------------------------------------------------- construction
    @property
    def has_pos_embed(self) -> bool:
        return self.cfg.use_abs_pos_emb

    def make_block(self, i: int, drop_path: float) -> nn.Module:
        cfg = self.cfg
        rel_pos = (RelativePositionBias(self.patch_embed.grid_size, cfg.num_heads, class_token=True)
                   if cfg.use_rel_pos_bias else None)
        attn = Attention(cfg.embed_dim, cfg.num_heads, qkv_bias="qv" if cfg.qkv_bias else False,
                         attn_drop=cfg.attn_drop_rate, proj_drop=cfg.proj_drop_rate, rel_pos=rel_pos,
                         scale=cfg.qk_scale)
        return Block(cfg.embed_dim, mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.proj_drop_rate, drop_path=drop_path,
                     init_values=cfg.init_values, act_layer=cfg.act_layer, norm_eps=cfg.norm_eps, attn=attn)

    def init_weights(self) -> None:
        """ViT's initialisation, plus the official ``fix_init_weight``: block ``l``'s output projection and fc2
        are divided by √(2l) (l = 1…depth), and a truncated-normal class token. Bias tables start at zero. The head
        stays zero-initialised (vitkit's convention) unless ``init_scale`` is set: then it is the official one,
        trunc_normal(std=0.02) · init_scale and a zero bias (``modeling_finetune.py`` ``VisionTransformer``). A model
        with a masked-image-modelling head starts as the pre-training model does (``_init_pretraining``)."""
        if getattr(self, "lm_head", None) is not None:
            self._init_pretraining()
        else:
            super().init_weights()
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            for layer, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_((2.0 * layer) ** 0.5)
                blk.mlp.fc2.weight.div_((2.0 * layer) ** 0.5)
        self._init_scaled_head()

    def _init_pretraining(self) -> None:
        """``modeling_pretrain.py`` ``VisionTransformerForMaskedImageModeling.__init__`` / ``_init_weights``: the
        absolute embedding, class and mask tokens, every Linear (``lm_head`` included) and Conv2d kernel drawn from
        its ``trunc_normal_(std=init_std)``, which truncates at ±1 std (``a=-std, b=std``), biases zero; LayerNorms,
        bias tables, q/v biases and layer scale keep their construction values (1 / 0, 0, 0, ``init_values``), as
        there. ``init_weights`` then applies ``fix_init_weight`` and the classifier's init."""
        std = self.cfg.init_std
        with torch.no_grad():
            for t in (self.pos_embed, self.cls_token, self.mask_token):
                if t is not None:
                    nn.init.trunc_normal_(t, std=std, a=-std, b=std)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(m.weight, std=std, a=-std, b=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self._init_classifiers()

    def _init_scaled_head(self) -> None:
        """The official head: ``trunc_normal_(head.weight, std=.02)``, zero bias, both multiplied by ``init_scale``."""
        if self.cfg.init_scale is None:
            return
        with torch.no_grad():
            for head in self.classifiers():
                nn.init.trunc_normal_(head.weight, std=0.02)
                head.weight.mul_(self.cfg.init_scale)
                head.bias.zero_()

    def layer_id(self, param_name: str) -> int:
        """ViT's numbering with the mask token among the embeddings (0), as the official layer decay has it
        (``optim_factory.py`` ``get_num_layer_for_vit``); the shared table and ``lm_head`` come last."""
        return block_layer_id(param_name, self.cfg.depth,
                              ("cls_token", "mask_token", "dist_token", "pos_embed", "patch_embed"))

    # --------------------------------------------------------------------------------------------------- forward
    def block_args(self) -> tuple:
        """The shared table's (heads, N, N) bias goes to every block (added to a block's own table, if any)."""
        return (self.rel_pos_bias(),) if self.rel_pos_bias is not None else ()

    @property
    def mim_vocab_size(self) -> int:
        return self.cfg.mim_vocab_size

    def masked_token_logits(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, C, H, W) images, (B, N) bool mask → (M, mim_vocab_size) logits of the M masked positions, image by
        image in row-major order: ``modeling_pretrain.py`` ``forward(x, bool_masked_pos, return_all_tokens=False)``
        = ``lm_head(norm(blocks([cls; masked patch embeddings] + pos))[:, 1:][bool_masked_pos])``."""
        if self.lm_head is None:
            raise ValueError(f"{self.variant_name or type(self).__name__} has no masked-image-modelling head: build "
                             f"it with mim_vocab_size > 0 (e.g. beit_base_patch16_224_8k_vocab)")
        check_input(x, self.cfg.in_chans)
        grid = self.patch_embed.output_grid(*x.shape[-2:])
        patches = self.patch_embed(x)  # (B, N, D)
        _check_mask(mask, patches.shape[:2], grid)
        w = mask.unsqueeze(-1).type_as(patches)  # (B, N, 1): 1 at masked positions
        patches = patches * (1 - w) + self.mask_token * w  # the official replacement, term for term
        tokens = self._pos_embed(patches, grid)  # (B, 1 + N, D)
        args = self.block_args()
        for blk in self.blocks:
            tokens = blk(tokens, *args)
        tokens = self.norm(tokens)[:, self.num_prefix_tokens:]  # (B, N, D)
        return self.lm_head(tokens[mask])  # (M, D) → (M, V)

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Fit a BEiT state dict (vitkit layout) to this model, as ``run_class_finetuning.py`` does:

        1. a pre-training checkpoint's MIM parts (``mask_token``, ``lm_head``; kept by a model with the MIM head) and
           final ``norm`` are dropped, ``fc_norm`` and the head start fresh;
        2. a shared table (pre-training) is copied into every block's table when the model has per-block tables;
        3. ``relative_position_index`` buffers are checked against the model's (recomputed if the grid changed);
        4. tables of another grid are resized as the checkpoint's source does it (``report.resize``: BEiT's
           geometric-progression cubic interpolation, transformers' bilinear);
        5. then ViT's steps: the absolute position embedding (if any) resampled, a head of another size replaced.
        """
        from vitkit.weights.adapt import reconcile_buffers, resize_rel_pos_tables
        state = self._pretraining_to_finetuning(state, report)
        state = self._expand_shared_table(state, report)
        old_grid = self._checkpoint_grid(state, report)
        grid = self.patch_embed.grid_size
        moved = f"the patch grid changed from {old_grid[0]}x{old_grid[1]} to {grid[0]}x{grid[1]}" \
            if old_grid and old_grid != grid else ""
        state = reconcile_buffers(state, self, ("relative_position_index",), report, moved)
        windows = {num_relative_distances(w): w for w in (old_grid, grid) if w}
        rule = report.resize
        state = resize_rel_pos_tables(state, self, "relative_position_bias_table", report,
                                      rule.rel_pos if rule else "geometric",
                                      lambda rows: windows.get(rows) or _square_window(rows), extra_rows=3,
                                      source=rule.rel_pos_source if rule else "")
        return super().load_pretrained_state(state, report)

    def _pretraining_to_finetuning(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """A masked-image-modelling checkpoint (``mask_token``, ``lm_head``) has no classifier and ends in ``norm``.
        A model with the MIM head keeps them (``_fit_mim_head``); the fine-tuning script loads such a checkpoint
        non-strictly: the MIM parts and ``norm`` are unused, ``fc_norm`` and the head start fresh (here: identity
        LayerNorm, zero head)."""
        from vitkit.weights.adapt import drop_keys
        state = self._fit_mim_head(state, report)
        if not any(k == "mask_token" or k.startswith("lm_head.") for k in state):
            return state
        if self.lm_head is None:
            why = "masked-image-modelling pre-training (BEiT §2.3), not used for classification"
            state = drop_keys(drop_keys(state, "mask_token", report, why), "lm_head.", report, why)
        if isinstance(self.fc_norm, nn.LayerNorm) and "fc_norm.weight" not in state:
            state = drop_keys(state, "norm.", report, "the pre-training model's final norm; mean pooling feeds a "
                                                      "fresh fc_norm, as in run_class_finetuning.py")
            state["fc_norm.weight"], state["fc_norm.bias"] = torch.ones_like(self.fc_norm.weight), \
                torch.zeros_like(self.fc_norm.bias)
            report.reinitialized.append("fc_norm: absent from a pre-training checkpoint, initialised to identity")
        for head in self.classifiers():
            if "head.weight" not in state:
                state["head.weight"], state["head.bias"] = torch.zeros_like(head.weight), torch.zeros_like(head.bias)
                report.reinitialized.append(f"head: absent from a pre-training checkpoint, zero-initialised "
                                            f"({head.out_features} classes)")
        return state

    def _fit_mim_head(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """For a model with the masked-image-modelling head: the checkpoint's must predict as many visual tokens (the
        tokenizer's vocabulary; another one is refused, naming ``mim_vocab_size``); parts it lacks (a fine-tuned or
        feature checkpoint) keep the model's pre-training initialisation, each noted."""
        from vitkit.weights.load_report import CheckpointMismatchError
        if self.lm_head is None:
            return state
        theirs = state.get("lm_head.weight")
        if theirs is not None and theirs.ndim == 2 and theirs.shape[0] != self.mim_vocab_size \
                and theirs.shape[1] == self.lm_head.in_features:  # another width: the strict check names it
            raise CheckpointMismatchError(f"{report.source}: its lm_head predicts {theirs.shape[0]} visual tokens, "
                                          f"the model {self.mim_vocab_size}: build it with "
                                          f"mim_vocab_size={theirs.shape[0]}")
        own = {"mask_token": self.mask_token, "lm_head.weight": self.lm_head.weight, "lm_head.bias": self.lm_head.bias}
        missing = [k for k in own if k not in state]
        if not missing:
            return state
        report.reinitialized.append(f"{', '.join(missing)}: absent from the checkpoint, initialised as the "
                                    f"pre-training model does (modeling_pretrain.py)")
        return {**state, **{k: own[k].detach().clone() for k in missing}}

    def _expand_shared_table(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """run_class_finetuning.py: a shared table (``rel_pos_bias``) is copied into every block's table when the
        model has per-block tables and no shared one; its index buffer goes along to be checked per block."""
        shared = "rel_pos_bias.relative_position_bias_table"
        if shared not in state or self.rel_pos_bias is not None or not self.cfg.use_rel_pos_bias:
            return state
        if "blocks.0.attn.rel_pos.relative_position_bias_table" in state:
            return state  # per-block and shared tables both: the model needs use_shared_rel_pos_bias=True too
        out = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias.")}
        for i in range(len(self.blocks)):
            for name in ("relative_position_bias_table", "relative_position_index"):
                if f"rel_pos_bias.{name}" in state:
                    out[f"blocks.{i}.attn.rel_pos.{name}"] = state[f"rel_pos_bias.{name}"].clone()
        report.notes.append(f"shared relative-position bias (rel_pos_bias, pre-training) copied into each of the "
                            f"{len(self.blocks)} blocks' tables, as BEiT's fine-tuning code does "
                            f"(run_class_finetuning.py)")
        return out

    def _checkpoint_grid(self, state: dict[str, Tensor], report) -> tuple[int, int] | None:
        """The patch grid the checkpoint was built for: the one it states (a vitkit folder), else the square grid its
        first bias table implies (the official code assumes square grids too)."""
        table = next((v for k, v in state.items() if k.endswith("relative_position_bias_table")), None)
        return self.source_grid(report) or (None if table is None else _square_window(table.shape[0] - 3))


def _check_mask(mask: object, shape: tuple[int, int], grid: tuple[int, int]) -> None:
    """The mask is a (B, N) bool tensor over the patch grid, or a ValueError that says what it must be."""
    B, N = shape
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        got = f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, N) = ({B}, {N}) bool tensor over the {grid[0]}x{grid[1]} patch grid "
                         f"(row-major, True = masked), got {got}")


def _square_window(rows: int) -> tuple[int, int] | None:
    """The g×g grid whose offsets fill a (2g−1)² table, or None."""
    side = math.isqrt(rows)
    return ((side + 1) // 2,) * 2 if side * side == rows and side % 2 else None
