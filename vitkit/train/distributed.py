"""Processes, devices and the resumable data order.

``torchrun --nproc_per_node=N -m vitkit train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (also across nodes, through its rendezvous); ``init_distributed`` reads them and starts a process
group (gloo on CPU, NCCL on CUDA). Without them the run is a single process and nothing here talks to a network.

Data order (``StepBatchSampler``): each epoch is one permutation of the training set drawn from ``(seed, epoch)``;
optimiser step ``s`` of the epoch takes the ``batch_size`` indices ``perm[s*B:(s+1)*B]``, its accumulation micro-step
``j`` the ``j``-th equal chunk of those, and process ``r`` the ``r``-th equal slice of that chunk. The incomplete tail
of an epoch is dropped. So the global batch of a step is the same whatever the number of processes, and the order
depends only on ``(seed, epoch, step)``: a resumed run starts at ``(epoch, step_in_epoch)`` with nothing else to
restore. Items are keyed ``(index, epoch)`` so each sample's augmentation is seeded by its index and epoch, not by a
worker (``vitkit.data.TransformDataset``).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from vitkit.data.rng import stream_seed  # the run's counter-based seeds (re-exported: the trainer's name for them)

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "resolve_device", "StepBatchSampler",
           "stream_seed", "all_reduce_sum", "barrier", "broadcast_float"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this process's local GPU) if available, else MPS, else CPU; a device this build or machine
    lacks is a ValueError naming ``train.device`` (``vitkit.hardware.parse_device``)."""
    from vitkit.hardware import parse_device
    device = parse_device(name, what="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (or run alone), and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    device = resolve_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        log.info("process %d of %d (%s, %s)", info.rank, info.world_size, backend, device)
        if not info.is_main:  # rank 0 reports; the others only warn (they are processes of this run alone)
            logging.getLogger("vitkit").setLevel(logging.WARNING)
    return info, device


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class StepBatchSampler:
    """This process's micro-batches of ``(index, epoch)`` keys, one epoch at a time, resumable at any step."""

    def __init__(self, num_items: int, batch_size: int, accum_steps: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        self.micro = batch_size // accum_steps // world_size  # items per process per micro-step
        if self.micro * accum_steps * world_size != batch_size:
            raise ValueError(f"train.batch_size {batch_size} is not divisible by accum_steps {accum_steps} x "
                             f"{world_size} processes")
        if num_items < batch_size:
            raise ValueError(f"the training split has {num_items} items, fewer than one batch ({batch_size})")
        self.num_items, self.batch_size, self.accum_steps = num_items, batch_size, accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields ``epoch`` from optimiser step ``start_step`` on."""
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stream_seed(self.seed, "order", epoch))
        return torch.randperm(self.num_items, generator=g)  # (N,)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, epoch = self.permutation(self.epoch), self.epoch
        for step in range(self.start_step, self.steps_per_epoch):
            batch = perm[step * self.batch_size:(step + 1) * self.batch_size]  # (B,)
            for chunk in batch.view(self.accum_steps, self.world_size, self.micro):  # (world, micro) per micro-step
                yield [(int(i), epoch) for i in chunk[self.rank]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps


# ---------------------------------------------------------------------------------------------- collectives
def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_float(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (for decisions that must agree, such as a time-budget plan)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())
