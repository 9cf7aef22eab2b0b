"""Regenerate the DeiT reference case in this folder by running the OFFICIAL code on seeded random weights.

    git -C deit checkout 7e160fe43f0252d17191b71cbb5826254114ea5b
    PYTHONPATH=/path/to/deit:<torchvision shim> python tests/families/deit/data/make_reference.py tests/families/deit/data

The model is facebookresearch/deit ``models.py`` ``DistilledVisionTransformer`` (timm 1.0.31's ``VisionTransformer``
underneath; timm's torchvision imports answered by a shim, no arithmetic from it). The resize is ``main.py``'s own
``--finetune`` block, read from the checkout and executed verbatim (from ``if args.finetune:`` to its
``model.load_state_dict(checkpoint_model, strict=False)``) with ``args.finetune`` = the release-layout file. Nothing of
the official code is copied here.
"""
from __future__ import annotations

import json
import math
import sys
import textwrap
from argparse import Namespace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from models import DistilledVisionTransformer  # facebookresearch/deit

COMMIT = "7e160fe43f0252d17191b71cbb5826254114ea5b"
ARCH = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, qkv_bias=True, num_classes=10)


def build(img_size: int) -> nn.Module:
    """deit_tiny_distilled_patch16_224's constructor call (models.py) at width 48, depth 2, 10 classes."""
    return DistilledVisionTransformer(img_size=img_size, norm_layer=partial(nn.LayerNorm, eps=1e-6), **ARCH)


def randomize(model: nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.02 N, tokens N(0, 0.02)),
    with the position embedding N(0, 0.5) so that resizing it matters; values rounded to float16-exact numbers, and
    stored as float32 (the official code resizes in the file's dtype, as vitkit does after upcasting)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                value = 0.02 * noise
            elif p.ndim == 1:
                value = 1 + 0.1 * noise
            elif name == "pos_embed":
                value = 0.5 * noise
            elif name in ("cls_token", "dist_token"):
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def finetune_block(deit_root: Path) -> str:
    """main.py's --finetune block, as it is in the checkout."""
    lines = (deit_root / "main.py").read_text().splitlines()
    start = lines.index("    if args.finetune:")
    end = next(i for i in range(start, len(lines)) if "model.load_state_dict(checkpoint_model, strict=False)" in lines[i])
    return textwrap.dedent("\n".join(lines[start:end + 1]))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def main(out: Path, deit_root: Path) -> None:
    folder = out / "official_deit_tiny_distilled_shrunk"
    folder.mkdir(parents=True, exist_ok=True)
    model = build(64)
    randomize(model, 1901)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, folder / "checkpoint.pth")  # the release layout (deit_*.pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))  # timm's layout
    g = torch.Generator().manual_seed(1902)
    x64, x96 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 96, 96, generator=g)
    big = build(96)
    scope = {"torch": torch, "model": big, "args": Namespace(finetune=str(folder / "checkpoint.pth"))}
    exec(compile(finetune_block(deit_root), "deit/main.py", "exec"), scope)
    loaded = big.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "pos_embed"), "main.py missed a tensor"
    save_file({"pixel_values": x64, "logits": logits(model, x64), "pixel_values_96": x96, "logits_96": logits(big, x96),
               "pos_embed_96": loaded["pos_embed"]}, str(folder / "io.safetensors"))
    meta = {
        "case_id": folder.name, "family": "deit", "source_format": ["official", "timm"],
        "source": f"facebookresearch/deit@{COMMIT}",
        "reference_constructor": "models.DistilledVisionTransformer(img_size=64, norm_layer=partial(nn.LayerNorm, "
                                 "eps=1e-6), " + ", ".join(f"{k}={v!r}" for k, v in ARCH.items()) + ")",
        "vitkit_model": "deit_tiny_distilled_patch16_224", "kwargs": {"embed_dim": 48, "depth": 2, "img_size": 64},
        "num_classes": 10, "checkpoint": {"official": "checkpoint.pth", "timm": "model.safetensors"},
        "atol": 1e-4, "rtol": 1e-4, "seed": 1901,
        "io": "pixel_values/logits at 64 px; pixel_values_96/logits_96/pos_embed_96: checkpoint.pth loaded into the "
              "96-px model by main.py's --finetune block (bicubic, align_corners=False, no antialias), run verbatim",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(sys.modules["models"].__file__).parent)
