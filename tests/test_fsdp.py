"""FSDP (``train.strategy: fsdp``) under `torchrun --nproc_per_node=2 -m vitkit train` (gloo, CPU), with every training
feature on at once (gradient accumulation, clipping, EMA, layer-wise LR decay, activation checkpointing):

- two processes reach the weights, optimizer state and EMA of one process with the same global batch, to fp32
  reduction order;
- a SIGKILLed run resumes to the bitwise weights and train state of an uninterrupted one;
- the sharded checkpoint resumes on another number of processes (DCP reshards it): 1 → 2 and 2 → 1;
- ``checkpoints/last`` is one model that ``vitkit.load_model`` and ``vitkit eval`` read;
- tiny models of five families shard by their ``named_blocks()`` and step as one process does
  (``tests/fsdp_record.py``; compiled per block under ``-m slow``).

One process trains plainly (no sharding): it is the independent reference. To keep the torchrun launches few, the
2-process runs continue the one-process run's checkpoint of step ``SNAPSHOT`` (so each of them is a 1 → 2 resume),
and the 2 → 1 resume continues the killed run's checkpoint here; a 2-process run from step 0 is ``-m slow``. The
recipe has no dropout, drop-path or mixup: those draw per process (``stream_seed(..., rank)``), so they differ with
the number of processes by design.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import skip_or_fail
from test_resume import read_until
from safetensors.torch import load_file

import vitkit
from vitkit.cli.main import main
from vitkit.config import ConfigError
from vitkit.train import Trainer, resolve, resume, train

STEPS, CKPT_EVERY, SNAPSHOT = 16, 4, 4
RECIPE = {
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}},
    "data": {"name": "fake", "img_size": 16, "train_limit": 160, "test_limit": 32, "val_fraction": 0.1,
             "num_workers": 0},
    "augment": {"crop_padding": 2, "hflip": 0.5},  # per-sample random augmentation, seeded by sample index
    "optim": {"lr": 2e-3, "warmup_steps": 2, "clip_grad": 0.5, "layer_decay": 0.75},  # the norm is ~1-1.6: clipped
    "train": {"steps": STEPS, "batch_size": 16, "accum_steps": 2, "eval_every": 4, "checkpoint_every_steps": CKPT_EVERY,
              "seed": 0, "deterministic": True, "threads": 1, "device": "cpu", "ema": True, "ema_decay": 0.9,
              "grad_checkpointing": True, "strategy": "fsdp",
              "amp": "none"},  # fp32: bf16 (auto on a CPU with native bf16) rounds 1 and 2 processes differently
    "log": {"progress": False, "plots": False, "tensorboard": False, "every_steps": 1},  # a line per step
}
# Measured max |Δ| to the one-process run over weights, best (EMA) weights, optimizer moments and EMA, from fp32
# reduction order: 4.2e-7 after 12 steps on 2 processes (1 → 2), 4.2e-7 after 4 on 2 then 4 on 1 (2 → 1), 1.0e-6
# after all 16 on 2 (-m slow). The tolerance is 3x the largest.
TOL = 3e-6
STEP_LINE = re.compile(rf"^step (\d+)/{STEPS} ", re.MULTILINE)
RECORD = str(Path(__file__).with_name("fsdp_record.py"))


# ------------------------------------------------------------------------------------------------------ helpers
def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitkit",
            *args]


def run_two(*args: str) -> str:
    """`vitkit` under torchrun with 2 processes; returns the output (rank 0 logs)."""
    proc = subprocess.run(torchrun(*args), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def executed_steps(output: str) -> list[int]:
    return [int(k) for k in STEP_LINE.findall(output)]


def train_state(run: Path) -> dict[str, torch.Tensor]:
    """``checkpoints/last``'s sharded train state, whole: ``['model'][...]``, ``['optimizer'][...]``, ``['ema'][...]``
    tensors (DCP's ``format_utils`` reads it without a process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.utils._pytree import keystr, tree_flatten_with_path
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(run / "checkpoints" / "last" / "dcp", Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", weights_only=True)
    return {keystr(path): v for path, v in tree_flatten_with_path(state)[0] if isinstance(v, torch.Tensor)}


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / "model.safetensors"))


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def run_delta(run: Path, ref: Path) -> float:
    """The largest |Δ| over weights, best (EMA) weights, and the optimizer and EMA state of ``checkpoints/last``;
    both runs must have chosen the same best step."""
    a, b = train_state(run), train_state(ref)
    assert all(any(k.startswith(f"['{part}']") for k in a) for part in ("model", "optimizer", "ema"))
    best = [json.loads((r / "summary.json").read_text())["best"]["step"] for r in (run, ref)]
    assert best[0] == best[1]
    return max(max_delta(a, b), *(max_delta(weights(run, w), weights(ref, w)) for w in ("last", "best")))


def assert_same_run(run: Path, ref: Path) -> None:
    """Bitwise: weights, best weights and the whole train state."""
    for which in ("last", "best"):
        a, b = weights(run, which), weights(ref, which)
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], which
    a, b = train_state(run), train_state(ref)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def saved_step(run: Path) -> int:
    return json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())["state"]["step"]


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each in a session of its own) and torchrun, as a crash would."""
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.pid]
    for pid in [*children, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def in_process(fn, *args):
    """Train here; ``train.threads`` applies process-wide, so the test's thread count is put back."""
    threads = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def one(tmp_path_factory) -> tuple[Path, Path]:
    """One process, in this one; and a copy of its run folder right after the checkpoint of step ``SNAPSHOT`` (what
    a SIGKILL there would leave)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        skip_or_fail("this torch build has no gloo backend")
    root = tmp_path_factory.mktemp("one")
    out, snapshot = root / "run", root / "snapshot"
    real = Trainer._save_last

    def save_last(self):
        signalled = real(self)
        if self.state.step == SNAPSHOT:
            shutil.copytree(self.run_dir, snapshot)
        return signalled

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "_save_last", save_last)
        in_process(train, RECIPE, out)
    return out, snapshot


def from_snapshot(one: tuple[Path, Path], dest: Path) -> Path:
    shutil.copytree(one[1], dest)
    return dest


def killed_copy(killed: tuple[Path, int], dest: Path) -> Path:
    """A copy of the killed run's folder as the kill left it (each test resumes its own)."""
    shutil.copytree(killed[0], dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def two(one, tmp_path_factory) -> tuple[Path, str]:
    """The one-process run's step-``SNAPSHOT`` checkpoint continued to the end by 2 processes."""
    out = from_snapshot(one, tmp_path_factory.mktemp("two") / "run")
    return out, run_two("train", "--resume", str(out))


@pytest.fixture(scope="module")
def killed(one, tmp_path_factory) -> tuple[Path, int]:
    """The same continuation, SIGKILLed (every process at once) once it logged a step past the first checkpoint it
    wrote itself; returns the run folder and the last step it logged."""
    out = from_snapshot(one, tmp_path_factory.mktemp("killed") / "run")
    proc = subprocess.Popen(torchrun("train", "--resume", str(out)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen: list[str] = []
    try:
        step = read_until(proc, seen, lambda step: step > SNAPSHOT + CKPT_EVERY, executed_steps, 240)
        kill_job(proc)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc)
            proc.wait()
    return out, step


# --------------------------------------------------------------------------------------------------------- tests
def test_two_processes_match_one(one, two):
    (ref, _), (run, output) = one, two
    assert "resuming a 1-process run with 2 processes:" in output
    assert "fsdp: 2 blocks and the root sharded over 2 processes; fp32 parameters and gradient reduction" in output
    assert "activation checkpointing in 2 blocks" in output
    assert executed_steps(output) == list(range(SNAPSHOT + 1, STEPS + 1))
    assert run_delta(run, ref) <= TOL
    # sharded, not replicated: each process wrote its own half of every block's weights
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(str(run / "checkpoints" / "last" / "dcp")).read_metadata().state_dict_metadata
    chunks = meta["model.blocks.0.attn.qkv.weight"].chunks
    assert sorted(tuple(c.offsets) for c in chunks) == [(0, 0), (48, 0)]
    assert not list(run.glob("**/*.tmp-*"))


def test_sigkill_resumes_exactly(killed, two, tmp_path):
    out, killed_after = killed_copy(killed, tmp_path / "run"), killed[1]
    step = saved_step(out)
    assert step % CKPT_EVERY == 0 and SNAPSHOT < step <= killed_after < STEPS  # no checkpoint at the kill
    assert not (out / "summary.json").exists()
    output = run_two("train", "--resume", str(out))
    assert f"at step {step}" in output
    assert executed_steps(output) == list(range(step + 1, STEPS + 1))  # only the remaining steps
    assert_same_run(out, two[0])
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # a half-written folder of the killed run is gone


def test_resume_two_to_one(one, two, killed, tmp_path, caplog):
    """The killed 2-process run's checkpoint, written by 2 processes, continued here by one."""
    run = killed_copy(killed, tmp_path / "run")
    step = saved_step(run)
    assert step < STEPS
    with caplog.at_level("INFO", logger="vitkit"):
        in_process(resume, run)
    assert "resuming a 2-process run with 1 process:" in caplog.text
    assert executed_steps("\n".join(caplog.messages)) == list(range(step + 1, STEPS + 1))
    assert run_delta(run, one[0]) <= TOL and run_delta(run, two[0]) <= TOL


def test_a_damaged_sharded_state_is_named(killed, tmp_path):
    run = killed_copy(killed, tmp_path / "run")
    (run / "checkpoints" / "last" / "dcp" / "__1_0.distcp").unlink()  # process 1's shards
    with pytest.raises(ValueError, match=r"last/dcp: the sharded train state cannot be read \(FileNotFoundError: "
                                         r".*__1_0\.distcp'\); restore it or start a new run"):
        in_process(resume, run)


def test_last_is_one_model_that_eval_reads(one, two, tmp_path):
    run = two[0]
    model = vitkit.load_model(run / "checkpoints" / "last")
    shards = {k[len("['model']['"):-2]: v for k, v in train_state(run).items() if k.startswith("['model']")}
    state = model.state_dict()
    assert state.keys() == shards.keys() and all(torch.equal(state[k], shards[k]) for k in state)
    results = []
    for r in (run, one[0]):
        out = tmp_path / r.parent.name
        assert main(["eval", str(r / "checkpoints" / "last"), "--data-config", str(r / "config.yaml"),
                     "--amp", "none", "--out", str(out)]) == 0
        results.append(json.loads((out / "metrics.json").read_text()))
    assert results[0]["num_samples"] == 32 and results[0]["top1"] == results[1]["top1"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_from_step_zero_match_one(one, tmp_path):
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    output = run_two("train", str(recipe), "--out", str(tmp_path / "run"))
    assert executed_steps(output) == list(range(1, STEPS + 1))
    assert run_delta(tmp_path / "run", one[0]) <= TOL


# ------------------------------------------------------------------------------------------- settings, families
def test_strategy_is_validated():
    def recipe(**train) -> dict:
        return {**RECIPE, "train": {"steps": 1, **train}}

    assert resolve(recipe()).train.strategy == "ddp" and not resolve(recipe()).train.grad_checkpointing
    with pytest.raises(ConfigError, match="train.strategy"):
        resolve(recipe(strategy="zero3"))
    assert resolve(recipe(strategy="fsdp", amp="fp16")).train.amp == "fp16"  # loss-scaled (tests/test_amp_fp16.py)
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        resolve(recipe(grad_checkpointing="yes"))


def test_mixed_precision_follows_the_run_precision():
    from vitkit.train.fsdp import mixed_precision
    bf16 = mixed_precision(torch.bfloat16)
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp32 = mixed_precision(None)
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)  # parameters and reduction in their own fp32


FAMILIES = ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "cvt_13", "mobilevit_s", "dat_base"]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_each_family_shards_by_its_blocks(compiled, tmp_path):
    """``vitkit.train.fsdp.shard`` on several families (token, windowed, convolutional-projection, BatchNorm and
    deformable models): every block of ``named_blocks()`` and the root become units, one clipped AdamW step on half
    a batch per process equals one process's step on the whole batch, and the buffers (BatchNorm statistics) agree
    across processes once synced; also with each block compiled (``compile_blocks``, ``aot_eager`` backend)."""
    names = FAMILIES if not compiled else ["vit_tiny_patch16_224", "cvt_13"]  # a token model, a BatchNorm one
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        skip_or_fail("this torch build has no gloo backend")
    out = tmp_path / "families.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           RECORD, str(out), *(["--compile"] if compiled else []), *names],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in names:
        r, blocks = results[name], len(vitkit.create_model(name, **vitkit.get_spec(name).tiny).named_blocks())
        assert r["blocks"] == blocks and r["units"] == blocks + 1, name
        # measured: up to 1.5e-6 (CvT, MobileViT: AdamW's first step divides by tiny second moments)
        assert r["max_delta"] <= 1e-5 and r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5), name
        assert r["buffers_agree"], name
        assert r["graphs"] > 0 if compiled else r["graphs"] == 0, name


INDUCTOR_STEPS = 3  # measured max |Δ| 7.0e-7 after them, equal clipping norms; the bounds are the eager test's


@pytest.mark.slow
def test_inductor_compiled_blocks_train_as_eager_under_fsdp(tmp_path):
    """Each block of a tiny ViT compiled by inductor, torch.compile's default backend (its generated C++ built by the
    system compiler, from an empty cache so nothing is reused), then sharded over 2 gloo processes: 3 clipped AdamW
    steps on half a batch per process reach the weights of 3 eager unsharded steps on the whole batch. Slow: the
    C++ build takes minutes on a small CPU."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        skip_or_fail("this torch build has no gloo backend")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        skip_or_fail(f"inductor builds C++ on the CPU and {compiler} (CXX) is not installed")
    out = tmp_path / "inductor.json"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           RECORD, str(out), "--inductor", f"--steps={INDUCTOR_STEPS}", "vit_tiny_patch16_224"],
                          capture_output=True, text=True, timeout=3600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["vit_tiny_patch16_224"]
    assert r["blocks"] == 2 and r["units"] == 3
    assert r["graphs"] == 2 and r["inductor_graphs"] == 4  # each block's graph, compiled forward and backward
    assert r["max_delta"] <= 1e-5 and r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
