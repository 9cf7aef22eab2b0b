"""The official transfer-learning loader on tests/families/t2t_vit/data/performer_64 at another input size (64 → 96 px).

    git -C T2T-ViT checkout 0f63dc9558f4d192de926504dbddfa1b3f5db6ca
    PYTHONPATH=/path/to/T2T-ViT:<torchvision shim> python tests/families/t2t_vit/data/make_resize_reference.py tests/families/t2t_vit/data

README §2 of yitu-opensource/T2T-ViT loads pretrained weights for another image size with
``utils.load_for_transfer_learning(model, path, use_ema=True, ...)``, which interpolates the stored sinusoidal
position table (``utils.resize_pos_embed``). That function is run here unmodified on the 64-px checkpoint, into the
official ``T2T_ViT(img_size=96, ...)``. Two API shims, no change to the arithmetic: ``utils.py`` uses ``math`` and
``F`` without importing them (the names are supplied: the standard ``math`` module and ``torch.nn.functional``), and
it runs ``os.popen('stty size')`` at import (answered with "24 80" when there is no terminal). timm 1.0.31 provides
``register_model``/``trunc_normal_``/``DropPath`` (its torchvision imports answered by a shim; no model arithmetic
comes from it). Nothing of the official code is copied here.
"""
from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

COMMIT = "0f63dc9558f4d192de926504dbddfa1b3f5db6ca"
KW = dict(tokens_type="performer", embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16, num_classes=10,
          qk_scale=32 ** -0.5)  # performer_64's constructor (tests/families/t2t_vit/data/README.md)


def import_official_utils():
    popen = os.popen
    os.popen = lambda cmd, *a: io.StringIO("24 80") if cmd.startswith("stty") else popen(cmd, *a)
    try:
        import utils
    finally:
        os.popen = popen
    utils.math, utils.F = math, F  # names utils.resize_pos_embed uses but utils.py does not import
    return utils


def main(out: Path) -> None:
    from models.t2t_vit import T2T_ViT
    utils = import_official_utils()
    pixels = load_file(str(out / "performer_64" / "io.safetensors"))["pixel_values_96"]
    model = T2T_ViT(img_size=96, **KW)
    utils.load_for_transfer_learning(model, str(out / "performer_64" / "checkpoint.pth.tar"), use_ema=True,
                                     strict=True)  # num_classes left at 1000: the 10-class head is kept, as it fits
    with torch.no_grad():
        logits = model.eval()(pixels)
    save_file({"logits_96": logits, "pos_embed_96": model.pos_embed.detach().clone()},
              str(out / "performer_64" / "resize_96_official.safetensors"),
              metadata={"source": f"yitu-opensource/T2T-ViT@{COMMIT} utils.load_for_transfer_learning",
                        "pixels": "io.safetensors pixel_values_96"})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
