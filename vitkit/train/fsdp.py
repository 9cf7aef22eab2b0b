"""Fully sharded data parallelism (``train.strategy: fsdp``) and its sharded train state.

Sharding follows FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP", §3 units): each
block the family contract lists (``FamilyModel.named_blocks``) becomes one unit whose parameters are all-gathered
for its forward and backward and whose gradients are reduce-scattered, then the root takes what is left (embeddings,
final norm, heads), as torchtitan wraps a transformer. Every parameter is a ``DTensor`` sharded on dim 0 over the
processes; the optimizer is built on those, so it holds only this process's shard of its state, and the clipping
norm of ``clip_grad_norm_`` over DTensor gradients is the global one. With bf16 (fp16) the units compute in bf16
(fp16) and reduce gradients in fp32 (``MixedPrecisionPolicy``); the sharded parameters and optimizer state stay fp32.
fp16's loss scaler (``torch.amp.GradScaler``) skips the same steps on every process: unscaling DTensor gradients
max-reduces its overflow flag over the mesh (torch/distributed/tensor/_dispatch.py ``found_inf_reduce_handler``), so
an overflow in one process's shard skips the step everywhere.

The EMA weights are sharded as the model is (the same units, so the same local slices), and updated shard by shard.
What runs on one process (evaluation, ``model.safetensors``) reads ``FullCopy``: rank 0's unsharded copy, filled by
a gather that every process joins.

The train state (model, optimizer, EMA) is written with ``torch.distributed.checkpoint`` (DCP): each process writes
its shards, rank 0 the metadata, and a load reshards to the processes reading it: a checkpoint of 2 processes
resumes on 1 (DCP without a process group) or on 4.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import state_dict as dcp_state
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vitkit.families.contract import FamilyModel

__all__ = ["FullCopy", "compile_blocks", "full_state_dict", "load_train_state", "mixed_precision", "save_train_state",
           "shard", "sync_buffers"]


def mixed_precision(amp: torch.dtype | None) -> MixedPrecisionPolicy:
    """Compute in the run's bf16 or fp16 with fp32 gradient reduction (torchtitan's default policy, bf16); fp32
    throughout otherwise. fp16 gradients reach the optimizer as the fp32 shards of the parameters, loss-scaled."""
    if amp in (torch.bfloat16, torch.float16):
        return MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: FamilyModel, policy: MixedPrecisionPolicy) -> int:
    """``fully_shard`` every block of ``model.named_blocks()`` in forward order, then the root; returns the number
    of blocks. Blocks first: a unit owns the parameters no inner unit took."""
    blocks = model.named_blocks()
    for _, block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return len(blocks)


def compile_blocks(model: FamilyModel) -> int:
    """``torch.compile`` each block in place (``nn.Module.compile``), before sharding, as torchtitan compiles each
    transformer block; the state-dict keys do not change. Returns the number of blocks."""
    blocks = model.named_blocks()
    for _, block in blocks:
        block.compile()
    return len(blocks)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers, as DDP's ``broadcast_buffers`` does: FSDP leaves buffers whole and
    unsynchronised, and BatchNorm's running statistics follow each process's own micro-batches. Called at step
    boundaries, so the train state, whichever process DCP takes a replicated tensor from, is rank 0's."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on rank 0's CPU (``full_state_dict`` + ``cpu_offload``), empty on the other ranks;
    every process must call it."""
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dcp_state.get_model_state_dict(module, options=options)


class FullCopy:
    """Rank 0's unsharded copy of a sharded model (made before sharding) for what one process does alone:
    evaluation and ``save_pretrained``. ``fill`` gathers the weights of a sharded module into it."""

    def __init__(self, model: nn.Module, is_main: bool):
        self.module = copy.deepcopy(model).eval() if is_main else None
        self._holds: Any = None  # what the copy holds, so an unchanged source is not gathered twice

    def fill(self, source: nn.Module, key: Any) -> nn.Module | None:
        """Load ``source``'s weights (``key`` names them, e.g. (which, step)); a collective: every process calls it
        with the same key. Returns the copy on rank 0, None elsewhere."""
        if key != self._holds:
            state = full_state_dict(source)
            if self.module is not None:
                self.module.load_state_dict(state, strict=True)
            self._holds = key
        return self.module


# --------------------------------------------------------------------------------------------- train state
def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> dict[str, Any]:
    """Model, optimizer and EMA state keyed by parameter name (DTensors when sharded): DCP's unit of resharding."""
    state = {"model": dcp_state.get_model_state_dict(model),
             "optimizer": dcp_state.get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = dcp_state.get_model_state_dict(ema)
    return state


def _single_process() -> bool:
    """DCP without a process group (one process, or a run that never started one)."""
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _dcp_call() -> Iterator[bool]:
    """Yields DCP's ``no_dist``; a single process is this run's intent, so DCP's warning that it assumes so is
    silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield _single_process()


def _cause(error: BaseException) -> str:
    """The first line of what went wrong: a ``CheckpointException`` wraps each process's exception."""
    if isinstance(error, dcp.CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def save_train_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: nn.Module | None) -> None:
    """Every process writes its shards of model, optimizer and EMA into ``folder`` (DCP; rank 0 adds
    ``.metadata`` once all have written)."""
    with _dcp_call() as no_dist:
        dcp.save(_state(model, optimizer, ema), checkpoint_id=os.fspath(folder), no_dist=no_dist)


def load_train_state(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: nn.Module | None) -> None:
    """Load a ``save_train_state`` folder written by any number of processes into this run's (sharded or plain)
    model, optimizer and EMA; a missing or unreadable folder, or one of another model, is a one-line ValueError."""
    state = _state(model, optimizer, ema)  # the shapes and shards to read into
    try:
        with _dcp_call() as no_dist:
            dcp.load(state, checkpoint_id=os.fspath(folder), no_dist=no_dist)
    except (dcp.CheckpointException, FileNotFoundError, RuntimeError, KeyError) as e:
        raise ValueError(f"{folder}: the sharded train state cannot be read ({_cause(e)}); restore it or start a "
                         f"new run") from None
    dcp_state.set_model_state_dict(model, state["model"])
    dcp_state.set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if ema is not None:
        dcp_state.set_model_state_dict(ema, state["ema"])
