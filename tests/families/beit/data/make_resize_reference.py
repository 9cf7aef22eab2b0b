"""BEiT reference cases at a second input size (112 → 160 px), made by running the OFFICIAL resize code.

    git -C unilm checkout 768a3c873f598bb9b4d4dfb9267b099e35f8fe56
    PYTHONPATH=/path/to/unilm/beit:<torchvision shim> python tests/families/beit/data/make_resize_reference.py tests/families/beit/data

Needs scipy 1.13.1 (the last release with ``scipy.interpolate.interp2d``, which the official code calls) and numpy
2.0.2; timm 1.0.31 provides ``drop_path``/``to_2tuple``/``trunc_normal_``/``register_model`` to ``modeling_finetune.py``
(its torchvision imports answered by a shim; no arithmetic from it).

The model is microsoft/unilm ``beit/modeling_finetune.py`` ``VisionTransformer``. The resize is the checkpoint-loading
block of ``run_class_finetuning.py`` ``main()`` (from ``if args.finetune:`` to ``utils.load_state_dict(...)``), read from
the checkout and executed verbatim, with ``utils.load_state_dict`` = the function of that name in ``beit/utils.py``,
also read from the checkout and executed (the module itself imports ``torch._six``, tensorboardX and the dVAE). Nothing
of the official code is copied here.

Cases: ``finetuned_112.pth`` (made earlier, see README) and a new ``finetuned_abs_112.pth`` with an absolute
position embedding too (``use_abs_pos_emb=True``; no released BEiT v1 has one, but the official code resizes it when
present), and that file's timm layout ``finetuned_abs_112.safetensors`` (the same tensors without the
``relative_position_index`` buffers).
"""
from __future__ import annotations

import ast
import math
import sys
import textwrap
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import interpolate
from torch import nn

import modeling_finetune  # microsoft/unilm beit/

COMMIT = "768a3c873f598bb9b4d4dfb9267b099e35f8fe56"
ARCH = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, qkv_bias=True, use_rel_pos_bias=True,
            init_values=0.1, use_mean_pooling=True, num_classes=10)


def build(img_size: int, abs_pos: bool) -> nn.Module:
    return modeling_finetune.VisionTransformer(img_size=img_size, use_abs_pos_emb=abs_pos,
                                               norm_layer=partial(nn.LayerNorm, eps=1e-6), **ARCH)


def randomize(model: nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases incl. q/v 0.02 N, class
    token N(0, 0.02), gamma 0.1 (1 + 0.1 N)), with the absolute embedding and the bias tables N(0, 0.5) so that
    resizing them matters; float16-exact values, stored as float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("bias", "q_bias", "v_bias")) and "relative_position" not in name:
                value = 0.02 * noise
            elif name.endswith(("gamma_1", "gamma_2")):
                value = 0.1 * (1 + 0.1 * noise)
            elif p.ndim == 1:
                value = 1 + 0.1 * noise
            elif name in ("pos_embed",) or name.endswith("relative_position_bias_table"):
                value = 0.5 * noise
            elif name == "cls_token":
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def official_source(beit_root: Path):
    """(the loading block of run_class_finetuning.py main(), beit/utils.py load_state_dict), as in the checkout."""
    lines = (beit_root / "run_class_finetuning.py").read_text().splitlines()
    start = lines.index("    if args.finetune:")
    end = next(i for i in range(start, len(lines)) if "utils.load_state_dict(model, checkpoint_model" in lines[i])
    block = textwrap.dedent("\n".join(lines[start:end + 1]))
    source = (beit_root / "utils.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "load_state_dict")
    scope: dict = {}
    exec(compile(ast.get_source_segment(source, fn), "beit/utils.py", "exec"), scope)
    return block, Namespace(load_state_dict=scope["load_state_dict"])


def finetune_load(model: nn.Module, path: Path, beit_root: Path) -> nn.Module:
    block, utils = official_source(beit_root)
    args = Namespace(finetune=str(path), model_key="model|module", model_prefix="")
    scope = {"torch": torch, "np": np, "interpolate": interpolate, "utils": utils, "model": model, "args": args}
    exec(compile(block, "beit/run_class_finetuning.py", "exec"), scope)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def main(out: Path, beit_root: Path) -> None:
    pixels_112 = load_file(str(out / "finetuned_112_io.safetensors"))["pixel_values"].float()
    x160 = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1703)).half().float()
    io = {"pixel_values_160": x160}
    # the fine-tuned release layout made earlier: per-block tables, no absolute embedding
    model = finetune_load(build(160, False), out / "finetuned_112.pth", beit_root)
    io["finetuned_logits_160"] = logits(model, x160)
    # a new one with an absolute embedding too
    small = build(112, True)
    randomize(small, 1701)
    state = {k: v.detach().clone() for k, v in small.state_dict().items()}
    torch.save({"model": state}, out / "finetuned_abs_112.pth")
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("relative_position_index")},
              str(out / "finetuned_abs_112.safetensors"))
    io["abs_logits_112"] = logits(small, pixels_112)
    big = finetune_load(build(160, True), out / "finetuned_abs_112.pth", beit_root)
    loaded = big.state_dict()
    resized = ("pos_embed", "relative_position_bias_table", "relative_position_index")
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.endswith(resized)), "a tensor was missed"
    io["abs_logits_160"] = logits(big, x160)
    save_file(io, str(out / "resize_160_io.safetensors"),
              metadata={"source": f"microsoft/unilm@{COMMIT} beit/run_class_finetuning.py",
                        "pixels_112": "finetuned_112_io.safetensors pixel_values"})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(modeling_finetune.__file__).parent)
