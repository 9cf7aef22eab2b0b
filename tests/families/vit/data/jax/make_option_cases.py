"""JAX reference cases for the ``vit_jax/models_vit.py`` options no released classifier of this folder sets, made by
running google-research/vision_transformer at c6de1e5 on seeded random weights (README.md, "Constructor options").

    git -C vision_transformer checkout c6de1e5378c9831a8477feb30994971bdc409e46
    PYTHONPATH=/path/to/vision_transformer:<tensorflow shim> python tests/families/vit/data/jax/make_option_cases.py tests/families/vit/data/jax

Every model is ``vit_jax.models_vit.VisionTransformer(**config)``, initialised with ``model.init``, its parameters
overwritten by the README's scheme (float16-exact values, stored float32), applied with ``model.apply(train=False)``,
and written with ``np.savez_compressed`` of ``vit_jax.checkpoint._flatten_dict`` ('/'-joined names, linen
numbering; compressed only to keep the files small: ``np.load`` reads both kinds); each file is read back with
``vit_jax.checkpoint.load`` and must equal the model's parameters leaf by leaf. The hybrids are
also loaded for fine-tuning at a second size by ``vit_jax.checkpoint.load_pretrained`` (``interpolate_posembed``:
``scipy.ndimage.zoom(order=1)``), the file's own head put back afterwards (``load_pretrained`` replaces it), and
applied by the model built for that size. Nothing of the original code is copied here; TensorFlow, which vit_jax and
flax import for file access, is the ``tensorflow.io.gfile`` shim of README.md.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint, models_vit  # google-research/vision_transformer

COMMIT = "c6de1e5378c9831a8477feb30994971bdc409e46"
SMALL = dict(hidden_size=16, patches=dict(size=(4, 4)), num_classes=5, representation_size=None,
             transformer=dict(mlp_dim=32, num_heads=2, num_layers=2, attention_dropout_rate=0.0, dropout_rate=0.0))
HYBRID = dict(hidden_size=48, num_classes=10, representation_size=None, classifier="token",
              transformer=dict(mlp_dim=192, num_heads=3, num_layers=2, attention_dropout_rate=0.0, dropout_rate=0.0))
CASES = {
    # transformer.add_position_embedding=False: no Transformer/posembed_input at all
    "vit_jax_no_posemb": dict(SMALL, classifier="token",
                              transformer=dict(SMALL["transformer"], add_position_embedding=False)),
    # classifier 'unpooled': no class token, the head applied to every token
    "vit_jax_unpooled": dict(SMALL, classifier="unpooled"),
    # classifier 'token_unpooled': class token kept in the sequence; with a representation layer, per token too
    "vit_jax_token_unpooled": dict(SMALL, classifier="token_unpooled", representation_size=12),
    # resnet: the R50+ViT-B/16 hybrid's stem and stages, shrunk (two stages of one unit, width 32, stride 8)
    "vit_jax_r50_shrunk": dict(HYBRID, patches=dict(size=(1, 1)), resnet=dict(num_layers=(1, 1), width_factor=0.5)),
    # resnet.num_layers=(): the R+Ti/16 hybrid's root block alone (stride 4), 2x2 patches, shrunk
    "vit_jax_r_stem_shrunk": dict(HYBRID, patches=dict(size=(2, 2)), resnet=dict(num_layers=(), width_factor=0.5),
                                  transformer=dict(HYBRID["transformer"], num_layers=1)),
}
SIZES = {"vit_jax_r50_shrunk": (32, 48), "vit_jax_r_stem_shrunk": (32, 48)}  # native, second; others 8 px
HEAD_BIAS_INIT = 0.25  # head_bias_init: initialisation only; the JAX initialiser's head is stored for comparison


def config_of(case: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(case)


def fan_in(path: tuple[str, ...], shape: tuple[int, ...]) -> int:
    """Inputs of a kernel: (in, out) dense, (kh, kw, in, out) conv, (D, heads, head_dim) for query/key/value."""
    if path[-2] in ("query", "key", "value"):
        return shape[0]
    return math.prod(shape[:-1])


def randomize(params: dict, seed: int) -> dict:
    """README scheme: kernels N(0, 1)/sqrt(fan_in), norm scales 1 + 0.1 N, biases 0.02 N, class token and position
    embedding 0.5 N (so that they matter), the zero-initialised head too; float16-exact values."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for path in sorted(flat):
        shape = tuple(flat[path].shape)
        n = rng.standard_normal(shape)
        name = path[-1]
        if name == "kernel":
            value = n / math.sqrt(fan_in(path, shape))
        elif name == "scale":
            value = 1 + 0.1 * n
        elif name == "bias":
            value = 0.02 * n
        else:  # cls, pos_embedding
            value = 0.5 * n
        out[path] = value.astype(np.float16).astype(np.float32)
    return flax.traverse_util.unflatten_dict(out)


def build(case: dict):
    return models_vit.VisionTransformer(**config_of(case))


def init(model, size: int) -> dict:
    return flax.core.unfreeze(model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)["params"])


def apply(model, params: dict, pixels: np.ndarray) -> np.ndarray:
    x = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # stored NCHW, the JAX models take NHWC
    return np.asarray(model.apply({"params": params}, x, train=False))


def save(params: dict, path: Path) -> None:
    """np.savez_compressed of vit_jax's '/'-joined names, then read back with vit_jax's own loader, leaf by leaf."""
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in checkpoint._flatten_dict(params).items()})
    back = flax.traverse_util.flatten_dict(checkpoint.load(str(path)))
    mine = flax.traverse_util.flatten_dict(params)
    assert back.keys() == mine.keys(), sorted(set(back) ^ set(mine))
    assert all(np.array_equal(back[k], mine[k]) for k in mine)


def second_size(name: str, case: dict, path: Path, size: int, pixels: np.ndarray) -> np.ndarray:
    """load_pretrained into the model built for ``size`` (the position embedding zoomed), the file's head put back."""
    model = build(case)
    params = flax.core.unfreeze(checkpoint.load_pretrained(pretrained_path=str(path), init_params=init(model, size),
                                                           model_config=config_of(case)))
    params["head"] = checkpoint.load(str(path))["head"]
    return apply(model, params, pixels)


def main(folder: Path) -> None:
    rng = np.random.default_rng(2301)
    out, manifest = {}, {}
    for i, (name, case) in enumerate(CASES.items()):
        native, second = SIZES.get(name, (8, None))
        model = build(case)
        params = randomize(init(model, native), seed=2310 + i)
        path = folder / f"{name}.npz"
        save(params, path)
        pixels = rng.standard_normal((2, 3, native, native)).astype(np.float32)
        out[f"{name}/pixel_values"], out[f"{name}/logits"] = pixels, apply(model, params, pixels)
        if second:
            big = rng.standard_normal((2, 3, second, second)).astype(np.float32)
            out[f"{name}/pixel_values_{second}"] = big
            out[f"{name}/logits_{second}"] = second_size(name, case, path, second, big)
        manifest[name] = dict(source=f"google-research/vision_transformer@{COMMIT}",
                              model="vit_jax/models_vit.py VisionTransformer", config=case, img_size=native,
                              second_size=second, seed=2310 + i,
                              writer="np.savez_compressed of vit_jax/checkpoint.py _flatten_dict (linen numbering)")
    head = init(models_vit.VisionTransformer(**config_of(dict(SMALL, classifier="token",
                                                              head_bias_init=HEAD_BIAS_INIT))), 8)["head"]
    out["head_bias_init/kernel"], out["head_bias_init/bias"] = np.asarray(head["kernel"]), np.asarray(head["bias"])
    manifest["head_bias_init"] = dict(source=f"google-research/vision_transformer@{COMMIT}",
                                      model="vit_jax/models_vit.py VisionTransformer", value=HEAD_BIAS_INIT,
                                      config=dict(SMALL, classifier="token", head_bias_init=HEAD_BIAS_INIT),
                                      what="the head's kernel and bias as model.init creates them")
    np.savez(folder / "reference_options.npz", **out)
    versions = dict(jax=jax.__version__, flax=flax.__version__, numpy=np.__version__)
    (folder / "options.json").write_text(json.dumps(dict(versions=versions, cases=manifest), indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
