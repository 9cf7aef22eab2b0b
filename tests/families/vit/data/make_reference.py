"""A timm-layout ViT file at a second input size (64 → 96 px: a 4x4 → 6x6 patch grid), resized by the ViT family's
OFFICIAL resize code and run by timm's model, the code of that layout.

    git -C vision_transformer checkout c6de1e5378c9831a8477feb30994971bdc409e46
    PYTHONPATH=/path/to/vision_transformer:<tensorflow shim>:<torchvision shim> \\
        python tests/families/vit/data/make_reference.py tests/families/vit/data

A timm file carries no resize code of its own; vitkit resizes it the way the family's official code, the original
ViT's ``vit_jax/checkpoint.py`` (google-research/vision_transformer), resizes a checkpoint for fine-tuning at another
size: ``interpolate_posembed`` (``scipy.ndimage.zoom``, order 1). That function is run here on the file's
``pos_embed``; the result goes into timm 1.0.31's ``VisionTransformer`` built for 96 px (timm's torchvision imports
answered by a shim; TensorFlow, which vit_jax imports for file access, likewise). Nothing of either is copied here.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vit_jax import checkpoint  # google-research/vision_transformer

COMMIT = "c6de1e5378c9831a8477feb30994971bdc409e46"
ARCH = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, qkv_bias=True, num_classes=10)


def randomize(model: nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.02 N, class token
    N(0, 0.02)), with the position embedding N(0, 0.5) so that resizing it matters; float16-exact values stored as
    float32."""
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
            elif name == "cls_token":
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def main(out: Path) -> None:
    folder = out / "timm_vit_tiny_shrunk"
    folder.mkdir(parents=True, exist_ok=True)
    small = VisionTransformer(img_size=64, **ARCH)
    randomize(small, 1801)
    state = {k: v.detach().clone().contiguous() for k, v in small.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1802)
    x64, x96 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 96, 96, generator=g)
    big = VisionTransformer(img_size=96, **ARCH)
    resized = checkpoint.interpolate_posembed(state["pos_embed"].numpy(), big.pos_embed.shape[1], has_class_token=True)
    big.load_state_dict({**state, "pos_embed": torch.from_numpy(np.asarray(resized))}, strict=True)
    save_file({"pixel_values": x64, "logits": logits(small, x64), "pixel_values_96": x96, "logits_96": logits(big, x96),
               "pos_embed_96": big.pos_embed.detach().clone()}, str(folder / "io.safetensors"))
    meta = {
        "case_id": folder.name, "family": "vit", "source_format": "timm",
        "source": f"google-research/vision_transformer@{COMMIT} vit_jax/checkpoint.py interpolate_posembed; "
                  f"timm==1.0.31 VisionTransformer",
        "reference_constructor": "timm.models.vision_transformer.VisionTransformer(img_size=64, "
                                 + ", ".join(f"{k}={v!r}" for k, v in ARCH.items()) + ")",
        "vitkit_model": "vit_tiny_patch16_224", "kwargs": {"embed_dim": 48, "depth": 2, "img_size": 64},
        "num_classes": 10, "checkpoint": "model.safetensors", "atol": 1e-4, "rtol": 1e-4, "seed": 1801,
        "io": "pixel_values/logits at 64 px; pixel_values_96/logits_96/pos_embed_96: the file's pos_embed resized by "
              "vit_jax interpolate_posembed (scipy.ndimage.zoom order 1), in timm's VisionTransformer(img_size=96)",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
