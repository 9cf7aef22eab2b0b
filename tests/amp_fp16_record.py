"""``torchrun --nproc_per_node=2 tests/amp_fp16_record.py RECIPE.yaml RUN_DIR RECORD_DIR``: train RECIPE (fsdp, fp16)
into RUN_DIR with an overflow on the last process alone at step ``OVERFLOW_STEP``: one element of that process's
shard of the first gradient is set to inf after the reduce-scatter, before the loss scaler unscales it. Each process
writes ``RECORD_DIR/rank<r>.json``: per optimiser step, whether its local gradients were finite, whether its
parameter shards and optimizer step counts moved, and the loss scale after the step (``step_recorder``, also used in
one process by tests/test_amp_fp16.py). Rank 0 logs at INFO (the run's precision and sharding lines).

Before training, each process also records (``bn``) whether a sharded tiny CvT with activation checkpointing keeps
the BatchNorm statistics and the loss of a twin without it, after one training step on its half of a batch."""
from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

OVERFLOW_STEP = 2  # 0-based optimiser step whose gradient overflows (on the last process only)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def step_recorder(records: list[dict[str, Any]], overflow_step: int | None = OVERFLOW_STEP):
    """A replacement of ``Trainer._optimizer_step`` that steps as the trainer does and appends what happened to
    ``records``; on the last process at ``overflow_step`` (None: never) it first sets one element of the first
    non-empty local gradient shard to inf."""
    from vitkit.train.loop import Trainer
    real = Trainer._optimizer_step

    def optimizer_step(self, step: int) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if step == overflow_step and self.info.rank == self.info.world_size - 1:
            grad = next(_local(p.grad) for p in params if _local(p.grad).numel())
            grad.view(-1)[0] = float("inf")
        finite = all(bool(torch.isfinite(_local(p.grad)).all()) for p in params)
        before = [_local(p).detach().clone() for p in params]
        real(self, step)
        records.append({"step": step, "finite": finite, "scale": self.scaler.get_scale(),
                        "changed": any(not torch.equal(b, _local(p)) for b, p in zip(before, params)),
                        "optimizer_steps": _optimizer_steps(self.optimizer)})

    return optimizer_step


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> float:
    """The largest step count in the optimizer's state (AdamW's ``step``; 0 before its first step)."""
    return max((float(s["step"]) for s in optimizer.state.values() if "step" in s), default=0.0)


def batchnorm_record(rank: int, world: int) -> dict[str, Any]:
    """One training step of a sharded tiny CvT (BatchNorm in its blocks) with and without activation checkpointing,
    on this process's half of a batch: are the BatchNorm buffers and the loss the same?"""
    import vitkit
    from vitkit.train import fsdp
    torch.manual_seed(0)
    plain = vitkit.create_model("cvt_13", **vitkit.get_spec("cvt_13").tiny, num_classes=10)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    size = plain.cfg.img_size
    x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)
    half = slice(rank * 4 // world, (rank + 1) * 4 // world)
    losses = []
    for model in (plain, checkpointed):
        fsdp.shard(model, fsdp.mixed_precision(None))
        torch.manual_seed(2)  # the same drop-path masks (a checkpointed block replays them when recomputed)
        loss = F.cross_entropy(model.train()(x[half]), y[half])
        loss.backward()
        losses.append(loss.item())
    a, b = dict(plain.named_buffers()), dict(checkpointed.named_buffers())
    counts = {int(v) for k, v in b.items() if k.endswith("num_batches_tracked")}
    return {"same_buffers": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            "counts": sorted(counts), "same_loss": losses[0] == losses[1]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # train() joins this group and destroys it at the end
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    recipe, run_dir, record_dir = yaml.safe_load(Path(sys.argv[1]).read_text()), sys.argv[2], Path(sys.argv[3])
    result: dict[str, Any] = {"bn": batchnorm_record(rank, world), "steps": []}
    from vitkit.train import train
    from vitkit.train.loop import Trainer
    Trainer._optimizer_step = step_recorder(result["steps"])
    train(recipe, run_dir)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
