"""Per-rank memory of one training step (forward, backward, AdamW step) of a plain pre-norm transformer encoder, the
ViT of Dosovitskiy et al. (2020, eq. 1-4): modelled from its dimensions, and measured under DDP, FSDP and FSDP with
activation checkpointing.

The model (``step_memory``) replays, tensor by tensor and in the order the code runs them, the allocations and frees
of one step on one rank, and reports the highest level of live bytes and where it was reached. It needs no torch
allocation: an ``EncoderShape`` (widths, token count, parameter shapes) and a ``StepSetup`` (batch per rank,
strategy, precision, number of ranks, device). Every term is derived from the code path of torch 2.13 and checked
against it: the tensors autograd saves per block (``tests/test_memory_model.py`` counts them with
``torch.autograd.graph.saved_tensors_hooks``) and the allocator's own count of a whole step (below).

The measurement (``measure``, ``python -m vitkit.bench.memory measure``, ``vitkit bench MODEL --memory ...``) runs
the step in ``torchrun`` processes on the CPU (gloo) and reads c10's CPU allocator: with
``FLAGS_caffe2_report_cpu_memory_usage`` set at process start the allocator keeps a global count of the bytes of
every live CPU tensor of every thread, and ``torch.profiler`` (``profile_memory=True``) stamps that count on each
allocation of the step; the largest stamp is the peak. This is exact for tensors and blind to what is not a tensor
(glibc's free lists, gloo's internal buffers, the interpreter), so the growth of the resident set during the step
(``VmHWM`` after ``/proc/self/clear_refs``, with ``MALLOC_MMAP_THRESHOLD_`` fixed so freed tensors return to the
kernel) is reported beside it as a cross-check.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["STRATEGIES", "PRECISIONS", "EncoderShape", "StepSetup", "StepMemory", "step_memory", "largest_fitting",
           "memory_table", "measure", "Measurement", "GIB", "block_dropout",
           "block_activations"]

STRATEGIES = ("single", "ddp", "fsdp", "fsdp_ac")
PRECISIONS = ("fp32", "bf16")
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------------ shapes
def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class EncoderShape:
    """The dimensions the memory of a step depends on: width D, depth L, heads h, MLP width M, tokens T (prefix
    included), one input image (C, H, W), classes K, and the parameter shapes of one block and of the rest (patch
    embedding, class token, position embedding, final norm, head), which FSDP shards."""

    width: int
    depth: int
    heads: int
    mlp_width: int
    tokens: int
    image: tuple[int, int, int]
    num_classes: int
    block_params: tuple[tuple[int, ...], ...]
    root_params: tuple[tuple[int, ...], ...]

    @classmethod
    def from_dims(cls, width: int, depth: int, heads: int, mlp_width: int, patch_size: int, img_size: int,
                  in_chans: int = 3, num_classes: int = 1000, prefix_tokens: int = 1) -> EncoderShape:
        """A ViT from the paper's sizes (Table 1; Zhai et al. 2021 Table 2 for g/14): LN, qkv (3D, D), proj, LN,
        fc1 (M, D), fc2 (D, M) per block; patch projection, class token, position table, final LN, head."""
        D, M, K = width, mlp_width, num_classes
        tokens = (img_size // patch_size) ** 2 + prefix_tokens
        block = ((D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (M, D), (M,), (D, M), (D,))
        root = ((D, in_chans, patch_size, patch_size), (D,), *([(1, prefix_tokens, D)] if prefix_tokens else []),
                (1, tokens, D), (D,), (D,), (K, D), (K,))
        return cls(D, depth, heads, M, tokens, (in_chans, img_size, img_size), K, block, root)

    @classmethod
    def of_model(cls, model: Any) -> EncoderShape:
        """The shape of a built model (the meta device is enough), read through the family contract: its
        ``named_blocks()`` must be ``vitkit.layers.Block`` units of global attention and a GELU MLP without dropout,
        drop path or LayerScale, all alike (the blocks this model covers)."""
        blocks = [block for _, block in model.named_blocks()]
        _check_blocks(blocks)
        first = blocks[0]
        in_block = {id(p) for block in blocks for p in block.parameters()}
        C, H, W = (int(s) for s in model.data_cfg.input_size)
        if model.intermediates != "tokens":
            raise ValueError("the memory model covers token models (one grid of tokens through every block)")
        reduction = model.feature_info[-1]["reduction"]
        return cls(width=first.norm1.normalized_shape[0], depth=len(blocks), heads=first.attn.num_heads,
                   mlp_width=first.mlp.fc1.out_features,
                   tokens=model.num_prefix_tokens + (H // reduction) * (W // reduction), image=(C, H, W),
                   num_classes=model.num_classes, block_params=tuple(tuple(p.shape) for p in first.parameters()),
                   root_params=tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_block))

    @property
    def params(self) -> int:
        return self.depth * sum(map(_numel, self.block_params)) + sum(map(_numel, self.root_params))


def _check_blocks(blocks: list) -> None:
    from torch import nn

    from vitkit.layers import Attention, Block, Mlp
    why = []
    if not blocks:
        why.append("it has no blocks")
    for block in blocks[:1]:
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            why.append("its blocks are not vitkit.layers.Block with Attention and Mlp")
        elif block.residual_norm or block.attn.rel_pos is not None or not isinstance(block.mlp.act, nn.GELU):
            why.append("its blocks differ from eq. 2-3 (post-norm, relative position bias or another activation)")
        elif not all(isinstance(m, nn.Identity) for m in (block.ls1, block.ls2, block.drop_path1, block.drop_path2)):
            why.append("its blocks use LayerScale or drop path")
        elif block.attn.attn_drop:
            why.append("its attention drops probabilities (SDPA then leaves the flash kernel)")
    shapes = {tuple(tuple(p.shape) for p in block.parameters()) for block in blocks}
    if len(shapes) > 1:
        why.append("its blocks differ in shape")
    if why:
        raise ValueError(f"the memory model does not cover this model: {why[0]}")


def block_dropout(model: Any) -> bool:
    """Whether the blocks drop after the projection and both MLP layers (the paper's dropout, App. B.1, whose
    mask after the position embedding ``StepSetup(dropout=True)`` counts too); an error for a partial choice."""
    block = model.named_blocks()[0][1]
    rates = {m.p for m in (block.attn.proj_drop, block.mlp.drop1, block.mlp.drop2)}
    if len(rates) > 1:
        raise ValueError("the memory model covers dropout after every dense layer but qkv, or none")
    return rates != {0.0}


# ------------------------------------------------------------------------------------------------- the setup
@dataclass(frozen=True)
class StepSetup:
    """One rank's step: ``batch`` images per rank, ``strategy`` (single process, DDP, FSDP, FSDP + activation
    checkpointing), ``precision`` (fp32; bf16 = autocast for single/DDP, ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)`` for FSDP, fp32 master weights and AdamW state in both), ``world`` ranks, ``device`` (cuda:
    NCCL collectives, bool dropout masks, fp32 LayerNorm statistics; cpu: gloo, whose collectives copy through one
    flat buffer, dropout noise in the activation's dtype, LayerNorm statistics in it), ``dropout`` after the position
    embedding and every dense layer but qkv (paper App. B.1)."""

    batch: int
    strategy: str = "ddp"
    precision: str = "fp32"
    world: int = 1
    device: str = "cuda"
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: choose cpu or cuda")
        if self.batch < 1 or self.world < 1:
            raise ValueError("batch and world must be >= 1")

    @property
    def fsdp(self) -> bool:
        return self.strategy.startswith("fsdp")


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each kind of tensor a step makes."""

    act: int  # dense-layer inputs and outputs, attention, GELU, and their gradients
    res: int  # the residual stream (block inputs, z'), its gradient, the LayerNorm inputs
    stats: int  # LayerNorm mean and 1/std
    param: int  # the (gathered) parameters the forward reads
    grad: int  # the gradients autograd makes for them
    logits: int  # log_softmax's saved output
    autocast: bool  # bf16 copies of the weights are saved for backward (autocast's casts)


def _bytes(setup: StepSetup) -> _Bytes:
    bf16, cpu = setup.precision == "bf16", setup.device == "cpu"
    if not bf16:
        return _Bytes(4, 4, 4, 4, 4, 4, False)
    if setup.fsdp:  # the whole module runs in bf16; CUDA's LayerNorm keeps its statistics in fp32
        return _Bytes(2, 2, 2 if cpu else 4, 2, 2, 2, False)
    return _Bytes(2, 4, 4, 4, 4, 4, True)  # autocast: LayerNorm, softmax, residual adds in fp32


# ------------------------------------------------------------------------------------------------ the ledger
class _Ledger:
    """Live bytes of one rank, tensor by tensor, and the highest level reached (and during what)."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[int, str]] = {}
        self.level = self.peak = 0
        self.phase = self.where = ""

    def alloc(self, name: str, nbytes: int, kind: str = "act") -> None:
        if name in self.live:
            raise RuntimeError(f"memory model: {name} allocated twice")
        self.live[name] = (nbytes, kind)
        self.level += nbytes
        if self.level > self.peak:
            self.peak, self.where = self.level, self.phase

    def free(self, *names: str) -> None:
        for name in names:
            self.level -= self.live.pop(name)[0]

    def free_prefix(self, prefix: str) -> None:
        self.free(*[n for n in self.live if n.startswith(prefix)])

    def temp(self, name: str, nbytes: int) -> None:
        self.alloc(name, nbytes, "temp")
        self.free(name)

    def replace(self, name: str, nbytes: int) -> None:
        """``name`` becomes a new tensor made from it (dropout's output): both live for a moment."""
        kind = self.live[name][1]
        self.alloc(name + "'", nbytes, kind)
        self.free(name)
        self.live[name] = self.live.pop(name + "'")

    def bytes_of(self, kind: str) -> int:
        return sum(n for n, k in self.live.values() if k == kind)


@dataclass(frozen=True)
class StepMemory:
    """Per-rank bytes: ``held`` before the step (parameters or their shards, AdamW's two moments, DDP's gradient
    bucket, the batch), ``activations`` kept for the backward pass at the end of the forward pass, and the ``peak``
    of the step, reached during ``where``."""

    held: int
    activations: int
    peak: int
    where: str


# ------------------------------------------------------------------------------------------------ the replay
class _Step:
    """One training step of ``shape`` under ``setup``, replayed on a ``_Ledger``. Element counts: B batch per rank,
    T tokens, D width, M MLP width, h heads, K classes; a = B·T·D, m = B·T·M."""

    def __init__(self, shape: EncoderShape, setup: StepSetup):
        self.s, self.u, self.b, self.led = shape, setup, _bytes(setup), _Ledger()
        B, T = setup.batch, shape.tokens
        self.a, self.m, self.bt = B * T * shape.width, B * T * shape.mlp_width, B * T
        self.N = setup.world if setup.fsdp else 1
        self.padded = {"root": self._padded(shape.root_params), **{i: self._padded(shape.block_params)
                                                                    for i in range(shape.depth)}}

    def _padded(self, shapes: Iterable[tuple[int, ...]]) -> int:
        """FSDP2 shards every parameter on dim 0, padded to a multiple of the ranks (``_fsdp_param.py``)."""
        return sum(-(-s[0] // self.N) * self.N * _numel(s[1:]) for s in shapes)

    # ------------------------------------------------------------------------------------- before the step
    def held(self) -> None:
        """Parameters, AdamW's ``exp_avg`` and ``exp_avg_sq`` (fp32 master copies; sharded 1/N under FSDP, rank 0's
        share, which holds the padding), DDP's gradient bucket (``gradient_as_bucket_view=False``, the default:
        ``Reducer`` allocates flat buckets of every gradient at construction, one more fp32 copy), the batch."""
        local = sum(self.padded.values()) // self.N if self.u.fsdp else self.s.params
        for name in ("params", "exp_avg", "exp_avg_sq"):
            self.led.alloc(name, 4 * local, "state")
        if self.u.strategy == "ddp":
            self.led.alloc("ddp_bucket", 4 * self.s.params, "state")
        C, H, W = self.s.image
        self.led.alloc("batch", 4 * self.u.batch * C * H * W + 8 * self.u.batch, "state")

    # ----------------------------------------------------------------------------------------------- FSDP
    def gather(self, group: Any) -> None:
        """``foreach_all_gather``: (bf16: a flat bf16 copy of the shards, until the collective has run), the flat
        output of every rank's shards (padded size), and under gloo ``_allgather_base`` copies through one more flat
        buffer of that size."""
        n = self.padded[group]
        if self.b.param == 2:
            self.led.alloc("copy_in", 2 * n // self.N, "temp")
        self.led.alloc(f"ag.{group}", self.b.param * n, "fsdp")
        if self.u.device == "cpu":
            self.led.temp("gloo", self.b.param * n)
        if self.b.param == 2:  # freed once the collective has run
            self.led.free("copy_in")

    def copy_out(self, group: Any) -> None:
        """``foreach_all_gather_copy_out``: the unsharded parameters, views of one padded buffer each."""
        self.led.alloc(f"unsharded.{group}", self.b.param * self.padded[group], "fsdp")

    def reduce(self, group: Any, previous: Any) -> None:
        """``post_backward``: reshard, free the previous group's reduce-scatter input (the one buffer kept in
        flight), copy this group's gradients into a flat fp32 input (``reduce_dtype``), free them, and keep the
        1/N output: the sharded gradients. gloo's reduce-scatter copies through one flat buffer of the input."""
        n = self.padded[group]
        self.led.free(f"unsharded.{group}")
        if previous is not None:
            self.led.free(f"rs_in.{previous}")
        self.led.alloc(f"rs_in.{group}", 4 * n, "fsdp")
        self.led.free_prefix(f"grad.{group}.")
        self.led.alloc(f"rs_out.{group}", 4 * n // self.N, "grad")
        if self.u.device == "cpu":
            self.led.temp("gloo", 4 * n)

    # -------------------------------------------------------------------------------------------- forward
    def weight_cast(self, name: str, numel: int) -> None:
        """Autocast's bf16 copy of a dense layer's weight, saved for the backward pass."""
        if self.b.autocast:
            self.led.alloc(name, 2 * numel)

    def norm_out(self, name: str) -> None:
        """A LayerNorm output feeding a dense layer: under autocast, an fp32 output cast to bf16 (the copy is
        saved by the dense layer)."""
        if self.b.autocast:
            self.led.temp(name + ".fp32", 4 * self.a)
        self.led.alloc(name, self.b.act * self.a)

    def dropout(self, name: str, numel: int, nbytes: int | None = None) -> bool:
        """A dropout mask saved for the backward pass: on the CPU the noise tensor, in the dropped tensor's dtype
        (``nbytes``; ``_dropout`` in ATen's Dropout.cpp), on CUDA ``native_dropout``'s bool mask."""
        if self.u.dropout:
            self.led.alloc(name, numel * ((nbytes or self.b.act) if self.u.device == "cpu" else 1))
        return self.u.dropout

    def embed(self) -> None:
        """Patch projection (conv output, transient; counted as a), class token concatenated, position embedding
        added: the first block's input x0. The conv saves its input: a bf16 copy of the images under bf16."""
        B, (C, H, W) = self.u.batch, self.s.image
        if self.u.precision == "bf16":
            self.led.alloc("image.bf16", 2 * B * C * H * W)
        self.led.alloc("conv", self.b.act * self.a, "temp")
        self.led.alloc("cat", self.b.act * self.a, "temp")
        self.led.free("conv")
        self.led.alloc("x0", self.b.res * self.a)
        self.led.free("cat")
        if self.dropout("mask.pos", self.a, self.b.res):  # x0 becomes the dropout output, the sum is freed
            self.led.replace("x0", self.b.res * self.a)

    def block_saved(self, i: int) -> None:
        """The tensors autograd saves in block i (eq. 2-3), besides its input x_i (saved by LN1): LN1 statistics
        (2·B·T), LN1 output (a, the qkv input), the qkv output (3a: q, k and v are views of it, saved by
        ``_scaled_dot_product_flash_attention_for_cpu``, the kernel SDPA runs on the CPU in fp32 and bf16, and
        the flash kernel on CUDA), the attention output (a, saved by the kernel; the projection's input is a view
        of it) and its logsumexp (B·h·T, fp32), z' (a, LN2's input), LN2 statistics, LN2 output (a, fc1's input),
        fc1's output (m, GELU's input) and GELU's output (m, fc2's input). The projection's output is transient."""
        L, b, a, m, D, M = self.led, self.b, self.a, self.m, self.s.width, self.s.mlp_width
        p = f"b{i}."
        L.alloc(p + "stats1", 2 * self.bt * b.stats)
        self.norm_out(p + "y1")
        self.weight_cast(p + "w.qkv", 3 * D * D)
        L.alloc(p + "qkv", 3 * a * b.act)
        L.alloc(p + "out", a * b.act)
        L.alloc(p + "lse", 4 * self.u.batch * self.s.heads * self.s.tokens)
        self.weight_cast(p + "w.proj", D * D)
        L.alloc(p + "proj", a * b.act, "temp")
        self.dropout(p + "mask.proj", a)
        L.alloc(p + "z", a * b.res)
        L.free(p + "proj")
        L.alloc(p + "stats2", 2 * self.bt * b.stats)
        self.norm_out(p + "y2")
        self.weight_cast(p + "w.fc1", D * M)
        L.alloc(p + "h", m * b.act)
        L.alloc(p + "g", m * b.act)
        if self.dropout(p + "mask.fc1", m):  # fc2 saves the dropout output; GELU's output is freed
            L.replace(p + "g", m * b.act)
        self.weight_cast(p + "w.fc2", M * D)

    def block_forward(self, i: int) -> None:
        """Block i, keeping what the backward pass needs; the block's output x_{i+1} = z' + MLP(LN(z'))."""
        self.block_saved(i)
        self.led.alloc(f"b{i}.fc2", self.a * self.b.act, "temp")
        self.dropout(f"b{i}.mask.fc2", self.a)
        self.led.alloc(f"x{i + 1}", self.a * self.b.res)
        self.led.free(f"b{i}.fc2")

    def block_forward_checkpointed(self, i: int) -> None:
        """Block i under ``checkpoint(use_reentrant=False)``: nothing is saved, tensors die with the Python frames
        that hold them (the attention's at its return, the MLP's at its return, y2 and z' at the block's); the
        input x_i stays (the recomputation's argument) and so does x_{i+1}."""
        L, a, m, act = self.led, self.a, self.m, self.b.act
        p = f"b{i}."
        for name, n in (("y1", a), ("qkv", 3 * a), ("out", a), ("proj", a)):
            L.alloc(p + name, n * act)
        L.free(p + "y1", p + "qkv", p + "out")
        L.alloc(p + "z", a * self.b.res)
        L.free(p + "proj")
        for name, n in (("y2", a), ("h", m), ("g", m), ("fc2", a)):
            L.alloc(p + name, n * act)
        L.free(p + "h", p + "g")
        L.alloc(f"x{i + 1}", a * self.b.res)
        L.free(p + "fc2", p + "y2", p + "z")

    def recompute(self, i: int) -> None:
        """The checkpoint's recomputation at block i's backward: its saved tensors again, stopping once the last
        one is packed (``early_stop``): at fc2's inputs, or with dropout at the mask after fc2."""
        self.block_saved(i)
        if self.u.dropout:
            self.led.alloc(f"b{i}.fc2", self.a * self.b.act, "temp")
            self.dropout(f"b{i}.mask.fc2", self.a)
            self.led.free(f"b{i}.fc2")

    def head_forward(self) -> None:
        """Final LN (statistics, and its output, which the head's input, a view of the class token, keeps alive;
        under autocast the head saves a bf16 copy of the class token instead), head, log_softmax (saved)."""
        L, b, B, D, K = self.led, self.b, self.u.batch, self.s.width, self.s.num_classes
        L.alloc("stats.f", 2 * self.bt * b.stats)
        if b.autocast:
            L.temp("ln.f.fp32", 4 * self.a)
            L.alloc("ln.f", 2 * B * D)
            self.weight_cast("w.head", K * D)
        else:
            L.alloc("ln.f", b.act * self.a)
        L.alloc("logits", b.act * B * K, "temp")
        L.alloc("lsm", b.logits * B * K)
        L.free("logits")

    # ------------------------------------------------------------------------------------------- backward
    def grad(self, group: Any, name: str, numel: int, cast: bool = True) -> None:
        """A parameter's gradient: fp32 ``.grad`` (DDP, single), or the unsharded gradient FSDP reduce-scatters
        at the group's post-backward; under autocast a dense layer's bf16 gradient is cast up (transient)."""
        if self.b.autocast and cast:
            self.led.temp(f"grad.{group}.{name}.bf16", 2 * numel)
        self.led.alloc(f"grad.{group}.{name}", self.b.grad * numel, "grad")

    def head_backward(self) -> None:
        """log_softmax, head (its weight gradient), select (a zero tensor of the LN output's shape), final LN:
        the gradient of the residual stream (one a-sized tensor from here to the embedding)."""
        L, b, B, D, K = self.led, self.b, self.u.batch, self.s.width, self.s.num_classes
        L.alloc("g.logits", b.logits * B * K, "temp")
        L.free("lsm")
        self.grad("root", "head", K * D + K)
        L.alloc("g.pooled", b.act * B * D, "temp")
        L.free("g.logits", "ln.f", *(["w.head"] if b.autocast else []))
        L.alloc("g.zeros", b.act * self.a, "temp")
        L.free("g.pooled")
        L.alloc("g.res", b.res * self.a, "temp")
        self.grad("root", "norm", 2 * D, cast=False)
        L.free(f"x{self.s.depth}", "stats.f", "g.zeros")

    def mlp_backward(self, i: int) -> None:
        """fc2 (input gradient m, weight gradient; its saved input freed), GELU (input gradient m, its saved input
        freed), fc1, LN2; dropout masks are read and freed on the way. The block's peak is at GELU's backward:
        the saved tensors minus g, plus both m-sized gradients and fc2's weight gradient."""
        L, b, a, m, D, M = self.led, self.b, self.a, self.m, self.s.width, self.s.mlp_width
        p, g = f"b{i}.", f"b{i}.g."
        if self.u.dropout:
            L.alloc(g + "fc2", a * b.act, "temp")
            L.free(p + "mask.fc2")
        L.alloc(g + "g", m * b.act, "temp")
        self.grad(i, "fc2", D * M + D)
        L.free(p + "g", *([p + "w.fc2"] if b.autocast else []), *([g + "fc2"] if self.u.dropout else []))
        if self.u.dropout:
            L.replace(g + "g", m * b.act)
            L.free(p + "mask.fc1")
        L.alloc(g + "h", m * b.act, "temp")
        L.free(p + "h", g + "g")
        L.alloc(g + "y2", a * b.act, "temp")
        self.grad(i, "fc1", D * M + M)
        L.free(g + "h", p + "y2", *([p + "w.fc1"] if b.autocast else []))
        L.alloc(g + "ln2", a * b.res, "temp")
        self.grad(i, "norm2", 2 * D, cast=False)
        L.free(p + "z", p + "stats2", g + "y2", g + "ln2")  # LN2's gradient is summed into the residual one

    def attention_backward(self, i: int) -> None:
        """proj, the flash kernel's backward (dq, dk, dv: 3a; q, k, v, the output and logsumexp freed), unbind's
        stack (3a) and the reshape of the permuted stack back to (B, T, 3D) (3a, a copy), qkv, LN1."""
        L, b, a, D = self.led, self.b, self.a, self.s.width
        p, g = f"b{i}.", f"b{i}.g."
        if self.u.dropout:
            L.alloc(g + "proj", a * b.act, "temp")
            L.free(p + "mask.proj")
        L.alloc(g + "out", a * b.act, "temp")
        self.grad(i, "proj", D * D + D)
        L.free(*([g + "proj"] if self.u.dropout else []))
        L.alloc(g + "dqkv", 3 * a * b.act, "temp")
        L.free(p + "qkv", p + "out", p + "lse", g + "out", *([p + "w.proj"] if b.autocast else []))
        L.alloc(g + "stack", 3 * a * b.act, "temp")
        L.free(g + "dqkv")
        L.alloc(g + "qkv", 3 * a * b.act, "temp")
        L.free(g + "stack")
        L.alloc(g + "y1", a * b.act, "temp")
        self.grad(i, "qkv", 3 * D * D + 3 * D)
        L.free(g + "qkv", p + "y1", *([p + "w.qkv"] if b.autocast else []))
        L.alloc(g + "ln1", a * b.res, "temp")
        self.grad(i, "norm1", 2 * D, cast=False)
        L.free(f"x{i}", p + "stats1", g + "y1", g + "ln1")

    def embed_backward(self) -> None:
        """The position table, class token and patch projection's gradients; the residual gradient and the images
        the conv saved are freed."""
        root = sum(map(_numel, self.s.root_params)) - self.s.num_classes * (self.s.width + 1) - 2 * self.s.width
        self.grad("root", "embed", root)
        self.led.free("g.res", *(["mask.pos"] if self.u.dropout else []),
                      *(["image.bf16"] if self.u.precision == "bf16" else []))

    # ---------------------------------------------------------------------------------------------- phases
    def forward(self) -> None:
        fsdp, L = self.u.fsdp, self.led
        L.phase = "forward"
        if fsdp:  # the root keeps its parameters unsharded through the step (reshard_after_forward=False)
            self.gather("root")
            self.copy_out("root")
        self.embed()
        for i in range(self.s.depth):
            if fsdp:  # the previous all-gather output is freed after this copy-out (implicit prefetch)
                self.gather(i)
                self.copy_out(i)
                L.free(f"ag.{i - 1 if i else 'root'}")
            if self.u.strategy == "fsdp_ac":
                self.block_forward_checkpointed(i)
            else:
                self.block_forward(i)
            if fsdp:
                L.free(f"unsharded.{i}")
        self.head_forward()
        if fsdp:
            L.free(f"ag.{self.s.depth - 1}")

    def backward(self) -> None:
        fsdp, L, depth = self.u.fsdp, self.led, self.s.depth
        L.phase = "backward (head)"
        if fsdp:  # the root's pre-backward prefetches the last block
            self.gather(depth - 1)
        self.head_backward()
        for i in reversed(range(depth)):
            L.phase = f"backward (block {i})"
            if fsdp:  # copy out block i, then prefetch block i - 1
                self.copy_out(i)
                L.free(f"ag.{i}")
                if i:
                    self.gather(i - 1)
            if self.u.strategy == "fsdp_ac":
                self.recompute(i)
            self.mlp_backward(i)
            self.attention_backward(i)
            if fsdp:
                self.reduce(i, i + 1 if i + 1 < depth else None)
        L.phase = "backward (embedding)"
        self.embed_backward()
        if fsdp:
            self.reduce("root", 0)
            L.free("rs_in.root")

    def optimizer_step(self) -> None:
        """AdamW with ``foreach=True`` (vitkit's trainer): ``_foreach_sqrt(exp_avg_sq)`` makes one temporary the
        size of the parameter group (this rank's shards under FSDP); everything else is in place."""
        self.led.phase = "optimizer step"
        local = sum(self.padded.values()) // self.N if self.u.fsdp else self.s.params
        self.led.temp("adam.sqrt", 4 * local)


def step_memory(shape: EncoderShape, setup: StepSetup) -> StepMemory:
    """Per-rank memory of one training step: forward, cross-entropy, backward, AdamW step (``zero_grad(set_to_none)``
    before it, so gradients are made during the backward pass).

    Terms, in elements (a = B·T·D, m = B·T·M; bytes per element from the precision, ``_Bytes``):
      held: parameters P, AdamW moments 2P (fp32; P/N each under FSDP), DDP's bucket P, the batch.
      per block, saved for backward: x_i a, LN1 stats 2BT, LN1 out a, qkv 3a, attention out a, logsumexp BhT,
        z' a, LN2 stats 2BT, LN2 out a, fc1 out m, GELU out m: 8a + 2m + (4 + h)BT (16a + (4 + h)BT for M = 4D);
        under autocast also the bf16 weights; with dropout the masks 2a + m. With checkpointing only x_i is kept,
        and block i's tensors are recomputed at its backward.
      head: final LN out a and stats, log_softmax B·K; backward: the residual gradient a, and at GELU's backward
        (each block's peak) both m-sized gradients.
      gradients: P (fp32 ``.grad``, made block by block); FSDP: the block's unsharded gradients, then 1/N kept.
      FSDP: the root's unsharded parameters all step; per block the all-gather output, the unsharded copy, the
        prefetched next block in backward, one reduce-scatter input in flight; gloo's flat copies on the CPU.
      optimizer: one temporary of the (local) parameter size.
    """
    step = _Step(shape, setup)
    step.held()
    held = step.led.level
    step.forward()
    activations = step.led.bytes_of("act")
    step.backward()
    step.optimizer_step()
    return StepMemory(held, activations, step.led.peak, step.led.where)


def block_activations(shape: EncoderShape, setup: StepSetup) -> int:
    """Bytes autograd keeps for one block's backward pass, its input included (``_Step.block_forward``'s saved
    tensors without its output): 8a + 2m + (4 + h)·B·T elements in fp32 without dropout."""
    step = _Step(shape, setup)
    step.led.alloc("x0", step.a * step.b.res)
    step.block_forward(0)
    step.led.free("x1")
    return step.led.bytes_of("act")


def largest_fitting(shapes: Mapping[str, EncoderShape], capacity: float, setup: StepSetup,
                    usable: float = 0.9) -> str | None:
    """The name of the largest shape (by parameters) whose per-rank peak fits in ``usable`` x ``capacity`` bytes
    (the rest is left to the CUDA context and the caching allocator's fragmentation); None if none fits."""
    fits = [(s.params, name) for name, s in shapes.items() if step_memory(s, setup).peak <= usable * capacity]
    return max(fits)[1] if fits else None


def memory_table(shapes: Mapping[str, EncoderShape], batch: int, world: int,
                 capacities_gb: Sequence[int] = (24, 40, 80)) -> list[str]:
    """Markdown: per-rank peak GiB of each shape under DDP, FSDP and FSDP + checkpointing at fp32 and bf16-mixed
    (CUDA, ``world`` ranks, ``batch`` per rank), then the largest shape that fits 90% of each capacity (GiB; "or
    larger" when it is the largest listed)."""
    cols = [(st, pr) for st in ("ddp", "fsdp", "fsdp_ac") for pr in PRECISIONS]
    head = " | ".join(f"{st} {pr}" for st, pr in cols)
    lines = [f"| model | params (M) | {head} |", "|---" * (len(cols) + 2) + "|"]
    for name, shape in shapes.items():
        peaks = [step_memory(shape, StepSetup(batch, st, pr, world)).peak / GIB for st, pr in cols]
        lines.append(f"| {name} | {shape.params / 1e6:.1f} | " + " | ".join(f"{p:.1f}" for p in peaks) + " |")
    lines += ["", f"| fits per rank ({world} ranks, batch {batch}) | " + head + " |", "|---" * (len(cols) + 1) + "|"]
    largest = max(shapes, key=lambda n: shapes[n].params)
    for gb in capacities_gb:
        best = [largest_fitting(shapes, gb * GIB, StepSetup(batch, st, pr, world)) or "none" for st, pr in cols]
        lines.append(f"| {gb} GB | " + " | ".join(b + (" or larger" if b == largest else "") for b in best) + " |")
    return lines


# ------------------------------------------------------------------------------------------- measurement
def count_cpu_allocations() -> None:
    """Make c10's CPU allocator count the bytes of every live tensor of every thread (c10/core/CPUAllocator.cpp,
    ``ProfiledCPUMemoryReporter``): without the flag it counts only while a profiler runs in the allocating thread, so
    frees in gloo's threads are lost. Set it before anything is allocated: the count starts at zero here."""
    import torch
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    names = [n for n in os.listdir(folder) if n.startswith("libc10.")]
    if not names:
        raise RuntimeError(f"no libc10 in {folder}: cannot count the allocator's live bytes")
    flag = ctypes.c_bool.in_dll(ctypes.CDLL(os.path.join(folder, names[0])), "FLAGS_caffe2_report_cpu_memory_usage")
    flag.value = True


def allocator_peak(step: Callable[[], None]) -> tuple[int, int]:
    """(live bytes before ``step``, highest live bytes during it), from the count ``count_cpu_allocations`` keeps,
    which ``torch.profiler`` stamps on every allocation it records ("Total Allocated")."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"
                      and e["args"].get("Device Type") == 0]
    if not events:
        raise RuntimeError("the profiler recorded no CPU allocation in the step")
    events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    first = events[0]["args"]
    return first["Total Allocated"] - first["Bytes"], max(e["args"]["Total Allocated"] for e in events)


def _wrap(model: Any, strategy: str, precision: str) -> Any:
    """DDP, or FSDP2 ``fully_shard`` per block of ``named_blocks()`` then the root (bf16: MixedPrecisionPolicy with
    fp32 reduction); ``fsdp_ac`` checkpoints every block first."""
    import torch
    if strategy == "fsdp_ac":
        model.set_grad_checkpointing(True)
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if strategy in ("fsdp", "fsdp_ac"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
        for _, block in model.named_blocks():
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def measure_in_process(name: str, overrides: Mapping[str, Any], strategy: str, precision: str, batch: int,
                       repeats: int = 1, warmup: int = 2) -> dict[str, Any]:
    """One rank's numbers for one strategy: build, wrap, ``warmup`` steps (AdamW's state, DDP's rebuilt buckets),
    a step measured by the resident set, ``repeats`` steps measured by the allocator (the profiler's own memory stays
    out of the first): the lowest peak (``peak``; gloo's worker threads drop their references to a collective's
    tensors when they get to it, in some steps after the next allocation) and the highest (``peak_max``). Bytes; the
    model and optimizer die with the call."""
    import torch
    import torch.nn.functional as F

    import vitkit
    from vitkit.bench.runner import peak_memory_mb
    gc.collect()  # an earlier strategy's FSDP state holds reference cycles (its post-forward order)
    model = vitkit.create_model(name, **overrides).train()
    wrapped = _wrap(model, strategy, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.data_cfg.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    autocast = precision == "bf16" and strategy in ("single", "ddp")

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    rss = peak_memory_mb(step, "cpu")
    counts = [allocator_peak(step) for _ in range(repeats)]
    held, peak = min(counts, key=lambda c: c[1])
    return {"strategy": strategy, "precision": precision, "batch": batch, "held": held, "peak": peak,
            "peak_max": max(c[1] for c in counts), "rss_step": None if rss is None else int(rss * 2 ** 20)}


def _worker(args: argparse.Namespace) -> int:
    """One ``torchrun`` process (or a lone one): every strategy in turn; rank 0 writes every rank's numbers."""
    count_cpu_allocations()
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    rows = []
    for strategy in args.strategies.split(","):
        row = measure_in_process(args.model, overrides, strategy, args.precision, args.batch_size, args.repeats)
        ranks = [None] * world
        if world > 1:
            dist.all_gather_object(ranks, row)
        else:
            ranks = [row]
        rows.append({**row, "world": world, "ranks": ranks})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    if world > 1:
        dist.destroy_process_group()
    return 0


@dataclass(frozen=True)
class Measurement:
    """Measured (largest over the ranks) and modelled per-rank bytes of one strategy."""

    strategy: str
    precision: str
    batch: int
    world: int
    held: int  # live tensor bytes before the step (allocator)
    peak: int  # highest live tensor bytes during the step (allocator; the lowest such peak of the repeats)
    peak_max: int  # the highest peak of the repeats
    rss_step: int | None  # resident-set growth during the step (VmHWM - VmRSS before)
    model: StepMemory = field(repr=False)

    @property
    def error(self) -> float:
        """(modelled - measured) / measured peak."""
        return self.model.peak / self.peak - 1


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _meta_model(name: str, overrides: Mapping[str, Any]) -> tuple[EncoderShape, bool]:
    """The shape of a registered model with ``overrides``, and whether it drops out, built on the meta device."""
    import torch

    import vitkit
    with torch.device("meta"):
        model = vitkit.create_model(name, **overrides)
    return EncoderShape.of_model(model), block_dropout(model)


def _run_watched(cmd: list[str], env: dict[str, str], floor: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill that group if the machine's available memory falls below
    ``floor`` bytes."""
    import signal
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        while proc.poll() is None:
            if _available_bytes() < floor:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise MemoryError(f"stopped the measurement: less than {floor / GIB:.1f} GiB of memory was left")
            time.sleep(0.2)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, "", err.read())


def measure(name: str, strategies: Sequence[str], batch: int, nproc: int = 2, precision: str = "fp32",
            overrides: Mapping[str, Any] | None = None, threads: int = 1, limit_gib: float = 20.0,
            repeats: int = 1) -> list[Measurement]:
    """Measure one step of the registered model ``name`` (with architecture ``overrides``) under each strategy in
    ``nproc`` fresh gloo processes (``torchrun --standalone``; one plain process for ``nproc=1``), ``batch`` images
    per process, and model it. Refused before starting when the model predicts more than ``limit_gib`` for all
    processes together (or more than is available); stopped if less than 1 GiB is left while it runs."""
    overrides = dict(overrides or {})
    for s in strategies:
        StepSetup(batch, s, precision, nproc, "cpu")  # validates the names
        if s != "single" and nproc < 2:
            raise ValueError(f"--memory {s} needs --nproc 2 or more")
    shape, dropout = _meta_model(name, overrides)
    models = {s: step_memory(shape, StepSetup(batch, s, precision, nproc, "cpu", dropout)) for s in strategies}
    creation = 4 * shape.params  # every rank builds the whole fp32 model before FSDP shards it
    need = nproc * (max(creation, *(m.peak for m in models.values())) + GIB // 2)  # + interpreter and libraries
    allowed = min(limit_gib * GIB, 0.9 * _available_bytes())
    if need > allowed:
        raise ValueError(f"measuring {name} at batch {batch} would need about {need / GIB:.1f} GiB for {nproc} "
                         f"processes, more than the {allowed / GIB:.1f} GiB allowed (--memory-limit, or what is "
                         f"free); choose a smaller batch, fsdp, or fewer processes")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        worker = ["-m", "vitkit.bench.memory", "worker", name, "--strategies", ",".join(strategies), "--batch-size",
                  str(batch), "--precision", precision, "--overrides", json.dumps(overrides), "--threads",
                  str(threads), "--repeats", str(repeats), "--out", out]
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
        done = _run_watched([sys.executable, *launch, *worker], env, floor=GIB)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip() and "USDT" not in line]
            raise RuntimeError(f"the measurement failed: {lines[-1] if lines else 'exit ' + str(done.returncode)}")
        with open(out) as f:
            rows = json.load(f)
    return [_measurement(row, models[row["strategy"]]) for row in rows]


def _measurement(row: dict[str, Any], model: StepMemory) -> Measurement:
    ranks = row["ranks"]
    rss = [r["rss_step"] for r in ranks if r["rss_step"] is not None]
    return Measurement(row["strategy"], row["precision"], row["batch"], row["world"],
                       held=max(r["held"] for r in ranks), peak=max(r["peak"] for r in ranks),
                       peak_max=max(r["peak_max"] for r in ranks),
                       rss_step=max(rss) if rss else None, model=model)


def measurement_lines(rows: Sequence[Measurement]) -> list[str]:
    """A table in MiB: held and peak, modelled against measured (allocator), and what the step adds by the model,
    the allocator and the resident set."""
    header = ("strategy", "held: model", "measured", "peak: model", "measured", "error", "step adds: model",
              "allocator", "RSS", "model's peak during")
    out = [header]
    for r in rows:
        rss = "-" if r.rss_step is None else f"{r.rss_step / 2 ** 20:,.1f}"
        out.append((f"{r.strategy} {r.precision}", *(f"{v / 2 ** 20:,.1f}" for v in (r.model.held, r.held,
                    r.model.peak, r.peak)), f"{100 * r.error:+.1f}%",
                    *(f"{v / 2 ** 20:,.1f}" for v in (r.model.peak - r.model.held, r.peak - r.held)), rss,
                    r.model.where))
    widths = [max(len(line[i]) for line in out) for i in range(len(header))]
    return ["  ".join(v.ljust(w) if i in (0, len(header) - 1) else v.rjust(w) for i, (v, w) in
                      enumerate(zip(line, widths))) for line in out]


# ------------------------------------------------------------------------------------------------------ CLI
def _parse_model(text: str) -> tuple[str, str, dict[str, Any]]:
    """``LABEL=NAME:key=value,key=value`` (label and overrides optional) → (label, name, overrides)."""
    from vitkit.config import parse_scalar
    label, sep, rest = text.partition("=")
    if not sep or ":" in label:
        label, rest = "", text
    name, _, spec = rest.partition(":")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{text}: overrides are key=value, got {item!r}")
        overrides[key] = parse_scalar(value)
    return label or name, name, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkit.bench.memory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="modelled per-rank peaks (CUDA) and the largest model that fits")
    table.add_argument("models", nargs="+", metavar="[LABEL=]NAME[:key=value,...]")
    table.add_argument("--batch-size", type=int, default=32, help="images per rank")
    table.add_argument("--world", type=int, default=8, help="ranks (FSDP shards over them)")
    meas = sub.add_parser("measure", help="measure on this CPU (gloo) and compare with the model")
    meas.add_argument("model", metavar="NAME[:key=value,...]")
    meas.add_argument("--strategies", default="ddp,fsdp,fsdp_ac")
    meas.add_argument("--batch-size", type=int, default=4, help="images per process")
    meas.add_argument("--nproc", type=int, default=2)
    meas.add_argument("--precision", choices=PRECISIONS, default="fp32")
    meas.add_argument("--memory-limit", type=float, default=20.0, help="GiB for all processes together")
    meas.add_argument("--repeats", type=int, default=1, help="steps measured by the allocator (lowest peak shown)")
    meas.add_argument("--json", metavar="OUT", help="also write the rows (bytes) to this JSON file")
    work = sub.add_parser("worker", help=argparse.SUPPRESS)
    work.add_argument("model")
    for flag, kind in (("--strategies", str), ("--batch-size", int), ("--precision", str), ("--overrides", str),
                       ("--threads", int), ("--repeats", int), ("--out", str)):
        work.add_argument(flag, type=kind, required=True)
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    if args.command == "table":
        shapes = {label: _meta_model(name, over)[0] for label, name, over in map(_parse_model, args.models)}
        print("\n".join(memory_table(shapes, args.batch_size, args.world)))
        return 0
    _, name, overrides = _parse_model(args.model)
    rows = measure(name, args.strategies.split(","), args.batch_size, args.nproc, args.precision, overrides,
                   limit_gib=args.memory_limit, repeats=args.repeats)
    print("\n".join(measurement_lines(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "error": r.error} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
