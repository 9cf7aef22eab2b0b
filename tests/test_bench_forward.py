"""The inference fast path of the MLP (activation in place on fc1's output) changes nothing observable: same numbers
as the out-of-place path, the caller's tensors untouched, hooks and autograd see what they always saw."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitkit
from vitkit.layers import Mlp

from conftest import randomize_


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket).split(".")[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"])
def test_inplace_activation_matches_out_of_place_bitwise(act):
    mlp = randomize_(Mlp(16, 64, act_layer=act))
    x = torch.randn(2, 5, 16)
    x0 = x.clone()
    ref = mlp(x)  # grad enabled: the out-of-place path
    with torch.inference_mode():
        fast = mlp(x)
    with torch.no_grad():
        fast_nograd = mlp(x)
    assert torch.equal(ref.detach(), fast) and torch.equal(fast, fast_nograd)
    assert torch.equal(x, x0), "the caller's input must not change"


def test_inplace_path_is_taken_only_without_autograd():
    mlp = randomize_(Mlp(16, 64))
    x = torch.randn(2, 5, 16)
    with _Ops() as ops, torch.no_grad():
        mlp(x)
    assert "gelu_" in ops.names and "gelu" not in ops.names
    with _Ops() as ops:
        out = mlp(x)
    assert "gelu" in ops.names and "gelu_" not in ops.names
    out.sum().backward()
    assert mlp.fc1.weight.grad is not None


def test_a_hook_on_fc1_still_sees_the_pre_activation():
    mlp = randomize_(Mlp(16, 64))
    x = torch.randn(2, 5, 16)
    seen = {}
    mlp.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1", o))
    with torch.no_grad():
        mlp(x)
        ref = torch.nn.functional.linear(x, mlp.fc1.weight, mlp.fc1.bias)
    assert torch.equal(seen["fc1"], ref)


def test_model_inference_equals_training_mode_forward_and_attention_paths_agree():
    model = randomize_(vitkit.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48,
                                           num_heads=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x).detach()
    with torch.inference_mode():
        fast = model(x)
        with vitkit.record_attention(model) as maps:
            recorded = model(x)
    assert torch.equal(ref, fast)
    torch.testing.assert_close(fast, recorded, atol=1e-5, rtol=0)
    assert sorted(maps) == ["blocks.0.attn", "blocks.1.attn"]
