"""Which scaled-dot-product kernel vitkit's attention runs (``vitkit.layers.attention.attend``), read from the op names
torch.profiler records, and that the fused kernels compute what the math kernel computes.

On CPU, ``F.scaled_dot_product_attention`` dispatches to a fused flash kernel,
``aten::_scaled_dot_product_flash_attention_for_cpu`` (torch/nn/attention docs; aten/src/ATen/native/transformers/
sdp_utils_cpp.cpp decides), or falls back to ``aten::_scaled_dot_product_attention_math``. What torch 2.13 does here,
as measured and asserted below:

- no mask, or an additive float mask of 4 dims that needs no gradient: the fused kernel, forward and backward;
- a mask of 3 dims (h, N, M): math, which is why ``attend`` views a bias as (1, h, N, M);
- a mask that requires a gradient (a learned relative-position table while training: BEiT, Swin, DAT): math, forward
  and backward, since the CPU fused kernel has no gradient for the mask;
- attention dropout (``dropout_p`` > 0): math.

The CUDA kernels (flash, memory-efficient, cuDNN) are tested only on a CUDA device; without one those tests skip and
say so.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from vitkit.families.contract import FamilyModel

from test_contract import DISTINCT, _input, _tiny

FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
FLASH_CPU_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
MATH = "aten::_scaled_dot_product_attention_math"
CUDA_KERNELS = {"FLASH_ATTENTION": "aten::_scaled_dot_product_flash_attention",
                "EFFICIENT_ATTENTION": "aten::_scaled_dot_product_efficient_attention",
                "CUDNN_ATTENTION": "aten::_scaled_dot_product_cudnn_attention"}
# Measured max |Δ| between the fused and the math kernel over every distinct tiny model (fp32): 1.5e-6 on logits
# of up to 3, and 2.1e-6 of the model's largest gradient entry.
TOL = 1e-5


def profiled(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, set[str]]:
    """``fn()`` and the ``aten::_scaled_dot_product_*`` ops (their backward ops too) that it ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


def kernels(fn: Callable[[], Any]) -> set[str]:
    return profiled(fn)[1]


def forward(model: FamilyModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def forward_backward(model: FamilyModel, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).sum().backward()
    return out.detach()


# ------------------------------------------------------------------------------------------------- CPU kernels
def test_a_plain_vit_runs_the_fused_cpu_kernel_forward_and_backward():
    model = _tiny("vit_tiny_patch16_224")
    x = _input(model)
    assert kernels(lambda: forward(model, x)) == {FLASH_CPU}
    model.train()
    assert kernels(lambda: forward_backward(model, x)) == {FLASH_CPU, FLASH_CPU_BACKWARD}


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_a_relative_position_bias_runs_the_fused_cpu_kernel_at_inference(name):
    """BEiT adds each block's (h, N, N) relative-position bias, Swin its window bias and the shifted windows' mask:
    as a 4-d float mask they take the fused kernel (a 3-d one would not, see below)."""
    model = _tiny(name)
    x = _input(model)
    assert kernels(lambda: forward(model, x)) == {FLASH_CPU}


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_a_learned_bias_falls_back_to_math_while_training(name):
    """Honest fallback: the bias is computed from a learned table, so it requires a gradient, and the CPU fused kernel
    has none for its mask: the whole training step's attention runs the math kernel (forward and backward)."""
    model = _tiny(name).train()
    x = _input(model)
    assert kernels(lambda: forward_backward(model, x)) == {MATH}


def test_which_masks_and_dropout_the_fused_cpu_kernel_takes():
    """The dispatch rules the docstring lists, on bare ``F.scaled_dot_product_attention`` calls."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 10, 10, generator=g)
    sdpa = F.scaled_dot_product_attention
    assert kernels(lambda: sdpa(q, k, v)) == {FLASH_CPU}
    assert kernels(lambda: sdpa(q, k, v, attn_mask=bias)) == {FLASH_CPU}
    assert kernels(lambda: sdpa(q, k, v, attn_mask=bias > 0)) == {FLASH_CPU}  # a boolean mask too
    assert kernels(lambda: sdpa(q, k, v, attn_mask=bias[0])) == {MATH}  # (h, N, M): 3 dims
    assert kernels(lambda: sdpa(q, k, v, attn_mask=bias.clone().requires_grad_())) == {MATH}
    assert kernels(lambda: sdpa(q, k, v, dropout_p=0.1)) == {MATH}
    with sdpa_kernel(SDPBackend.MATH):
        assert kernels(lambda: sdpa(q, k, v)) == {MATH}


# ---------------------------------------------------------------------------------------- fused versus math
@pytest.mark.parametrize("name", DISTINCT)
def test_fused_and_math_kernels_agree(name):
    """Every distinct tiny model (every family routes its attention through ``attend``): logits at inference, where
    the fused kernel runs (checked), and logits and gradients of a backward pass, where it runs unless a learned bias
    sends both to math (above), are the math kernel's to ``TOL``."""
    model = _tiny(name, num_classes=7)
    x = _input(model)
    fused, ops = profiled(lambda: forward(model, x))
    assert FLASH_CPU in ops, f"the default dispatch ran {ops}"
    with sdpa_kernel(SDPBackend.MATH):
        assert kernels(lambda: forward(model, x)) == {MATH}
        reference = forward(model, x)
    torch.testing.assert_close(fused, reference, rtol=0, atol=TOL)

    out = forward_backward(model.eval(), x)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = forward_backward(model, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=TOL)
    scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    worst = max(((grads[k] - p.grad).abs().max().item(), k) for k, p in model.named_parameters() if k in grads)
    assert worst[0] <= TOL * scale, f"{worst[1]}: |Δ| {worst[0]:.2e} of a largest gradient {scale:.2e}"


# ------------------------------------------------------------------------------------------------- CUDA kernels
@pytest.mark.parametrize("backend", list(CUDA_KERNELS))
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beit_base_patch16_224"])
def test_cuda_kernel_matches_math(backend, name):
    """On a CUDA device, each CUDA kernel under fp16 autocast computes the fp32 math kernel's logits to fp16
    rounding, and is the kernel that ran. A kernel this device or build cannot run for this call (flash takes no
    additive mask, cuDNN needs a recent GPU) is skipped with torch's reason, not counted as a pass."""
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device here: SDPBackend.{backend} runs on CUDA only (the CPU kernels are tested above)")
    model = _tiny(name, num_classes=7).cuda().eval()
    x = _input(model).cuda()
    with sdpa_kernel(SDPBackend.MATH):
        reference = forward(model, x)

    def run() -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            return forward(model, x)
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            out, ops = profiled(run, device="cuda")
    except RuntimeError as e:
        if "No available kernel" not in str(e):
            raise
        pytest.skip(f"SDPBackend.{backend} cannot run {name}'s attention on {torch.cuda.get_device_name()}: "
                    f"{str(e).splitlines()[0]}")
    assert CUDA_KERNELS[backend] in ops, ops
    scale = reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=1e-2 * scale)  # fp16: ~3 decimal digits
