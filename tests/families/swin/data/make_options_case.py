"""The Swin reference case for the constructor options no released model sets (``ape``, ``patch_norm=False``,
``qk_scale``), made by running microsoft/Swin-Transformer at f82860bf on seeded random weights (README.md in
``official_options/``). Nothing of the official code is copied: its two files are written out of the repository,

    git show f82860bf:models/swin_transformer.py > <scratch>/swin_transformer.py
    git show f82860bf:utils.py > <scratch>/swin_utils.py

next to the ``timm.models.layers`` shim of ``official_shrunk/README.md``, and imported:

    PYTHONPATH=<scratch>:<shims> python tests/families/swin/data/make_options_case.py tests/families/swin/data/official_options
"""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

import swin_utils  # f82860bf utils.py
from swin_transformer import SwinTransformer  # f82860bf models/swin_transformer.py

OUT = Path(sys.argv[1])
KW = dict(patch_size=4, in_chans=3, num_classes=10, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
          drop_path_rate=0.0, ape=True, patch_norm=False, qk_scale=0.3)
SMALL, BIG = dict(img_size=64, window_size=2), dict(img_size=96, window_size=3)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """The golden README's scheme; the absolute position embedding N(0, 0.5), so that resizing it shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("relative_position_bias_table"):
                value = 0.1 * n
            elif name == "absolute_pos_embed":
                value = 0.5 * n
            elif name.endswith("bias"):
                value = 0.02 * n
            elif p.ndim == 1:
                value = 1 + 0.1 * n
            else:
                value = n / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def outputs(model, x):
    seen = {}
    hook = model.head.register_forward_pre_hook(lambda m, a: seen.setdefault("pre", a[0].detach().clone()))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return logits, seen["pre"]


OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = SwinTransformer(**SMALL, **KW).eval()
randomize(model, 2104)
# float32 (every value float16-exact): utils.load_pretrained interpolates the tensors in the file's dtype
torch.save({"model": model.state_dict()}, OUT / "checkpoint.pth")
g = torch.Generator().manual_seed(2105)
x, x_big = torch.randn(2, 3, 64, 64, generator=g).half().float(), torch.randn(1, 3, 96, 96, generator=g).half().float()
logits, pre = outputs(model, x)
big = SwinTransformer(**BIG, **KW).eval()  # fine-tuning at 96 / window 3: utils.load_pretrained
config = types.SimpleNamespace(MODEL=types.SimpleNamespace(PRETRAINED=str(OUT / "checkpoint.pth")))
swin_utils.load_pretrained(config, big, types.SimpleNamespace(info=print, warning=print))
logits_big, pre_big = outputs(big, x_big)
save_file({"pixel_values": x.half(), "logits": logits, "pre_logits": pre,
           "pixel_values_96": x_big.half(), "logits_96": logits_big, "pre_logits_96": pre_big},
          str(OUT / "io.safetensors"))
kwargs = dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], drop_path_rate=0.0, ape=True,
              patch_norm=False, qk_scale=0.3, **SMALL)
meta = dict(case_id="official_options", family="swin", source_format="official",
            source="microsoft/Swin-Transformer@f82860bfb5225915aca09c3227159ee9e1df874d",
            reference_constructor=f"models.swin_transformer.SwinTransformer(**{dict(SMALL, **KW)!r})",
            resized_constructor=f"SwinTransformer(**{dict(BIG, **KW)!r}); utils.load_pretrained(config, model, logger)",
            vitkit_model="swin_tiny_patch4_window7_224", kwargs=kwargs, num_classes=10, input_size=[3, 64, 64],
            checkpoint="checkpoint.pth", atol=1e-4, rtol=1e-4, dtype_stored="float32", seed=2104,
            logit_stats=dict(std=logits.std().item(), max_abs_diff_between_images=(logits[0] - logits[1]).abs().max().item(),
                             std_96=logits_big.std().item()))
(OUT / "case.json").write_text(json.dumps(meta, indent=1))
print(meta["logit_stats"])
