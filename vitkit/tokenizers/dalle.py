"""The DALL-E discrete VAE's encoder (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv:2102.12092,
Sec. 2.1), the visual tokenizer of BEiT v1 (Bao et al. 2021, arXiv:2106.08254, Sec. 2.2; microsoft/unilm
beit/modeling_discrete_vae.py@2312c6f ``Dalle_VAE.get_codebook_indices``: ``argmax(encoder(images), axis=1)``).

The architecture is openai/DALL-E dall_e/encoder.py@5be4b23 (``Encoder``, ``EncoderBlock``) and dall_e/utils.py@5be4b23
(``Conv2d``, ``map_pixels``), written anew with the same parameter names, so the official tensors load as they are:

- ``blocks.input``: 7x7 conv, ``input_channels`` -> ``n_hid``;
- ``blocks.group_{1..4}``: ``n_blk_per_group`` residual blocks each, widths ``n_hid * (1, 2, 4, 8)``, a 2x2 max-pool
  after groups 1-3 (8x downsampling). A block is ``id_path(x) + post_gain * res_path(x)`` with ``id_path`` a 1x1 conv
  when the width changes (else the identity), ``res_path`` = ReLU, 3x3 conv to ``n_out / 4``, ReLU, 3x3, ReLU, 3x3,
  ReLU, 1x1 conv to ``n_out``, and ``post_gain = 1 / (4 * n_blk_per_group) ** 2``;
- ``blocks.output``: ReLU, 1x1 conv to ``vocab_size`` logits.

Each conv holds ``w`` (out, in, k, k) and ``b`` and pads ``(k - 1) // 2``. The official conv casts to float16 on CUDA
(``use_float16``, all but the output conv); this one computes in float32, as the official code does on the CPU.

Input: ``map_pixels`` of [0, 1] pixels, ``(1 - 2 eps) x + eps`` with ``eps = 0.1`` (dall_e/utils.py
``logit_laplace_eps``); ``tokenize`` applies it. The released encoder (group_count 4, n_hid 256, n_blk_per_group 2,
vocab 8192) gives 14x14 ids on the 112 px view BEiT uses for its 224 px, patch-16 model.

Loading ``encoder.pkl``: the release is a pickle of the ``Encoder`` module itself, which ``torch.load`` can only
rebuild by importing and running ``dall_e`` (and ``weights_only=True`` refuses). ``DalleEncoder.from_pickle`` reads
it with vitkit's restricted unpickler (``module_pickle``): the ``dall_e`` and ``torch.nn`` classes the file names are
replaced by inert stubs that record each object's ``__dict__``, tensors are rebuilt from their bytes by code written
here, and anything else is refused before it is created. The architecture (``n_hid``, ``n_blk_per_group``,
``input_channels``, ``vocab_size``) is read from the recorded ``Encoder`` attributes and the parameters from the
walked ``_parameters``/``_modules``. The file is read directly each time, not converted once: the reader is no less
safe than a converter would be, and the user keeps the file they downloaded (``save_safetensors`` writes a copy
whose config travels in its metadata, if they want one).
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.tokenizers.base import VisualTokenizer
from vitkit.tokenizers.module_pickle import module_state_dict, read_module_pickle
from vitkit.weights.load_report import CheckpointError

__all__ = ["DalleConfig", "DalleEncoder", "map_pixels", "LOGIT_LAPLACE_EPS", "PICKLED_CLASSES"]

LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py logit_laplace_eps
GROUP_COUNT = 4  # dall_e/encoder.py Encoder.group_count: a class constant, and forward's four groups are written out
# The classes a pickled ``Encoder`` names; read as stubs, never imported.
PICKLED_CLASSES = frozenset({
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
})


def map_pixels(x: Tensor) -> Tensor:
    """[0, 1] pixels to the dVAE's input range [eps, 1 - eps] (dall_e/utils.py ``map_pixels``)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


@dataclass(frozen=True)
class DalleConfig:
    """The official ``Encoder``'s constructor arguments that shape it (defaults: the released encoder)."""
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192


class Conv2d(nn.Module):
    """dall_e/utils.py ``Conv2d``: weight ``w`` (n_out, n_in, kw, kw), bias ``b``, 'same' padding, float32."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw ** 2))  # the official init
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """dall_e/encoder.py ``EncoderBlock``: ``id_path(x) + post_gain * res_path(x)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(n_in: int, n_out: int, n_blk: int, n_layers: int, pool: bool) -> nn.Sequential:
    """``n_blk`` blocks (the first from ``n_in``, the rest at ``n_out``), then a 2x2 max-pool if ``pool``."""
    layers = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers)) for i in range(n_blk)]
    return nn.Sequential(OrderedDict(layers + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))


class DalleEncoder(VisualTokenizer):
    """The dVAE encoder as a ``VisualTokenizer``: ``forward`` takes ``map_pixels`` output and returns logits
    ``(B, vocab_size, H/8, W/8)``; ``tokenize`` takes raw [0, 1] images and returns their argmax ids."""

    downsample = 2 ** (GROUP_COUNT - 1)

    def __init__(self, cfg: DalleConfig = DalleConfig()):
        super().__init__()
        self.cfg, self.vocab_size = cfg, cfg.vocab_size
        n, n_blk, n_layers = cfg.n_hid, cfg.n_blk_per_group, GROUP_COUNT * cfg.n_blk_per_group
        widths = [n * 2 ** g for g in range(GROUP_COUNT)]  # n_hid * (1, 2, 4, 8)
        groups = [(f"group_{g + 1}", _group(widths[max(g - 1, 0)], widths[g], n_blk, n_layers, g < GROUP_COUNT - 1))
                  for g in range(GROUP_COUNT)]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(cfg.input_channels, n, 7)),
            *groups,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", Conv2d(widths[-1], cfg.vocab_size, 1))]))),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        """``map_pixels``'d images ``(B, C, H, W)`` to logits ``(B, vocab_size, H/8, W/8)``."""
        return self.blocks(x)

    def preprocess(self, images: Tensor) -> Tensor:
        return map_pixels(images.float())

    def ids_from_input(self, x: Tensor) -> Tensor:
        return self(x).argmax(dim=1)  # (B, vocab, h, w) -> (B, h, w)

    @classmethod
    def from_pickle(cls, path: str | os.PathLike) -> DalleEncoder:
        """The official ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder``), read without running its code."""
        file = read_module_pickle(path, PICKLED_CLASSES)
        if getattr(file.root, "source", None) != "dall_e.encoder.Encoder":
            raise CheckpointError(f"{file.path}: holds {file.root!r:.60}, not a pickled dall_e.encoder.Encoder")
        model = cls(_config_from_state(file.root.state, file.path))
        _load_strict(model, module_state_dict(file), file.path)
        return model.eval()

    def save_safetensors(self, path: str | os.PathLike) -> None:
        """This encoder's tensors, with its config as JSON in the file's metadata (``load_safetensors``)."""
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.fspath(path), metadata={"format": "pt", "dalle_config": json.dumps(asdict(self.cfg))})

    @classmethod
    def load_safetensors(cls, path: str | os.PathLike) -> DalleEncoder:
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
        if "dalle_config" not in meta:
            raise CheckpointError(f"{path}: no dalle_config in the metadata; not written by save_safetensors")
        model = cls(_config_from_state(json.loads(meta["dalle_config"]), os.fspath(path)))
        _load_strict(model, load_file(os.fspath(path)), os.fspath(path))
        return model.eval()


def _config_from_state(state: dict, path: str) -> DalleConfig:
    """The architecture from the pickled ``Encoder``'s attributes (attrs fields of the same names)."""
    values = {f.name: state.get(f.name) for f in fields(DalleConfig)}
    bad = {k: v for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad or state.get("group_count", GROUP_COUNT) != GROUP_COUNT:
        raise CheckpointError(f"{path}: cannot read the encoder's architecture from {bad or state.get('group_count')}")
    return DalleConfig(**values)


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Every parameter, by name and shape; values cast to the model's float32."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: tensors do not fit the encoder: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, wrong shape {wrong[:3]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
