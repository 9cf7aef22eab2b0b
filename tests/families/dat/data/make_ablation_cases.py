"""Reference cases for the DAT / DAT++ switches and block types no released model uses, made by running the official
LeapLabTHU/DAT code on seeded random weights (README.md in this folder; the DAT++ case is in tests/families/dat_pp/data,
README.md there). Nothing of the official code is copied: it is imported from two scratch packages written out of
the repository,

    mkdir -p <scratch>/datv1 <scratch>/datpp && touch <scratch>/datv1/__init__.py <scratch>/datpp/__init__.py
    for f in dat dat_blocks; do git show 566a593:models/$f.py > <scratch>/datv1/$f.py; done
    for f in dat dat_blocks nat slide qna; do git show 32173fc:models/$f.py > <scratch>/datpp/$f.py; done

plus the API shims the README describes (``timm.models.layers``, ``natten.functional``) and einops on the path:

    PYTHONPATH=<scratch>:<shims>:<einops> python tests/families/dat/data/make_ablation_cases.py \
        tests/families/dat/data tests/families/dat_pp/data

(the DAT v1 case goes to the first folder, the DAT++ case to the second).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from datpp.dat import DAT as DATPlusPlus  # LeapLabTHU/DAT@32173fc models/dat.py
from datv1.dat import DAT as DATv1  # LeapLabTHU/DAT@566a593 models/dat.py

OUT_V1, OUT_PP = Path(sys.argv[1]), Path(sys.argv[2])
V1, PP = "566a593daf96efc3df58a1542e60b847b8b6f4ff", "32173fcf10d71abe73267f4e99829cd8624b7ab6"
COMMON = dict(patch_size=4, expansion=4, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)

# DAT v1: dwc_pes in stage 4 with offset_range_factor 0 (raw offsets), the bias table in stage 3, both grouped
V1_KW = dict(COMMON, img_size=64, dim_stem=8, dims=[8, 16, 32, 64], depths=[2, 2, 2, 2],
             stage_spec=[["L", "S"], ["L", "S"], ["D", "S"], ["L", "D"]], heads=[1, 2, 2, 4],
             window_sizes=[4, 4, 2, 2], groups=[-1, -1, 2, 2], use_pes=[False, False, True, True],
             dwc_pes=[False, False, False, True], strides=[-1, -1, 2, 1], offset_range_factor=[-1, -1, 2, 0],
             no_offs=[False] * 4, fixed_pes=[False] * 4, use_dwc_mlps=[False, True, False, True],
             use_conv_patches=False)
V1_BIG = dict(V1_KW, img_size=96, window_sizes=[6, 6, 3, 3])

# DAT++: 'X' (odd window 5) and 'P' blocks with layer scale, 'E' and 'Q' (ksize 1) blocks, no_offs (stride 4,
# kernel 4), dwc_pes (stride 2, groups 2, offset_range_factor 0: no offsets), fixed_pes (stride 1, groups 2)
PP_KW = dict(COMMON, img_size=128, dim_stem=8, dims=[8, 16, 32, 64], depths=[2, 3, 2, 2],
             stage_spec=[["X", "P"], ["E", "Q", "D"], ["D", "L"], ["D", "D"]], heads=[1, 2, 4, 4],
             heads_q=[1, 2, 2, 4], window_sizes=[5, 4, 2, 4], groups=[1, 1, 2, 2], use_pes=[True] * 4,
             dwc_pes=[False, False, True, False], fixed_pes=[False, False, False, True],
             no_offs=[False, True, False, False], strides=[8, 4, 2, 1], offset_range_factor=[-1, -1, 0, 2],
             sr_ratios=[8, 4, 2, 1], use_dwc_mlps=[True, False, True, False], use_conv_patches=True,
             ksizes=[9, 4, 3, 3], ksize_qnas=[1, 1, 1, 1], nqs=[2, 2, 2, 2], qna_activation="exp",
             nat_ksizes=[3, 3, 3, 3], layer_scale_values=[0.1, -1, -1, 0.1], use_lpus=[True, True, False, False],
             log_cpb=[False] * 4)
PP_BIG = dict(PP_KW, img_size=160)


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """The golden README's scheme; frozen parameters (slide attention's shift kernels) stay as created."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            n = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("rpe_table", "relative_position_bias_table", "rpb_table"):
                value = 0.1 * n
            elif name.startswith("stages.") and ".layer_scales." in name:
                value = 0.1 * (1 + 0.1 * n)
            elif leaf in ("attn_scale", "q_param"):
                value = 0.5 * n
            elif leaf == "bias":
                value = 0.02 * n
            elif p.ndim == 1:
                value = 1 + 0.1 * n
            else:
                value = n / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(fp16(value))


def outputs(model, x):
    seen = {}
    hook = model.cls_head.register_forward_pre_hook(lambda m, a: seen.setdefault("pre", a[0].detach().clone()))
    with torch.no_grad():
        logits = model(x)[0]
    hook.remove()
    return logits, seen["pre"]


def write(out, name, cls, kw, big_kw, seed, commit, vitkit_model, load):
    torch.manual_seed(0)
    model = cls(num_classes=10, **kw).eval()
    randomize(model, seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # float16; buffers, frozen: as created
    state = {k: v.half() if k in trainable else v for k, v in model.state_dict().items()}
    torch.save({"model": state}, folder / "checkpoint.pth")
    g = torch.Generator().manual_seed(seed + 1)
    size, big = kw["img_size"], big_kw["img_size"]
    x, x_big = fp16(torch.randn(2, 3, size, size, generator=g)), fp16(torch.randn(1, 3, big, big, generator=g))
    logits, pre = outputs(model, x)
    torch.manual_seed(0)
    resized = cls(num_classes=10, **big_kw).eval()  # the official fine-tuning path: load_pretrained
    load(resized, torch.load(folder / "checkpoint.pth", weights_only=True)["model"])
    logits_big, pre_big = outputs(resized, x_big)
    save_file({"pixel_values": x.half(), "logits": logits, "pre_logits": pre,
               f"pixel_values_{big}": x_big.half(), f"logits_{big}": logits_big, f"pre_logits_{big}": pre_big},
              str(folder / "io.safetensors"))
    call = f"models.dat.DAT(num_classes=10, **{kw!r})"
    meta = dict(case_id=name, family="dat", source_format="official", vitkit_model=vitkit_model, kwargs=kw,
                num_classes=10, input_size=[3, size, size], checkpoint="checkpoint.pth", atol=1e-4, rtol=1e-4,
                dtype_stored="float16", source=f"LeapLabTHU/DAT@{commit}", reference_constructor=call, seed=seed,
                resized_constructor=f"models.dat.DAT(num_classes=10, **{big_kw!r}); load_pretrained(checkpoint['model'])",
                logit_stats=dict(std=logits.std().item(), max_abs_diff_between_images=(logits[0] - logits[1]).abs().max().item(),
                                 std_resized=logits_big.std().item()))
    (folder / "case.json").write_text(json.dumps(meta, indent=1))
    print(name, meta["logit_stats"])


write(OUT_V1, "official_dat_v1_dwc_pes", DATv1, V1_KW, V1_BIG, 2202, V1, "dat_tiny", lambda m, s: m.load_pretrained(s))
def load_pp(model, state):
    """The official ``load_pretrained`` for every key but the 'X' blocks' ``ln_cnvnxt.{d}``: it indexes that ModuleDict
    with an int and raises KeyError at 32173fc; those norms (no shape changes) are loaded as they are."""
    model.load_pretrained({k: v for k, v in state.items() if ".ln_cnvnxt." not in k}, None)
    missing = model.load_state_dict({k: v for k, v in state.items() if ".ln_cnvnxt." in k}, strict=False)
    assert not missing.unexpected_keys


write(OUT_PP, "official_dat_pp_ablations", DATPlusPlus, PP_KW, PP_BIG, 2311, PP, "dat_pp_tiny", load_pp)
