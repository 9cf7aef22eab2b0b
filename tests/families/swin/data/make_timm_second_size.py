"""timm reference cases at a second resolution for Swin and PVT v2 (README.md of each case folder): timm 1.0.31 itself
loads a timm-layout file of one size into a model of another size (its ``load_pretrained`` → ``checkpoint_filter_fn``
path) and runs it, on seeded random weights. Nothing of timm is copied; it is installed outside this repository
(``pip install --no-deps --target <dir> timm==1.0.31 torchvision==0.28.0``; torchvision's CUDA fake-op module is
replaced by an empty module, as ../../shared/golden/README.md describes) and imported:

    PYTHONPATH=<dir> python tests/families/swin/data/make_timm_second_size.py tests/families
"""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = Path(sys.argv[1])
assert timm.__version__ == "1.0.31"


def randomize(model, seed):
    """The golden README's scheme, float16-exact values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            p.copy_((0.1 * n if name.endswith("relative_position_bias_table") else 0.02 * n if name.endswith("bias")
                     else 1 + 0.1 * n if p.ndim == 1 else n / math.sqrt(math.prod(p.shape[1:]))).half().float())
    return model.eval()


def case(folder, name, kwargs, small, big, sizes, seed, vitkit_model, vitkit_kwargs):
    folder = OUT / folder
    folder.mkdir(parents=True, exist_ok=True)
    model = randomize(timm.create_model(name, num_classes=10, **kwargs, **small), seed)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))  # what timm publishes: model.state_dict(), safetensors
    big_model = timm.create_model(name, num_classes=10, pretrained=True, **kwargs, **big,
                                  pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                              num_classes=10)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    side = sizes[1]
    x, x_big = torch.randn(2, 3, sizes[0], sizes[0], generator=g), torch.randn(1, 3, side, side, generator=g)
    x, x_big = x.half().float(), x_big.half().float()
    with torch.no_grad():
        io = {"pixel_values": x.half(), "logits": model(x), f"pixel_values_{side}": x_big.half(),
              f"logits_{side}": big_model(x_big)}
    save_file(io, str(folder / "io.safetensors"))
    meta = dict(case_id=folder.name, source=f"timm=={timm.__version__}", source_format="timm",
                reference_constructor=f"timm.create_model({name!r}, num_classes=10, **{dict(kwargs, **small)!r})",
                resized_constructor=f"timm.create_model({name!r}, num_classes=10, pretrained=True, "
                                    f"pretrained_cfg_overlay=dict(file=...), **{dict(kwargs, **big)!r})",
                vitkit_model=vitkit_model, kwargs=vitkit_kwargs, num_classes=10, seed=seed,
                logit_stats=dict(std=io["logits"].std().item(), std_big=io[f"logits_{side}"].std().item()))
    (folder / "case.json").write_text(json.dumps(meta, indent=1))
    print(folder, meta["logit_stats"])


# Swin: the window changes with the size, so timm's checkpoint_filter_fn resizes every relative_position_bias_table
# (resize_rel_pos_bias_table: BEiT's geometric progression, interpolated linearly without TIMM_USE_SCIPY_INTERP)
case("swin/data/timm_second_size", "swin_tiny_patch4_window7_224",
     dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)), dict(img_size=64, window_size=2),
     dict(img_size=96, window_size=3), (64, 96), 2105, "swin_tiny_patch4_window7_224",
     dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], img_size=64, window_size=2))
# PVT v2: nothing to resize (no position embedding): the same weights at another size
case("pvt_v2/data/timm_second_size", "pvt_v2_b0", dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4),
                                                   depths=(1, 1, 2, 1)),
     {}, {}, (64, 96), 2106, "pvt_v2_b0",
     dict(embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depths=[1, 1, 2, 1], img_size=64))
