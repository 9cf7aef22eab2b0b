"""Regenerate the CCT reference cases in this folder by running the OFFICIAL code on seeded random weights.

    git -C Compact-Transformers checkout cd11f0912749d376f7465cb83534e768b6701d7d
    PYTHONPATH=/path/to/Compact-Transformers python tests/families/cct/data/make_reference.py tests/families/cct/data

Only torch is needed (the official ``src/cct.py`` falls back to its own ``register_model`` without timm). Nothing of
the official code is copied here: it is imported from the checkout given on PYTHONPATH.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from src import cct as official  # SHI-Labs/Compact-Transformers
from src.utils.helpers import fc_check, pe_check

COMMIT = "cd11f0912749d376f7465cb83534e768b6701d7d"
SHRUNK = dict(embedding_dim=64, n_conv_layers=2, kernel_size=3, stride=1, padding=1, num_layers=2, num_heads=2,
              mlp_ratio=1, num_classes=10)  # cct_2_3x2_32 with width 64 (cct_2: 128)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """The golden README's scheme (kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.02 N), with a learnable
    position table of std 0.5 so that resampling it matters; frozen parameters (the sine table) are left as built.
    Values are rounded to float16 so that the file can be stored in half precision without loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                value = 0.02 * noise
            elif p.ndim == 1:
                value = 1 + 0.1 * noise
            elif name.endswith("positional_emb"):
                value = 0.5 * noise
            else:
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value.half().float())


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp16 for the randomised parameters, float32 for the frozen sine table (as the reference created it)."""
    return {k: v.detach().clone() if k == "classifier.positional_emb" and not model.classifier.positional_emb
            .requires_grad else v.detach().half() for k, v in model.state_dict().items()}


def make_case(out: Path, case_id: str, pe: str, seed: int) -> None:
    folder = out / case_id
    folder.mkdir(parents=True, exist_ok=True)
    model = official.CCT(img_size=32, positional_embedding=pe, **SHRUNK)
    randomize(model, seed)
    torch.save(half_state(model), folder / "checkpoint.pth")
    g = torch.Generator().manual_seed(seed + 1)
    x32, x48 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 48, 48, generator=g)
    ref32 = logits(model, x32)
    # the same checkpoint at 48 px, the way the official _cct loads pretrained weights at another size: pe_check
    # (bilinear resize of a learnable table) or, for sine, the new model's own table; then fc_check
    big = official.CCT(img_size=48, positional_embedding=pe, **SHRUNK)
    state = {k: v.float() for k, v in torch.load(folder / "checkpoint.pth", weights_only=True).items()}
    if pe == "learnable":
        state = pe_check(big, state)
    else:
        state["classifier.positional_emb"] = big.state_dict()["classifier.positional_emb"]
    state = fc_check(big, state)
    big.load_state_dict(state)
    ref48 = logits(big, x48)
    save_file({"pixel_values": x32, "logits": ref32, "pixel_values_48": x48, "logits_48": ref48},
              str(folder / "io.safetensors"))
    meta = {
        "case_id": case_id, "family": "cct", "source_format": "official",
        "source": f"SHI-Labs/Compact-Transformers@{COMMIT}",
        "reference_constructor": f"src.cct.CCT(img_size=32, positional_embedding={pe!r}, "
                                 + ", ".join(f"{k}={v!r}" for k, v in SHRUNK.items()) + ")",
        "vitkit_model": "cct_2_3x2_32_sine" if pe == "sine" else "cct_2_3x2_32",
        "kwargs": {"embedding_dim": 64}, "num_classes": 10, "checkpoint": "checkpoint.pth",
        "atol": 1e-4, "rtol": 1e-4, "seed": seed,
        "io": "pixel_values/logits at 32 px; pixel_values_48/logits_48: the same checkpoint loaded by the official "
              "code into CCT(img_size=48, ...) (learnable: pe_check, bilinear; sine: the 48-px model's own table)",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")


def sizes() -> dict[str, dict[str, float]]:
    """Trainable parameters (M) and forward GMACs (FlopCounterMode / 2) of every official variant function at its
    default size and class count, built as the variant's name means it (the *_sine functions pass
    positional_embedding='sine' to CCT directly: at this commit they would build a learnable model)."""
    table = {}
    for name in ["cct_2_3x2_32", "cct_4_3x2_32", "cct_6_3x1_32", "cct_6_3x2_32", "cct_7_3x1_32", "cct_7_3x2_32",
                 "cct_7_7x2_224", "cct_14_7x2_224", "cct_14_7x2_384"]:
        for pe in ("learnable", "sine"):
            fn = getattr(official, name)
            model = fn()
            if pe == "sine":
                if not hasattr(official, name + "_sine"):
                    continue
                assert getattr(official, name + "_sine")().classifier.positional_emb.requires_grad, \
                    "the *_sine factory bug is fixed at this commit?"
                model = official.CCT(img_size=model_img(name), positional_embedding="sine", **arch_of(fn))
            size = model_img(name)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model.eval()(torch.zeros(1, 3, size, size))
            table[name + ("_sine" if pe == "sine" else "")] = {
                "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
                "gmacs": counter.get_total_flops() / 2 / 1e9,
                "num_classes": model.classifier.fc.out_features}
    return table


def model_img(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def arch_of(fn) -> dict:
    """The CCT(...) arguments a variant function passes, read back from the model it builds."""
    m = fn()
    conv = m.tokenizer.conv_layers[0][0]
    blk = m.classifier.blocks[0]
    return dict(embedding_dim=m.classifier.embedding_dim, n_conv_layers=len(m.tokenizer.conv_layers),
                kernel_size=conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0],
                num_layers=len(m.classifier.blocks), num_heads=blk.self_attn.num_heads,
                mlp_ratio=blk.linear1.out_features / m.classifier.embedding_dim,
                num_classes=m.classifier.fc.out_features)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    make_case(out, "official_cct_2_3x2_32_shrunk_sine", "sine", 2101)
    make_case(out, "official_cct_2_3x2_32_shrunk", "learnable", 2102)
    (out / "official_sizes.json").write_text(json.dumps(sizes(), indent=1) + "\n")
