"""The MobileViT reference case for the ml-cvnets options no released model sets (``mit.head_dim``,
``mit.no_fuse_local_global_features``, ``layer.global_pool``), made by running apple/ml-cvnets at 7771756 on seeded
random weights (README.md in this folder). Nothing of the official code is copied: it is the repository itself
(``git archive 77717569 | tar -x -C <ml-cvnets>``) with the import shim of README.md, run from that folder:

    PYTHONPATH=<shim dir>:<ml-cvnets> python <vitkit>/tests/families/mobilevit/data/make_options_case.py <vitkit>/tests/families/mobilevit/data
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import sitecustomize_shim  # noqa: F401  (stubs torchvision & co., which MobileViT does not use)
import torch
from safetensors.torch import save_file

import cvnets.models.classification.mobilevit as official_mobilevit
from cvnets import get_model
from options.opts import get_training_arguments

OUT = Path(sys.argv[1])
WIDTHS, DIMS = (8, 16, 24, 32, 40), (16, 24, 32)  # README.md's shrunk xx_small


def shrunk_configuration(opts):
    cfg = shrunk_configuration.original(opts)
    for i, w in enumerate(WIDTHS):
        cfg[f"layer{i + 1}"]["out_channels"] = w
    for i, d in enumerate(DIMS):
        cfg[f"layer{i + 3}"]["transformer_channels"] = d
        cfg[f"layer{i + 3}"]["ffn_dim"] = 2 * d
    return cfg


def build():
    opts = get_training_arguments(args=["--common.config-file", "config/classification/imagenet/mobilevit.yaml"])
    for key, value in {"model.classification.mit.mode": "xx_small", "model.classification.n_classes": 10,
                       "model.classification.mit.head_dim": 8, "model.classification.mit.number_heads": None,
                       "model.classification.mit.no_fuse_local_global_features": True,
                       "model.layer.global_pool": "abs"}.items():
        setattr(opts, key, value)
    shrunk_configuration.original = official_mobilevit.get_configuration
    official_mobilevit.get_configuration = shrunk_configuration
    try:
        return get_model(opts).eval()
    finally:
        official_mobilevit.get_configuration = shrunk_configuration.original


def randomize(model, seed):
    """README.md's scheme (kernels N(0,1)/sqrt(fan_in), norm weights 1 + 0.1 N, biases 0.02 N, BatchNorm statistics of
    a random batch, perturbed), every value float16-exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            p.copy_(0.02 * n if name.endswith("bias") else 1 + 0.1 * n if p.ndim == 1 else
                    n / math.sqrt(math.prod(p.shape[1:])))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.momentum, m.training = 1.0, True
        model(torch.randn(4, 3, 256, 256, generator=g))
        for m in bns:
            m.momentum, m.training = 0.1, False
            std = m.running_var.sqrt()
            m.running_mean += 0.1 * torch.randn(m.running_mean.shape, generator=g) * std
            m.running_var *= 1 + 0.1 * torch.rand(m.running_var.shape, generator=g)
            m.num_batches_tracked.zero_()
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model.eval()


model = randomize(build(), seed=22)
assert all(m.fusion is None for m in model.modules() if type(m).__name__ == "MobileViTBlock")
torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
           OUT / "official_options.pt")
pooled = []
model.classifier.global_pool.register_forward_hook(lambda m, i, o: pooled.append(o))
g = torch.Generator().manual_seed(23)
io = {}
with torch.no_grad():
    for (h, w), batch in [((256, 256), 2), ((160, 160), 1)]:
        images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
        io[f"images_{h}x{w}"] = images
        io[f"logits_{h}x{w}"] = model(images.float() / 255)
        io[f"pre_logits_{h}x{w}"] = pooled[-1]
    model.classifier.global_pool.pool_type = "rms"  # GlobalPool's other mode, same weights
    io["logits_256x256_rms"] = model(io["images_256x256"].float() / 255)
save_file({k: v.contiguous() for k, v in io.items()}, OUT / "official_options_io.safetensors")
print({k: tuple(v.shape) for k, v in io.items()})
