"""Reference case for vitkit's MobileViT from timm's port (timm==1.0.31, ``timm/models/mobilevit.py`` on
``timm/models/byobnet.py``) at input sizes whose feature maps are, and are not, multiples of the 2x2 patch: timm's
``MobileVitBlock.forward`` then resizes the map bilinearly (align_corners=False) up to the next multiple before
unfolding and back after folding.

1. A shrunk MobileViT-XXS built by timm itself (``ByobNet`` on a ``ByoModelCfg`` made with timm's own
   ``_inverted_residual_block`` / ``_mobilevit_block`` helpers, as ``model_cfgs['mobilevit_xxs']`` is), seeded random
   weights, saved as timm saves a state dict (``safetensors.torch.save_file(model.state_dict())``, float16: every
   value is exactly representable, the logits were computed with the float32 values) → ``timm_shrunk.safetensors``;
   uint8 images (fed as ``images / 255``) and timm's logits at several sizes → ``timm_shrunk_io.safetensors``.
2. The shared golden case ``timm_mobilevit_xxs`` (full-size XXS, 256 px) run by timm at two other sizes, on crops of
   its own ``pixel_values`` → ``timm_golden_xxs_resize_logits.safetensors`` (logits only; the metadata holds the
   SHA-256 of the golden files they were computed from).

Run (torch 2.13.0 CPU, timm 1.0.31; torchvision does not work with this torch, an import shim stands in for it):
    PYTHONPATH=<shim dir> python make_timm_resize_case.py [<golden dir>]
<golden dir> defaults to $VITKIT_GOLDEN, else ../shared/golden beside the repository.
"""
import hashlib
import math
import os
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.byobnet import ByobNet, ByoModelCfg
from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

assert timm.__version__ == "1.0.31", timm.__version__
OUT = Path(__file__).resolve().parent
REPO = OUT.parents[3]
GOLDEN = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("VITKIT_GOLDEN", REPO.parent / "shared" / "golden"))

# timm's model_cfgs['mobilevit_xxs'] with narrower layers and fewer blocks. In vitkit:
#   create_model("mobilevit_xxs", stem_chs=8, widths=(8, 16, 24, 32, 40), mv2_depths=(1, 2),
#                transformer_dims=(16, 24, 32), transformer_depths=(2, 1, 1), num_classes=10)
SHRUNK_CFG = ByoModelCfg(
    blocks=(
        _inverted_residual_block(d=1, c=8, s=1, br=2.0),
        _inverted_residual_block(d=2, c=16, s=2, br=2.0),
        _mobilevit_block(d=1, c=24, s=2, transformer_dim=16, transformer_depth=2, patch_size=2, br=2.0),
        _mobilevit_block(d=1, c=32, s=2, transformer_dim=24, transformer_depth=1, patch_size=2, br=2.0),
        _mobilevit_block(d=1, c=40, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0),
    ),
    stem_chs=8,
    stem_type='3x3',
    stem_pool='',
    downsample='',
    act_layer='silu',
    num_features=160,  # 4 · 40, as the xxs' 320 = 4 · 80
)
# (H, W), batch. Maps of layer3 / layer4 / layer5 (strides 8, 16, 32; ceil):
#   64x64     8x8, 4x4, 2x2        all multiples of 2 (the size the case is described at)
#   128x128   16x16, 8x8, 4x4      all multiples
#   96x96     12x12, 6x6, 3x3      layer5 resized to 4x4
#   136x136   17x17, 9x9, 5x5      every block resizes
#   64x136    8x17, 4x9, 2x5       only the width is resized (rectangular)
SIZES = [((64, 64), 2), ((128, 128), 1), ((96, 96), 1), ((136, 136), 1), ((64, 136), 1)]
# crops of the golden pixel_values (2, 3, 256, 256): 200x200 gives layer1-5 maps 100, 50, 25, 13, 7 (layer3-5 odd);
# 256x160 keeps the height (multiples) and gives widths 20, 10, 5 (layer5 resized)
GOLDEN_CROPS = [(200, 200), (256, 160)]


def randomize(model, seed):
    """The golden README's scheme: kernels N(0,1)/sqrt(fan_in), norm weights 1 + 0.1 N, biases 0.02 N; BatchNorm
    statistics measured on a separate random batch, then perturbed (mean += 0.1 N std, var *= 1 + 0.1 U)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.02 * n)
            elif p.ndim == 1:
                p.copy_(1 + 0.1 * n)
            else:
                p.copy_(n / math.sqrt(math.prod(p.shape[1:])))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.momentum, m.training = 1.0, True  # running stats := this batch's
        model(torch.randn(4, 3, 64, 64, generator=g))
        for m in bns:
            m.momentum, m.training = 0.1, False
            std = m.running_var.sqrt()
            m.running_mean += 0.1 * torch.randn(m.running_mean.shape, generator=g) * std
            m.running_var *= 1 + 0.1 * torch.rand(m.running_var.shape, generator=g)
            m.num_batches_tracked.zero_()
        for t in model.state_dict().values():  # exactly representable in float16, so the file can store float16
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model.eval()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shrunk_case():
    model = randomize(ByobNet(SHRUNK_CFG, num_classes=10), seed=30)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              OUT / "timm_shrunk.safetensors")
    g = torch.Generator().manual_seed(31)
    io = {}
    with torch.no_grad():
        for (h, w), batch in SIZES:
            images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
            io[f"images_{h}x{w}"] = images
            io[f"logits_{h}x{w}"] = model(images.float() / 255)
    save_file({k: v.contiguous() for k, v in io.items()}, OUT / "timm_shrunk_io.safetensors")
    print({k: tuple(v.shape) for k, v in io.items()}, sum(p.numel() for p in model.parameters()), "parameters")


def golden_case():
    folder = GOLDEN / "timm_mobilevit_xxs"
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=1000)
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    model.eval()
    golden = load_file(str(folder / "io.safetensors"))
    x = golden["pixel_values"]
    out = {}
    with torch.no_grad():
        assert torch.allclose(model(x), golden["logits"], atol=1e-5, rtol=1e-5)  # the golden case, as recorded
        for h, w in GOLDEN_CROPS:
            out[f"logits_{h}x{w}"] = model(x[:, :, :h, :w].contiguous())
    meta = {"model.safetensors sha256": sha256(folder / "model.safetensors"),
            "io.safetensors sha256": sha256(folder / "io.safetensors"),
            "inputs": "pixel_values[:, :, :H, :W] of the golden io.safetensors", "timm": timm.__version__}
    save_file(out, OUT / "timm_golden_xxs_resize_logits.safetensors", metadata=meta)
    print({k: tuple(v.shape) for k, v in out.items()}, meta)


if __name__ == "__main__":
    shrunk_case()
    golden_case()
