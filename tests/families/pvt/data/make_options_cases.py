"""PVT reference cases for the constructor options no released model sets (README.md in this folder), made by
running whai362/PVT at 57e2dfa on seeded random weights. Nothing of the official code is copied: its file is
written out of the repository and imported,

    git show 57e2dfa:classification/pvt.py > <scratch>/pvt.py

with API shims for its timm imports (``timm.models.layers``: DropPath (identity), to_2tuple, trunc_normal_;
``timm.models.registry.register_model``: identity; ``timm.models.vision_transformer._cfg``: dict):

    PYTHONPATH=<scratch>:<shims> python tests/families/pvt/data/make_options_cases.py tests/families/pvt/data
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

from pvt import PyramidVisionTransformer  # 57e2dfa classification/pvt.py

OUT = Path(sys.argv[1])
SOURCE = "whai362/PVT@57e2dfaa5a46f9050d76f306a4fcd9a7c061f520"
SHRUNK = dict(embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depths=[1, 1, 2, 1])
FACTORY = dict(mlp_ratios=[8, 8, 4, 4], qkv_bias=True, sr_ratios=[8, 4, 2, 1])  # the pvt_tiny / pvt_v2_b0 factories


def randomize(model: nn.Module, seed: int) -> None:
    """tests/families/pvt/data/README.md's scheme: position embeddings and class token N(0, 0.5), the convs feeding a
    plain LayerNorm scaled by 0.005 (biases 0.1) so that its eps matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            feeds_norm = name.startswith("patch_embed") and ".proj." in name or ".attn.sr." in name
            if "pos_embed" in name or name == "cls_token":
                value = 0.5 * n
            elif name.endswith("bias"):
                value = (0.1 if feeds_norm else 1) * 0.02 * n
            elif p.ndim == 1:
                value = 1 + 0.1 * n
            else:
                value = n / math.sqrt(math.prod(p.shape[1:])) * (0.005 if feeds_norm else 1)
            p.copy_(value.half().float())


def case(name, cls, kwargs, vitkit_model, vitkit_kwargs, seed, sizes):
    torch.manual_seed(0)
    model = cls(num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-6), **FACTORY, **kwargs).eval()
    randomize(model, seed)
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               folder / "checkpoint.pth")  # the release container: a bare state dict
    g = torch.Generator().manual_seed(seed + 1)
    io = {}
    for size, batch in sizes:
        x = torch.randn(batch, 3, *size, generator=g).half().float()
        with torch.no_grad():
            pre = model.forward_features(x).contiguous()
            logits = model.head(pre)
        suffix = "" if size == sizes[0][0] else f"_{size[0]}x{size[1]}"
        io.update({f"pixel_values{suffix}": x.half(), f"logits{suffix}": logits, f"pre_logits{suffix}": pre})
    save_file(io, str(folder / "io.safetensors"))
    call = (f"{cls.__name__}(num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-6), "
            f"**{dict(FACTORY, **kwargs)!r})")
    meta = dict(case_id=name, family=vitkit_model.rsplit("_", 1)[0] if "v2" in vitkit_model else "pvt",
                source_format="official", source=SOURCE, reference_constructor=call, vitkit_model=vitkit_model,
                kwargs=vitkit_kwargs, num_classes=10, input_size=[3, *sizes[0][0]], checkpoint="checkpoint.pth",
                atol=1e-4, rtol=1e-4, dtype_stored="float16", seed=seed,
                extra_inputs=[f"{h}x{w}" for (h, w), _ in sizes[1:]],
                logit_stats=dict(std=io["logits"].std().item(),
                                 max_abs_diff_between_images=(io["logits"][0] - io["logits"][1]).abs().max().item()))
    (folder / "case.json").write_text(json.dumps(meta, indent=1))
    print(name, meta["logit_stats"])


# PVT v1: an 8x8 first patch (the pos tables of stages 2-4 stay sized for a 4x4 one, the forward resamples them) and
# qk_scale; inputs 64 (native), 96 and 80x128 (the official forward-time resampling)
case("official_pvt_options", PyramidVisionTransformer, dict(SHRUNK, img_size=64, patch_size=8, qk_scale=0.3),
     "pvt_tiny", dict(SHRUNK, img_size=64, patch_size=8, qk_scale=0.3), 2107,
     [((64, 64), 2), ((96, 96), 1), ((80, 128), 1)])
