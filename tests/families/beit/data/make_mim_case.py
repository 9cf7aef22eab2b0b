"""The BEiT masked-image-modelling reference cases (``official_mim_shrunk/``), made by running the OFFICIAL
pre-training model on seeded random weights.

    git -C unilm checkout 768a3c873f598bb9b4d4dfb9267b099e35f8fe56
    PYTHONPATH=/path/to/unilm/beit:<torchvision shim> python tests/families/beit/data/make_mim_case.py tests/families/beit/data/official_mim_shrunk

The model is microsoft/unilm ``beit/modeling_pretrain.py`` ``VisionTransformerForMaskedImageModeling`` (its blocks,
patch embedding and relative-position bias from ``beit/modeling_finetune.py``), built with the flags
``run_beit_pretraining.py`` ``get_model`` passes, and called as ``engine_for_pretraining.py`` calls it:
``model(samples, bool_masked_pos=bool_masked_pos, return_all_tokens=False)`` → the logits of the masked positions.
The masks come from the official ``masking_generator.py`` ``MaskingGenerator`` (blockwise masking, seeded ``random``),
flattened and cast to bool as ``engine_for_pretraining.py`` does. timm 1.0.31 provides the helpers the two model files
import (``drop_path``, ``to_2tuple``, ``trunc_normal_``, ``register_model``; its torchvision imports answered by a
shim, no arithmetic from it); ``masking_generator.py`` uses ``np.int``, removed in numpy 1.24, so ``np.int = int`` is
set before it runs. Nothing of the official code is copied here.

Cases (shrunk BEiT-base shape: patch 16, width 48, depth 2, 3 heads, MLP ratio 4, LayerNorm eps 1e-6, q/v biases,
64-px input = a 4x4 patch grid, a 64-token vocabulary):

- ``pt22k``: the released pre-training configuration (README / ``run_beit_pretraining.py`` defaults:
  ``--layer_scale_init_value 0.1``, shared relative-position bias, no absolute position embedding);
- ``pt1k``: the other released one, ``beit_base_patch16_224_pt1k_800ep`` (``--disable_rel_pos_bias --abs_pos_emb
  --layer_scale_init_value 0``: an absolute embedding, no bias table, no layer scale).
"""
from __future__ import annotations

import json
import math
import random
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

import modeling_pretrain  # microsoft/unilm beit/

np.int = int  # masking_generator.py's np.zeros(dtype=np.int), for numpy >= 1.24
from masking_generator import MaskingGenerator  # microsoft/unilm beit/ (imported after the np.int shim)

COMMIT = "768a3c873f598bb9b4d4dfb9267b099e35f8fe56"
ARCH = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, qkv_bias=True,
            vocab_size=64)
# run_beit_pretraining.py get_model: use_shared_rel_pos_bias=args.rel_pos_bias, use_abs_pos_emb=args.abs_pos_emb,
# init_values=args.layer_scale_init_value
CASES = {
    "pt22k": dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1),
    "pt1k": dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0.0),
}


def build(flags: dict) -> nn.Module:
    return modeling_pretrain.VisionTransformerForMaskedImageModeling(
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **ARCH, **flags)  # the norm layer of beit_base_patch16_224_8k_vocab


def randomize(model: nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases incl. q/v 0.02 N, class
    token N(0, 0.02), gamma 0.1 (1 + 0.1 N)); the mask token, the absolute embedding and the bias table N(0, 0.5) so
    that each matters; float16-exact values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("bias", "q_bias", "v_bias")) and "relative_position" not in name:
                value = 0.02 * noise
            elif name.endswith(("gamma_1", "gamma_2")):
                value = 0.1 * (1 + 0.1 * noise)
            elif p.ndim == 1:
                value = 1 + 0.1 * noise
            elif name in ("pos_embed", "mask_token") or name.endswith("relative_position_bias_table"):
                value = 0.5 * noise
            elif name == "cls_token":
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def masks(grid: int, batch: int, seed: int) -> torch.Tensor:
    """(B, grid²) bool: the official blockwise masking, flattened as engine_for_pretraining.py does."""
    random.seed(seed)
    generator = MaskingGenerator((grid, grid), num_masking_patches=6, min_num_patches=2)
    return torch.stack([torch.from_numpy(generator()) for _ in range(batch)]).flatten(1).to(torch.bool)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    grid = ARCH["img_size"] // ARCH["patch_size"]
    x = torch.randn(2, 3, ARCH["img_size"], ARCH["img_size"], generator=torch.Generator().manual_seed(1801))
    x = x.half().float()
    bool_masked_pos = masks(grid, 2, 1802)
    io = {"pixel_values": x.half(), "bool_masked_pos": bool_masked_pos}
    for i, (case, flags) in enumerate(CASES.items()):
        model = build(flags).eval()
        randomize(model, 1810 + i)
        with torch.no_grad():
            io[f"{case}_logits"] = model(x, bool_masked_pos=bool_masked_pos, return_all_tokens=False)
        state = {k: (v.half() if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}
        torch.save({"model": state}, out / f"{case}.pth")
    save_file(io, str(out / "io.safetensors"),
              metadata={"source": f"microsoft/unilm@{COMMIT} beit/modeling_pretrain.py"})
    (out / "case.json").write_text(json.dumps({"commit": COMMIT, "arch": ARCH, "cases": CASES,
                                               "masked": bool_masked_pos.sum(1).tolist()}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
