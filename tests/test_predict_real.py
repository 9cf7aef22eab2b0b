"""Real predictions: the shared ImageNet-trained DeiT-Tiny on real photos (``../shared``; see its weights/README.md).

Skipped with a message when ``../shared`` (or ``$VITKIT_SHARED``) is absent, a failure under ``CI=true``.
The expected labels and probabilities are the README's, which were produced with transformers'
``ViTForImageClassification``; the parity test repeats that comparison logit by logit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, require, skip_or_fail
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.cli.main import main
from vitkit.data import load_image
from vitkit.evaluate import eval_transform

SHARED = Path(os.environ.get("VITKIT_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224_in1k_fp16.safetensors"
IMAGES = SHARED / "data" / "images"
# README: photo → (top-1, probability); the cat's top-3 are close, so any of them may come first
EXPECTED = {
    "kodak_kodim23.png": ("macaw", 0.91),
    "skimage_coffee.png": ("espresso", 0.85),
    "kodak_kodim21.png": ("beacon", 0.91),
    "kodak_kodim13.png": ("valley", 0.70),
}
CATS = {"Egyptian cat", "tabby", "tiger cat"}
PHOTOS = [*EXPECTED, "skimage_chelsea.png"]


@pytest.fixture(scope="module")
def shared() -> Path:
    missing = [p for p in [WEIGHTS, *(IMAGES / f for f in PHOTOS)] if not p.is_file()]
    if missing:
        skip_or_fail(f"shared weights/photos not found ({missing[0]}); set VITKIT_SHARED to the shared folder")
    return SHARED


@pytest.fixture(scope="module")
def pixel_values(shared) -> torch.Tensor:
    model_cfg = vitkit.get_spec("deit_tiny_patch16_224").data_cfg
    transform = eval_transform(model_cfg)
    return torch.stack([transform(load_image(IMAGES / f)) for f in PHOTOS])  # (5, 3, 224, 224)


def test_predict_cli_gives_readme_labels(shared, capsys):
    rc = main(["predict", *(str(IMAGES / f) for f in PHOTOS), "--model", "deit_tiny_patch16_224",
               "--pretrained", str(WEIGHTS), "--format", "json", "--topk", "5", "--device", "cpu"])
    assert rc == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    for photo, (label, prob) in EXPECTED.items():
        top1 = rows[photo]["topk"][0]
        assert top1["label"] == label, (photo, rows[photo]["topk"])
        assert top1["prob"] == pytest.approx(prob, abs=0.01)
    cat = [t["label"] for t in rows["skimage_chelsea.png"]["topk"]]
    assert cat[0] in CATS and set(cat[:3]) == CATS


def test_preprocessing_matches_transformers_processor(pixel_values):
    """README preprocessing (short side 256 bicubic, centre 224, ImageNet mean/std) as transformers' PIL DeiT
    processor does it; these photos have even crop offsets, where transformers and timm round alike."""
    processors = require("transformers.models.deit.image_processing_pil_deit")
    ref = processors.DeiTImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    expected = ref([load_image(IMAGES / f) for f in PHOTOS], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)


def _timm_to_hf4(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ViT keys → transformers 4.x ``ViTForImageClassification`` keys (the layout of files on the Hub);
    timm's fused qkv rows are [q; k; v], so it splits in thirds."""
    out = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"], "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"],
    }
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for a, b in renames.items():
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
            q, k, v = state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"{dst}attention.attention.{name}.{kind}"] = t.contiguous()
    assert len(out) == len(state) + 4 * depth  # every tensor mapped; each qkv weight and bias became three
    return out


def test_logits_equal_transformers(shared, pixel_values, tmp_path):
    transformers = require("transformers")
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                    intermediate_size=768, layer_norm_eps=1e-6, image_size=224, patch_size=16,
                                    num_labels=1000)
    state = {k: v.float() for k, v in load_file(WEIGHTS).items()}  # fp16 file, compared in float32
    config.save_pretrained(tmp_path)
    save_file(_timm_to_hf4(state, 12), tmp_path / "model.safetensors", metadata={"format": "pt"})
    # from_pretrained rather than load_state_dict: transformers 5 renames the 4.x file layout on load itself
    hf, info = transformers.ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True,
                                                                      dtype=torch.float32)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = vitkit.create_model("deit_tiny_patch16_224", pretrained=WEIGHTS).eval()
    with torch.inference_mode():
        expected = hf.eval()(pixel_values=pixel_values).logits
        logits = ours(pixel_values)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    names = [n for n, _ in EXPECTED.values()]
    assert [vitkit.evaluate.imagenet_class_names()[i] for i in expected[:4].argmax(1).tolist()] == names


def test_readme_python_path_from_an_image_file_to_a_prediction(shared, capsys):
    """The README's snippet (image file → model.data_cfg → eval_transform → probabilities), run as written with the
    shared weights and the macaw photo: it prints the README's top-1."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\nimport torch, vitkit\nfrom vitkit.data import load_image")
    code = readme[start + len("```python\n"):readme.index("```", start + 3)]
    code = code.replace('"deit_tiny_patch16_224_in1k.safetensors"', repr(str(WEIGHTS)))
    code = code.replace('"photo.jpg"', repr(str(IMAGES / "kodak_kodim23.png")))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[('macaw', 0.91"), printed
