"""timm-layout reference cases for the ResNet-stem hybrids (R50+ViT-B/16 and R+Ti/16, shrunk), made by running timm
1.0.31's own hybrid code on seeded random weights, at the native size and at a second size after the ViT family's
official resize.

    git -C vision_transformer checkout c6de1e5378c9831a8477feb30994971bdc409e46
    PYTHONPATH=/path/to/vision_transformer:<tensorflow shim>:<torchvision shim> \\
        python tests/families/vit/data/make_hybrid_reference.py tests/families/vit/data

The models are what ``timm/models/vision_transformer_hybrid.py`` builds for ``vit_base_r50_s16_*`` (``_resnetv2``:
``ResNetV2(layers, num_classes=0, global_pool='', preact=False, stem_type='same', conv_layer=StdConv2dSame(eps=1e-8))``
inside ``HybridEmbed``, ``patch_size=1``) and for ``vit_tiny_r_s16_p8_*`` (``create_resnetv2_stem`` alone), with the
width shrunk by ``ResNetV2``'s own ``width_factor`` (stem 32 channels) and two stages of one unit, a 48-wide, 2-block
transformer and 10 classes. The second size (48 px) resizes the file's ``pos_embed`` with vit_jax
``checkpoint.interpolate_posembed`` (``scipy.ndimage.zoom``, order 1) into timm's model built for 48 px, as
``make_reference.py`` does for the plain ViT. Nothing of either repository is copied here.
"""
from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.layers import HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vit_jax import checkpoint  # google-research/vision_transformer

COMMIT = "c6de1e5378c9831a8477feb30994971bdc409e46"
ARCH = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, qkv_bias=True, num_classes=10)
CONV = partial(StdConv2dSame, eps=1e-8)  # _resnetv2's conv_layer
CASES = {
    "timm_vit_hybrid_shrunk": dict(patch_size=1, layers=(1, 1)),  # vit_base_r50_s16_*'s structure, stride 8
    "timm_vit_hybrid_stem_shrunk": dict(patch_size=2, layers=()),  # vit_tiny_r_s16_p8_*'s structure, stride 4·2
}


def backbone(layers: tuple[int, ...]) -> nn.Module:
    """_resnetv2(layers) of vision_transformer_hybrid.py, at width_factor 0.5 (stem 32 channels)."""
    if layers:
        return ResNetV2(layers=layers, num_classes=0, global_pool="", in_chans=3, preact=False, stem_type="same",
                        conv_layer=CONV, width_factor=0.5)
    return create_resnetv2_stem(3, out_chs=32, stem_type="same", preact=False, conv_layer=CONV)


def build(case: dict, img_size: int) -> nn.Module:
    embed = partial(HybridEmbed, backbone=backbone(case["layers"]))
    return VisionTransformer(img_size=img_size, patch_size=case["patch_size"], embed_layer=embed, **ARCH).eval()


def randomize(model: nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.02 N, class token
    N(0, 0.02)), the position embedding N(0, 0.5) so that resizing it matters; float16-exact values."""
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
        return model(x)


def make(out: Path, name: str, case: dict, seed: int) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    small = build(case, 32)
    randomize(small, seed)
    state = {k: v.detach().clone().contiguous() for k, v in small.state_dict().items()}
    save_file({k: v.half() for k, v in state.items()}, str(folder / "model.safetensors"))  # float16-exact values
    g = torch.Generator().manual_seed(seed + 1)
    x32, x48 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 48, 48, generator=g)
    big = build(case, 48)
    resized = checkpoint.interpolate_posembed(state["pos_embed"].numpy(), big.pos_embed.shape[1], has_class_token=True)
    big.load_state_dict({**state, "pos_embed": torch.from_numpy(np.asarray(resized))}, strict=True)
    io = {"pixel_values": x32, "logits": logits(small, x32), "pixel_values_48": x48, "logits_48": logits(big, x48)}
    save_file(io, str(folder / "io.safetensors"))
    meta = {
        "case_id": name, "family": "vit", "source_format": "timm", "seed": seed,
        "source": f"timm==1.0.31 models/vision_transformer_hybrid.py (_resnetv2, HybridEmbed); "
                  f"google-research/vision_transformer@{COMMIT} vit_jax/checkpoint.py interpolate_posembed",
        "reference_constructor": f"VisionTransformer(img_size=32, patch_size={case['patch_size']}, embed_layer="
                                 f"partial(HybridEmbed, backbone=<layers={list(case['layers'])}, width_factor=0.5>), "
                                 + ", ".join(f"{k}={v!r}" for k, v in ARCH.items()) + ")",
        "vitkit_model": "vit_base_r50_s16_224",
        "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 32, "patch_size": case["patch_size"],
                   "resnet": {"num_layers": list(case["layers"]), "width_factor": 0.5}},
        "num_classes": 10, "checkpoint": "model.safetensors", "atol": 1e-4, "rtol": 1e-4,
        "io": "pixel_values/logits at 32 px; pixel_values_48/logits_48: the file's pos_embed resized by vit_jax "
              "interpolate_posembed (scipy.ndimage.zoom order 1), in timm's model built for 48 px",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(out: Path) -> None:
    for i, (name, case) in enumerate(CASES.items()):
        make(out, name, case, 2401 + 10 * i)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
