"""The JAX fixtures of this folder at a second input size (8 → 16 px: a 2x2 → 4x4 patch grid), resized and run by the
ORIGINAL code: each file loaded for fine-tuning the way its own repository does it, then applied by its own model.

    git -C vision_transformer checkout c6de1e5378c9831a8477feb30994971bdc409e46
    git -C big_vision checkout 0127fb6b337ee2a27bf4e54dea79cff176527356
    PYTHONPATH=/path/to/vision_transformer:/path/to/big_vision:<tensorflow shim> \\
        python tests/families/vit/data/jax/make_resize_reference.py tests/families/vit/data/jax

- vit_jax files: ``vit_jax.checkpoint.load_pretrained(pretrained_path=..., init_params=<16-px model's init>,
  model_config=...)``, which resizes ``pos_embedding`` with ``interpolate_posembed`` (``scipy.ndimage.zoom``, order 1);
  it also replaces the classifier by the new model's (zero) one for a new task, so the file's own ``head`` is put back
  afterwards (vitkit keeps a classifier whose class count matches). ``vit_jax_opt_target`` is left out:
  ``load_pretrained`` does not read the AugReg ``opt/target`` wrapper (its resize is the same function).
- big_vision files: ``big_vision.models.vit.load(init_params, path, model_cfg)``, which resizes with
  ``resample_posemb`` (``scipy.ndimage.zoom``, order 1).

jax 0.10.2, flax 0.12.8, numpy 2.4.6, scipy 1.17.1, CPU, float32. TensorFlow is used by both only for file access and
is replaced by a ``tensorflow.io.gfile`` shim (``GFile`` = ``open``). Nothing of the original code is copied here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_vision.models import vit as bv_vit  # google-research/big_vision
from vit_jax import checkpoint, models_vit  # google-research/vision_transformer

SIZE = 16
WIDTH, HEADS, DEPTH, MLP, PATCH, CLASSES = 16, 2, 2, 32, 4, 5  # the fixtures' shape (README.md)


def vit_jax_logits(path: Path, kwargs: dict, x: np.ndarray) -> np.ndarray:
    config = ml_collections.ConfigDict(dict(
        num_classes=CLASSES, patches=dict(size=(PATCH, PATCH)), hidden_size=WIDTH, classifier="token",
        representation_size=kwargs.get("representation_size"),
        transformer=dict(mlp_dim=MLP, num_heads=HEADS, num_layers=DEPTH, attention_dropout_rate=0.0,
                         dropout_rate=0.0)))
    model = models_vit.VisionTransformer(**config)
    init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)["params"]
    params = checkpoint.load_pretrained(pretrained_path=str(path), init_params=init, model_config=config)
    params = flax_unfreeze(params)
    params["head"] = checkpoint.load(str(path))["head"]  # load_pretrained resets it for a new task
    return np.asarray(model.apply({"params": params}, x, train=False))


def big_vision_logits(path: Path, pool: str, x: np.ndarray) -> np.ndarray:
    cfg = dict(num_classes=CLASSES, patch_size=(PATCH, PATCH), width=WIDTH, depth=DEPTH, mlp_dim=MLP,
               num_heads=HEADS, pool_type=pool, scan=True)
    model = bv_vit.Model(**cfg)
    init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    params = bv_vit.load(init, str(path), cfg)
    logits, _ = model.apply({"params": params}, x)
    return np.asarray(logits)


def flax_unfreeze(tree):
    import flax
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)


def main(folder: Path) -> None:
    manifest = json.loads((folder / "fixtures.json").read_text())["fixtures"]
    pixels = np.random.default_rng(1601).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)  # NCHW, stored so
    x = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # the JAX models take NHWC
    out = {"pixel_values": pixels}
    for name, meta in manifest.items():
        path = folder / f"{name}.npz"
        if name.startswith("big_vision"):
            out[f"{name}/logits"] = big_vision_logits(path, "gap" if name.endswith("gap") else "tok", x)
        elif meta["layout"] != "opt-target":
            out[f"{name}/logits"] = vit_jax_logits(path, meta["kwargs"], x)
    np.savez(folder / "reference_16px.npz", **out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
