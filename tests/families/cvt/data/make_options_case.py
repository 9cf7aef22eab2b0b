"""The CvT reference case for the SPEC settings no released model uses (README.md in this folder), made by running
microsoft/CvT at f851e68 on seeded random weights. Nothing of the official code is copied: ``lib/models/cls_cvt.py``
is written out of the repository into a scratch package and imported,

    git show f851e68:lib/models/cls_cvt.py > <scratch>/lib_models/cls_cvt.py   (+ an empty __init__.py and a
    registry.py whose register_model is the identity)

with the API shims of README.md (``torch._six.container_abcs`` → ``collections.abc``, ``timm.models.layers``):

    PYTHONPATH=<scratch>:<shims>:<einops> python tests/families/cvt/data/make_options_case.py tests/families/cvt/data/official_cvt_options
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

six = types.ModuleType("torch._six")
six.container_abcs = collections.abc
sys.modules["torch._six"] = six
from lib_models.cls_cvt import ConvolutionalVisionTransformer, LayerNorm, QuickGELU  # noqa: E402  (f851e68)

OUT = Path(sys.argv[1])
SPEC = dict(NUM_STAGES=3, PATCH_SIZE=[7, 3, 3], PATCH_STRIDE=[4, 2, 2], PATCH_PADDING=[2, 1, 1],
            DIM_EMBED=[16, 32, 48], DEPTH=[1, 2, 2], NUM_HEADS=[1, 2, 3], MLP_RATIO=[4.0, 2.0, 3.0],
            QKV_BIAS=[True, False, True], DROP_RATE=[0.0] * 3, ATTN_DROP_RATE=[0.0] * 3, DROP_PATH_RATE=[0.0] * 3,
            CLS_TOKEN=[True, False, True], QKV_PROJ_METHOD=["dw_bn", "avg", "dw_bn"], KERNEL_QKV=[3, 3, 3],
            PADDING_KV=[1, 1, 1], STRIDE_KV=[2, 2, 1], PADDING_Q=[1, 1, 1], STRIDE_Q=[1, 1, 1])
VITKIT_KW = dict(embed_dim=[16, 32, 48], depth=[1, 2, 2], num_heads=[1, 2, 3], mlp_ratio=[4.0, 2.0, 3.0],
                 qkv_bias=[True, False, True], class_token=[True, False, True],
                 qkv_proj_method=["dw_bn", "avg", "dw_bn"], stride_kv=[2, 2, 1], img_size=48)


def randomize(model, seed):
    """README.md's scheme, every value float16-exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            p.copy_(0.02 * n if "cls_token" in name else 0.02 * n if name.endswith("bias") else
                    1 + 0.1 * n if p.ndim == 1 else n / math.sqrt(math.prod(p.shape[1:])))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.momentum, m.training = None, True  # running stats := this batch's
        model(torch.randn(4, 3, 48, 48, generator=g))
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


torch.manual_seed(0)
model = randomize(ConvolutionalVisionTransformer(num_classes=10, act_layer=QuickGELU,
                                                 norm_layer=partial(LayerNorm, eps=1e-5), spec=SPEC), 1712)
OUT.mkdir(parents=True, exist_ok=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
           OUT / "checkpoint.pth")  # the release container: a bare state dict
pre = []
model.head.register_forward_pre_hook(lambda m, a: pre.append(a[0]))
g = torch.Generator().manual_seed(1713)
x, x_wide = torch.randn(2, 3, 48, 48, generator=g).half().float(), torch.randn(1, 3, 48, 80, generator=g).half().float()
with torch.no_grad():
    logits, logits_wide = model(x), model(x_wide)
save_file({"pixel_values": x.half(), "logits": logits, "pre_logits": pre[0], "pixel_values_wide": x_wide.half(),
           "logits_wide": logits_wide, "pre_logits_wide": pre[1]}, str(OUT / "io.safetensors"))
meta = dict(case_id="official_cvt_options", family="cvt", source_format="official",
            source="microsoft/CvT@f851e681966390779b71380d2600b52360ff4fe1",
            reference_constructor=f"ConvolutionalVisionTransformer(num_classes=10, act_layer=QuickGELU, "
                                  f"norm_layer=partial(LayerNorm, eps=1e-5), spec={SPEC!r})",
            vitkit_model="cvt_13", kwargs=VITKIT_KW, num_classes=10, input_size=[3, 48, 48],
            checkpoint="checkpoint.pth", atol=1e-4, rtol=1e-4, dtype_stored="float16", seed=1712,
            logit_stats=dict(std=logits.std().item(),
                             max_abs_diff_between_images=(logits[0] - logits[1]).abs().max().item()))
(OUT / "case.json").write_text(json.dumps(meta, indent=1))
print(meta["logit_stats"])
