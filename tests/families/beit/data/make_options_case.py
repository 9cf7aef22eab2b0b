"""The BEiT reference case for the two ``modeling_finetune.py`` constructor options no released model sets:
``qk_scale`` (the attention scale, default head_dim^-0.5: ``self.scale = qk_scale or head_dim ** -0.5``) and
``init_scale`` (the classifier's initial weight and bias multiplied by it: initialisation only), made by running
microsoft/unilm at 768a3c8 on seeded random weights.

    git -C unilm checkout 768a3c873f598bb9b4d4dfb9267b099e35f8fe56
    PYTHONPATH=/path/to/unilm/beit:<torchvision shim> python tests/families/beit/data/make_options_case.py tests/families/beit/data

timm 1.0.31 provides the four helpers ``modeling_finetune.py`` imports (``drop_path``, ``to_2tuple``,
``trunc_normal_``, ``register_model``; its torchvision imports answered by a shim, no arithmetic from it). Nothing of
the official code is copied here.

- ``qk_scale``: the fine-tuning model's flags (per-block tables, layer scale 0.1, mean pooling) with qk_scale=0.3,
  weights by README.md's scheme, logits on seeded pixels; and the same weights at the default scale.
- ``init_scale``: the head of a freshly constructed model (``torch.manual_seed`` per draw), for init_scale 0.5 and the
  default 0.001: trunc_normal_(std=0.02) multiplied by init_scale, bias 0 multiplied by it. Initialisation draws are
  random, so the case holds the official heads for comparing distributions, not values.
"""
from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import modeling_finetune  # microsoft/unilm beit/

COMMIT = "768a3c873f598bb9b4d4dfb9267b099e35f8fe56"
ARCH = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, qkv_bias=True, use_rel_pos_bias=True,
            use_abs_pos_emb=False, init_values=0.1, use_mean_pooling=True, num_classes=10)
IMG = 48
HEAD_CLASSES = 200  # the init_scale draws: a 200 x 48 head, enough values to compare distributions


def build(**kw) -> nn.Module:
    return modeling_finetune.VisionTransformer(img_size=IMG, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                               **{**ARCH, **kw})


def randomize(model: nn.Module, seed: int) -> None:
    """The BEiT README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases incl. q/v 0.02 N, class token
    N(0, 0.02), gamma 0.1 (1 + 0.1 N), relative-position tables N(0, 0.1)); float16-exact values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("relative_position_bias_table"):
                value = 0.1 * noise
            elif name.endswith(("gamma_1", "gamma_2")):
                value = 0.1 * (1 + 0.1 * noise)
            elif name.endswith("bias"):
                value = 0.02 * noise
            elif p.ndim == 1:
                value = 1 + 0.1 * noise
            elif name == "cls_token":
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def init_head(init_scale: float | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    kw = {} if init_scale is None else {"init_scale": init_scale}
    head = build(num_classes=HEAD_CLASSES, **kw).head
    return head.weight.detach().clone(), head.bias.detach().clone()


def main(out: Path) -> None:
    folder = out / "official_options"
    folder.mkdir(parents=True, exist_ok=True)
    model = build(qk_scale=0.3).eval()
    assert all(blk.attn.scale == 0.3 for blk in model.blocks)
    randomize(model, 2601)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}},
               folder / "checkpoint.pth")  # the release layout, float16-exact values
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2602))
    io = {"pixel_values": x}
    with torch.no_grad():
        io["logits"] = model(x)
        default = build().eval()
        default.load_state_dict(state)
        io["logits_default_scale"] = default(x)
    io["init_head_weight_0.5"], io["init_head_bias_0.5"] = init_head(0.5, 2603)
    io["init_head_weight_default"], io["init_head_bias_default"] = init_head(None, 2604)
    save_file(io, str(folder / "io.safetensors"))
    meta = {
        "case_id": folder.name, "family": "beit", "source_format": "official",
        "source": f"microsoft/unilm@{COMMIT} beit/modeling_finetune.py",
        "reference_constructor": f"modeling_finetune.VisionTransformer(img_size={IMG}, "
                                 "norm_layer=partial(nn.LayerNorm, eps=1e-6), qk_scale=0.3, "
                                 + ", ".join(f"{k}={v!r}" for k, v in ARCH.items()) + ")",
        "vitkit_model": "beit_base_patch16_224",
        "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": IMG, "qk_scale": 0.3},
        "num_classes": 10, "checkpoint": "checkpoint.pth", "atol": 1e-4, "rtol": 1e-4, "seed": 2601,
        "io": f"pixel_values/logits at {IMG} px; logits_default_scale: the same weights with qk_scale=None; "
              f"init_head_{{weight,bias}}_{{0.5,default}}: a {HEAD_CLASSES}-class head as constructed with init_scale "
              "0.5 and the default (0.001)",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
