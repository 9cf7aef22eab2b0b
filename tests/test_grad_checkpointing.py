"""Activation checkpointing (``set_grad_checkpointing``) of BatchNorm families: a checkpointed block is run again in
training mode during the backward pass, and that recomputation must not move the BatchNorm running statistics a
second time (``vitkit.families.backbone._batch_statistics_only``). The reference is the same model without
checkpointing: two training steps must leave the same running statistics and batch counts, the same losses and
the same gradients. (Sharded blocks under FSDP: tests/amp_fp16_record.py, run by tests/test_amp_fp16.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from torch import nn

import vitkit

BATCHNORM_FAMILIES = ["cvt_13", "mobilevit_xxs"]  # BatchNorm inside the blocks of named_blocks()


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for _, block in model.named_blocks() for m in block.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _two_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Two forward/backward passes in training mode (gradients accumulate), the same random masks for both models."""
    losses = []
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(10 + i)  # drop-path draws; a recomputed block replays them
        loss = F.cross_entropy(model.train()(x), y)
        loss.backward()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", BATCHNORM_FAMILIES)
def test_recomputed_blocks_update_batchnorm_statistics_once(name):
    torch.manual_seed(0)
    plain = randomize_(vitkit.create_model(name, **vitkit.get_spec(name).tiny, num_classes=5))
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    norms = _norms(checkpointed)
    assert len(norms) >= 3, name
    buffers = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    calls = [0]
    norms[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    g, size = torch.Generator().manual_seed(1), plain.cfg.img_size
    batches = [(torch.randn(3, 3, size, size, generator=g), torch.randint(0, 5, (3,), generator=g)) for _ in range(2)]
    losses = [_two_steps(m, batches) for m in (plain, checkpointed)]
    assert calls[0] == 4  # each step ran the block twice (forward, recomputation): checkpointing was on
    assert losses[0] == losses[1]
    a, b = dict(plain.named_buffers()), dict(checkpointed.named_buffers())
    counts = {k: int(v) for k, v in b.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {2}, counts  # two steps, counted once each
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []  # measured: bitwise
    # measured: bitwise equal gradients (the same kernels recompute the same values); asserted to fp32 rounding
    for (k, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=k)
    # the recomputation's copies were dropped: the layers hold their own buffers again
    assert all(m.running_mean is rm and m.running_var is rv and m.num_batches_tracked is n
               for m, (rm, rv, n) in zip(norms, buffers))


def test_evaluation_and_no_grad_forwards_are_not_checkpointed():
    torch.manual_seed(0)
    model = vitkit.create_model("cvt_13", **vitkit.get_spec("cvt_13").tiny, num_classes=5)
    model.set_grad_checkpointing(True)
    norm, calls = _norms(model)[0], [0]
    norm.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        model.train()(x)
    model.eval()(x).sum().backward()
    assert calls[0] == 2 and int(norm.num_batches_tracked) == 1  # once each; only the training forward counted
