"""``torchrun --nproc_per_node=2 tests/fsdp_record.py OUT.json [--compile | --inductor] [--steps=N] NAME...``: shard a
tiny model of each registered variant NAME with ``vitkit.train.fsdp.shard`` (activation checkpointing on; with
``--compile`` each block compiled first, ``compile_blocks``, by the "aot_eager" backend: dynamo's graphs and AOT
autograd without inductor's slow C++ build; with ``--inductor`` by torch.compile's default backend, inductor, whose
generated C++ the system compiler builds) and record, on rank 0, how ``N`` (default 1) AdamW steps with gradient
clipping on this process's half of a batch compare with the same steps on the whole batch in one process (an
unsharded eager copy stepped here): max |Δ| of the gathered weights, both clipping norms of the last step, the number
of FSDP units, of captured graphs and of graphs inductor compiled, and whether every process holds the same buffers
after a training-mode step and ``sync_buffers``.

The compared step runs in eval mode (BatchNorm on its running statistics), so it does not depend on how the batch is
split; the training-mode step then exercises BatchNorm's statistics and the recomputed (checkpointed) blocks."""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

import vitkit
from vitkit.train import fsdp

BATCH, CLIP = 4, 0.05  # the clip is below every model's gradient norm here: it always scales


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def record(name: str, rank: int, world: int, compiled: bool, steps: int = 1) -> dict:
    torch.manual_seed(0)
    model = vitkit.create_model(name, **vitkit.get_spec(name).tiny, num_classes=10)
    model.set_grad_checkpointing(True)
    reference = copy.deepcopy(model)
    if compiled:  # each model starts with dynamo's caches empty (its recompile limit counts per process)
        torch._dynamo.reset()
        fsdp.compile_blocks(model)
    graphs, inductor = _graphs(), _inductor_graphs()
    blocks = fsdp.shard(model, fsdp.mixed_precision(None))
    size = model.cfg.img_size
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 3, size, size, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, foreach=True)
    for _ in range(steps):
        norm = step(model.eval(), x[half], y[half], opt)
        ref_norm = step(reference.eval(), x, y, ref_opt)
    full, ref = fsdp.full_state_dict(model), reference.state_dict()
    delta = max((full[k] - ref[k]).abs().max().item() for k in ref) if rank == 0 else None
    step(model.train(), x[half], y[half], opt)  # BatchNorm statistics of this half
    fsdp.sync_buffers(model)
    same = all(_same_everywhere(b, world) for b in model.buffers())
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    return {"blocks": blocks, "units": units, "max_delta": delta, "norm": norm, "ref_norm": ref_norm,
            "buffers_agree": same, "num_buffers": len(list(model.buffers())),
            "graphs": _graphs() - graphs, "inductor_graphs": _inductor_graphs() - inductor}


def _graphs() -> int:
    """Graphs dynamo has captured so far in this process (0 when it was never imported)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return dynamo.counters["stats"]["unique_graphs"] if dynamo is not None else 0


def _inductor_graphs() -> int:
    """Graphs inductor has compiled (or taken from its FX graph cache) so far in this process."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return 0
    return sum(dynamo.counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss", "bypass"))


def _same_everywhere(t: torch.Tensor, world: int) -> bool:
    copies = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(copies, t.contiguous())
    return all(torch.equal(c, copies[0]) for c in copies)


def aot_eager_compile() -> None:
    """``torch.compile`` (which ``nn.Module.compile`` calls) with the "aot_eager" backend. Not dynamo's "eager" (as
    conftest's fixture): without AOT autograd it fails to replay a checkpointed block whose BatchNorm counts batches
    in place, which inductor does replay."""
    real = torch.compile
    torch.compile = lambda model, **kw: real(model, backend="aot_eager")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    compiled = "--compile" in sys.argv or "--inductor" in sys.argv
    if "--compile" in sys.argv:
        aot_eager_compile()
    steps = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--steps=")), 1))
    names = [a for a in sys.argv[2:] if not a.startswith("--")]
    results = {name: record(name, rank, world, compiled, steps) for name in names}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
