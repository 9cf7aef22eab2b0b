"""What every family's Hugging Face ``transformers`` checkpoints have in common, written once.

A transformers checkpoint of a family is a state dict whose keys may carry the base model's prefix (``swin.``, or
either of ``vit.`` / ``deit.``), in the 4.x names that Hub files and ``save_pretrained`` use, or (for some families)
in the 5.x names of a live model's ``state_dict`` (transformers ``conversion_mapping.py``). A family's ``formats.py``
describes its layout once as a ``TransformersLayout`` (base prefixes, the ``model_type`` its config.json names, the
rename table for a set of keys, the key signature of a state dict without a config.json) and passes the layout's
``detect`` and ``convert`` to its ``SourceFormat``. The activation names transformers configs use and the head size
are read here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from vitkit.specs import CheckpointView
from vitkit.weights.keymap import KeyMap
from vitkit.weights.load_report import CheckpointError

__all__ = ["TransformersLayout", "HF_ACTIVATIONS", "TWIN_ACTIVATIONS", "hf_activation", "head_hints", "strip_base",
           "write_twin"]

#: transformers ``hidden_act`` → vitkit's ``act_layer`` (the tanh approximations are one function)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
#: vitkit's ``act_layer`` → the ``hidden_act`` a transformers twin is built with
TWIN_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def strip_base(state: Mapping[str, Any], bases: str | tuple[str, ...]) -> dict[str, Any]:
    """The state dict with the base model's prefix (any of ``bases``, e.g. ``"swin."``) removed where present."""
    bases = (bases,) if isinstance(bases, str) else bases
    return {_strip(k, bases): v for k, v in state.items()}


def _strip(key: str, bases: tuple[str, ...]) -> str:
    for base in bases:
        if key.startswith(base):
            return key[len(base):]
    return key


def hf_activation(config: Mapping[str, Any], label: str, key: str = "hidden_act") -> str:
    """vitkit's ``act_layer`` for a transformers config's activation; another one is refused, naming it."""
    act = config.get(key, "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"transformers {label} config {key}={act!r} is not supported by vitkit's {label} "
                              f"(supported: {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[act]


def head_hints(state: Mapping[str, Any], key: str = "classifier.weight") -> dict[str, Any]:
    """``num_classes`` from the classifier's weight, when the checkpoint has one."""
    head = state.get(key)
    return {} if head is None else {"num_classes": int(head.shape[0])}


@dataclass(frozen=True)
class TransformersLayout:
    """One family's transformers checkpoints.

    ``bases``: the base-model prefixes its task models put before the trunk's keys; ``model_types``: what its
    config.json says; ``keymap``: the rename table for a (prefix-stripped) set of keys, which tells the 4.x and 5.x
    names apart where the family has both; ``signature``: True when prefix-stripped keys of a state dict without a
    config.json are this family's.
    """

    label: str
    bases: tuple[str, ...]
    model_types: tuple[str, ...]
    keymap: Callable[[Collection[str]], KeyMap]
    signature: Callable[[set[str]], bool]

    def detect(self, view: CheckpointView) -> bool:
        if view.model_type is not None:
            return view.model_type in self.model_types
        return self.signature({_strip(k, self.bases) for k in view.keys})

    def convert(self, state: dict[str, Any], report) -> dict[str, Any]:
        """transformers (either layout, with or without the base prefix) → vitkit."""
        state = strip_base(state, self.bases)
        return self.keymap(state.keys()).forward(state, report)


def write_twin(model, hf, keymap: KeyMap, base: str, top_level: tuple[str, ...] = ("classifier.",),
               skip: tuple[str, ...] = ()):
    """Write a vitkit model's weights into ``hf`` (a transformers model built with the matching config) through the
    inverse of the rename table that reads transformers files: every key gets the base-model prefix ``base`` but the
    task head's (``top_level``); ``skip``: vitkit keys transformers does not store (computed buffers). Returns ``hf``
    in eval mode, on the model's device and dtype."""
    state = keymap.inverse({k: v.detach() for k, v in model.state_dict().items()}, skip=skip)
    hf.load_state_dict({(k if k.startswith(top_level) else base + k): v for k, v in state.items()}, strict=True)
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()
