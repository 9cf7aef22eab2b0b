"""The DeiT reference case for ``qk_scale``, the one option of the timm 0.3.2 ``VisionTransformer`` that
facebookresearch/deit@7e160fe builds on which no released DeiT sets, made by running the official code on seeded
random weights.

    git -C deit checkout 7e160fe43f0252d17191b71cbb5826254114ea5b
    pip download timm==0.3.2 --no-deps; unzip the wheel into <timm 0.3.2>
    PYTHONPATH=/path/to/deit:<timm 0.3.2>:<torchvision shim> python tests/families/deit/data/make_options_case.py tests/families/deit/data

``models.py`` at that commit subclasses ``timm.models.vision_transformer.VisionTransformer`` and passes every keyword
through; ``requirements.txt`` pins timm 0.3.2, whose constructor takes ``qk_scale`` (the attention scale, default
head_dim^-0.5: ``self.scale = qk_scale or head_dim ** -0.5``) and ``hybrid_backbone``. timm 0.3.2 imports
``torch._six`` (removed from torch), answered here by a module exposing ``container_abcs`` / ``int_classes`` /
``string_classes`` (no arithmetic); its torchvision imports by the shim of README.md. Nothing of either is copied here.
"""
from __future__ import annotations

import collections.abc
import json
import math
import sys
import types
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

_six = types.ModuleType("torch._six")  # API shim for timm 0.3.2 (torch._six was removed from torch)
_six.container_abcs, _six.int_classes, _six.string_classes = collections.abc, int, str
sys.modules["torch._six"] = _six

import timm  # noqa: E402  (timm 0.3.2, as deit's requirements.txt pins)
from models import DistilledVisionTransformer  # noqa: E402  facebookresearch/deit

COMMIT = "7e160fe43f0252d17191b71cbb5826254114ea5b"
ARCH = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, qkv_bias=True, num_classes=10,
            qk_scale=0.3)
IMG = 32


def randomize(model: nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.02 N, tokens and position
    embedding N(0, 0.02)); float16-exact values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                value = 0.02 * noise
            elif p.ndim == 1:
                value = 1 + 0.1 * noise
            elif name in ("pos_embed", "cls_token", "dist_token"):
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def main(out: Path) -> None:
    assert timm.__version__ == "0.3.2", timm.__version__
    folder = out / "official_qk_scale"
    folder.mkdir(parents=True, exist_ok=True)
    model = DistilledVisionTransformer(img_size=IMG, norm_layer=partial(nn.LayerNorm, eps=1e-6), **ARCH).eval()
    assert all(blk.attn.scale == 0.3 for blk in model.blocks)
    randomize(model, 2501)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": {k: v.half() for k, v in state.items()}}, folder / "checkpoint.pth")  # float16-exact values
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2502))
    with torch.no_grad():
        logits = model(x)
        default = DistilledVisionTransformer(img_size=IMG, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                             **{**ARCH, "qk_scale": None}).eval()
        default.load_state_dict(state)
        logits_default = default(x)  # the same weights at head_dim^-0.5: the option matters
    save_file({"pixel_values": x, "logits": logits, "logits_default_scale": logits_default},
              str(folder / "io.safetensors"))
    meta = {
        "case_id": folder.name, "family": "deit", "source_format": "official",
        "source": f"facebookresearch/deit@{COMMIT} models.py on timm==0.3.2 vision_transformer.py",
        "reference_constructor": f"models.DistilledVisionTransformer(img_size={IMG}, norm_layer=partial(nn.LayerNorm, "
                                 "eps=1e-6), " + ", ".join(f"{k}={v!r}" for k, v in ARCH.items()) + ")",
        "vitkit_model": "deit_tiny_distilled_patch16_224",
        "kwargs": {"embed_dim": 48, "depth": 2, "img_size": IMG, "qk_scale": 0.3},
        "num_classes": 10, "checkpoint": "checkpoint.pth", "atol": 1e-4, "rtol": 1e-4, "seed": 2501,
        "io": f"pixel_values/logits at {IMG} px (eval: mean of the two heads); logits_default_scale: the same "
              "weights with qk_scale=None",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
