"""Sharded datasets (``vitkit.data.shards``, ``vitkit shards``): deterministic WebDataset tars with a verified index,
and training streams that see every sample exactly once per epoch across processes and loader workers, and resume
exactly from ``(epoch, step)`` alone.

The synthetic images say who they are: sample ``n`` of a split is a flat 32x32 image of colour
``(n % 256, n // 256, 40 * label)``, so a batch read back names its samples and labels without any bookkeeping in the
code under test. The expected epoch order is rebuilt here from its definition (a seeded permutation of the shards,
then contiguous ranges per process and stream).

``python tests/test_shards.py RECORD_DIR train ...`` runs the CLI recording, in each process, the sample numbers of
every training micro-batch (the torchrun entry point of the two-process test)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

from vitkit.config import ConfigError
from vitkit.data.shards import (
    ShardDataset,
    ShardError,
    ShardIndex,
    ShardStream,
    buffer_shuffle,
    write_shards,
)
from vitkit.train.config import load_recipe
from vitkit.train.distributed import StepBatchSampler, stream_seed

CLASSES = ("ant", "bee", "cat", "dog")
SIZES = {"train": 52, "val": 8, "test": 12}
SHARD_SIZE = 16  # train: shards of 16, 16, 16, 4 samples


# ------------------------------------------------------------------------------------------------------- fixtures
def pixel(n: int, label: int) -> tuple[int, int, int]:
    return n % 256, n // 256, 40 * label


def make_folder(root: Path) -> Path:
    """``root/<split>/<class>/<n>.png``; labels in contiguous blocks, so folder order is sample order."""
    for split, total in SIZES.items():
        for n in range(total):
            label = n * len(CLASSES) // total
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), pixel(n, label)).save(folder / f"{n:05d}.png")
    return root


def cli(*args: str) -> tuple[int, str, str]:
    from vitkit.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    code, _, err = cli("shards", str(source), str(out), "--shard-size", str(SHARD_SIZE))
    assert code == 0, err
    return out


def identity(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return image


def ids(images: torch.Tensor) -> list[int]:
    """The sample numbers of a batch of uint8 images (3, H, W) made by ``make_folder``."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


def stream(shards: Path, batch: int, accum: int = 1, rank: int = 0, world: int = 1, streams: int = 1, seed: int = 0,
           buffer: int = 5) -> ShardStream:
    index = ShardIndex.load(shards / "train")
    position = StepBatchSampler(index.samples, batch, accum, rank, world, seed)
    return ShardStream(index, identity, position, streams, buffer)


def read(s: ShardStream, epoch: int, step: int = 0, workers: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The micro-batches from ``step`` of ``epoch``: in this process, or through a DataLoader with ``workers``."""
    s.set_position(epoch, step)
    if workers is None:
        return list(s)
    return list(DataLoader(s, batch_size=None, num_workers=workers))


def epoch_sequence(index: ShardIndex, seed: int, epoch: int) -> list[int]:
    """The definition: the shards in a permutation drawn from ``stream_seed(seed, "shards", epoch)``, in order."""
    g = torch.Generator().manual_seed(stream_seed(seed, "shards", epoch))
    order = torch.randperm(len(index.shards), generator=g).tolist()
    first = [sum(s.samples for s in index.shards[:k]) for k in range(len(index.shards))]
    return [n for k in order for n in range(first[k], first[k] + index.shards[k].samples)]


# --------------------------------------------------------------------------------------------------------- writer
def test_the_index_describes_the_shards_and_the_tars_hold_the_files(source, shards):
    index = json.loads((shards / "train" / "index.json").read_text())
    assert (index["format"], index["version"], index["classes"]) == ("vitkit-shards", 1, list(CLASSES))
    assert [s["samples"] for s in index["shards"]] == [16, 16, 16, 4] and index["samples"] == 52
    for entry in index["shards"]:
        data = (shards / "train" / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    with tarfile.open(shards / "train" / "shard-000001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == ["000000016.png", "000000016.cls", "000000017.png", "000000017.cls"]
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members} == {(0, 0, 0, 0o644, "", "")}
        label = 16 * len(CLASSES) // SIZES["train"]
        assert tar.extractfile(members[1]).read() == str(label).encode()
        assert tar.extractfile(members[0]).read() == (source / "train" / CLASSES[label] / "00016.png").read_bytes()
    assert sorted(p.name for p in shards.iterdir()) == ["test", "train", "val"]  # no temporary folder left


def test_the_writer_is_deterministic(source, shards, tmp_path):
    code, _, err = cli("shards", str(source), str(tmp_path / "again"), "--shard-size", str(SHARD_SIZE))
    assert code == 0, err
    for split in SIZES:
        assert (tmp_path / "again" / split / "index.json").read_bytes() == (shards / split / "index.json").read_bytes()
    code, _, err = cli("shards", str(source), str(tmp_path / "again"))
    assert code == 2 and "already exist" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,says", [((), "give SOURCE and OUT"), (("cifar10", "out"), "--root DIR"),
                                       (("nowhere", "out"), "train/<class>/<images>"),
                                       (("--verify", "nowhere"), "no index.json")])
def test_command_mistakes_are_one_line_errors(tmp_path, args, says):
    code, _, err = cli("shards", *[str(tmp_path / a) if a in ("out", "nowhere") else a for a in args])
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_cifar_is_written_as_png_of_its_pixels_deterministically(tmp_path):
    from conftest import skip_or_fail

    from vitkit.data import DataConfig, build_splits
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "cifar-10-batches-py").is_dir():
        skip_or_fail(f"CIFAR-10 not found under {root}")
    splits = build_splits(DataConfig(name="cifar10", root=str(root), val_fraction=0.0))
    first, second = (write_shards(splits, tmp_path / name, shard_size=8, limit=20) for name in ("a", "b"))
    assert [i.shards for i in first] == [i.shards for i in second]  # the same sha256s: PNG encoding is deterministic
    test = ShardDataset.open(tmp_path / "a" / "test")
    assert len(test) == 20 and test.classes == splits.classes
    for k in (0, 9, 19):
        image, label = test[k]
        assert torch.equal(image, splits.test[k][0]) and label == splits.test[k][1]


@pytest.mark.parametrize("offset", [512 + 20, 100], ids=["image-bytes", "tar-header"])
def test_verify_names_a_shard_with_a_flipped_byte(shards, tmp_path, offset):
    out = tmp_path / "copy"
    for split in ("train", "test"):
        (out / split).mkdir(parents=True)
        for f in (shards / split).iterdir():
            (out / split / f.name).write_bytes(f.read_bytes())
    assert cli("shards", "--verify", str(out))[0] == 0
    path = out / "train" / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[32 * 512 + offset] ^= 0x01  # the 17th member (sample 8's image): its header's mode field, or its data
    path.write_bytes(bytes(data))
    code, _, err = cli("shards", "--verify", str(out))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "shard-000002.tar" in err and "index.json" in err


def test_a_damaged_shard_stops_the_stream_at_its_end(shards, tmp_path):
    """One stream, no shuffling, 4-sample micro-batches, an epoch whose first shard is a damaged 16-sample one (a
    flipped byte in padding: it parses and decodes): 3 of its 4 micro-batches are used, then the error comes before
    the 4th, its last, is."""
    out = tmp_path / "copy" / "train"
    out.mkdir(parents=True)
    for f in (shards / "train").iterdir():
        out.joinpath(f.name).write_bytes(f.read_bytes())
    index = ShardIndex.load(out)
    epoch = next(e for e in range(10) if epoch_sequence(index, 0, e)[0] < 48)  # starts with a full shard
    first = epoch_sequence(index, 0, epoch)[0] // SHARD_SIZE
    path = out / index.shards[first].file
    data = bytearray(path.read_bytes())
    data[512 + 500] ^= 0x01  # the zero padding after the first image's bytes
    path.write_bytes(bytes(data))
    s = ShardStream(index, identity, StepBatchSampler(52, 4), streams=1, shuffle_buffer=0)
    s.set_position(epoch, 0)
    used = []
    with pytest.raises(ShardError, match=rf"{path.name}.*index\.json"):
        for images, _ in s:
            used.append(ids(images))
    assert used == [list(range(first * 16 + 4 * j, first * 16 + 4 * j + 4)) for j in range(3)]


# ------------------------------------------------------------------------------------------------------ the order
def test_every_sample_once_per_epoch_across_processes_and_streams(shards):
    """2 processes x 2 streams, batch 4 (52 = 13 whole batches): each process reads its contiguous half of the epoch
    sequence, stream s the micro-batches i % 2 == s (7 and 6 of them); a DataLoader with 2 workers yields what the
    in-process round-robin yields, bit for bit."""
    index = ShardIndex.load(shards / "train")
    for epoch in (0, 1):
        sequence, seen = epoch_sequence(index, 0, epoch), []
        for rank in (0, 1):
            s = stream(shards, batch=4, rank=rank, world=2, streams=2)
            batches = read(s, epoch)
            assert len(batches) == len(s) == 13 and all(len(labels) == 2 for _, labels in batches)
            got = [n for images, _ in batches for n in ids(images)]
            assert sorted(got) == sorted(sequence[rank * 26:(rank + 1) * 26])
            for stream_id, span in ((0, range(14)), (1, range(14, 26))):
                mine = [n for i, (images, _) in enumerate(batches) if i % 2 == stream_id for n in ids(images)]
                assert sorted(mine) == sorted(sequence[rank * 26 + span.start:rank * 26 + span.stop])
            for images, labels in batches:
                assert (images[:, 2, 0, 0] == 40 * labels).all()  # each label travels with its image
            loaded = read(s, epoch, workers=2)
            assert len(loaded) == 13
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, loaded))
            seen += got
        assert sorted(seen) == list(range(52))


def test_the_tail_of_an_epoch_is_the_end_of_its_sequence(shards):
    """Batch 8 of 52 samples: 6 steps; the 4 samples dropped are the last 4 of the epoch's shard sequence."""
    index = ShardIndex.load(shards / "train")
    for epoch in (0, 1, 2):
        seen = []
        for rank in (0, 1):
            s = stream(shards, batch=8, accum=2, rank=rank, world=2, streams=2)
            assert s.steps_per_epoch == 6
            seen += [n for images, _ in read(s, epoch) for n in ids(images)]
        assert len(seen) == len(set(seen)) == 48
        assert set(range(52)) - set(seen) == set(epoch_sequence(index, 0, epoch)[48:])


@pytest.mark.parametrize("workers", [None, 2], ids=["in-process", "2-workers"])
@pytest.mark.parametrize("step", [3, 8])
def test_a_fresh_reader_resumes_exactly_where_the_first_stopped(shards, workers, step):
    """Steps 0..k-1 read by one reader, then a new reader at ``set_position(epoch, k)``: together exactly the
    uninterrupted epoch, the same bytes in the same order (k = 3: the DataLoader's worker 0 resumes stream 1)."""
    for rank in (0, 1):
        whole = read(stream(shards, batch=4, rank=rank, world=2, streams=2), epoch=1, workers=workers)
        resumed = read(stream(shards, batch=4, rank=rank, world=2, streams=2), epoch=1, step=step, workers=workers)
        assert len(resumed) == 13 - step
        for a, b in zip(whole[step:], resumed):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_epochs_differ_and_a_seed_repeats_its_order(shards):
    def order(seed: int, epoch: int) -> list[int]:
        return [n for images, _ in read(stream(shards, batch=4, seed=seed), epoch) for n in ids(images)]

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(52))
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_the_shuffle_buffer_permutes_and_size_0_keeps_the_order():
    g = torch.Generator().manual_seed(0)
    items = list(range(100))
    shuffled = list(buffer_shuffle(items, 10, g))
    assert sorted(shuffled) == items and shuffled != items
    assert max(abs(i - v) for i, v in enumerate(shuffled) if v < 90) < 60  # a buffer of 10, not a full shuffle
    assert list(buffer_shuffle(items, 0, g)) == items


def test_eval_splits_are_map_style_in_index_order(shards):
    test = ShardDataset.open(shards / "test", limit=10)
    assert len(test) == 10 and test.classes == list(CLASSES)
    assert [ids(test[i][0][None])[0] for i in range(10)] == list(range(10))
    assert test.targets == [n * 4 // 12 for n in range(10)]


# ---------------------------------------------------------------------------------------------------- the recipe
def test_recipe_keys_for_shards(shards):
    cfg = load_recipe(None, base={"data": {"name": "shards", "root": str(shards), "num_workers": 3}})
    assert cfg.data.shard_streams == 3 and cfg.data.shuffle_buffer == 1000  # fixed in the resolved config
    resumed = load_recipe(None, ["data.num_workers=0"], base={"data": {"name": "shards", "root": str(shards),
                                                                      "shard_streams": 3}})
    assert resumed.data.shard_streams == 3
    for key, value in (("train_limit", 10), ("shuffle_buffer", -1), ("shard_streams", 0)):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_recipe(None, base={"data": {"name": "shards", "root": str(shards), key: value}})


RECIPE = {
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "data": {"name": "shards", "img_size": 32, "num_workers": 2, "shuffle_buffer": 8,
             "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},  # the loss sees x / 255: images name their samples
    "augment": {"crop_padding": 0, "hflip": 0.0},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
    "train": {"steps": 9, "batch_size": 8, "eval_every": 4, "seed": 0, "deterministic": True, "threads": 1,
              "amp": "none", "device": "cpu"},
    "log": {"progress": False, "plots": False, "tensorboard": False},
}


def shard_recipe(shards: Path, **train) -> dict:
    return {**RECIPE, "data": {**RECIPE["data"], "root": str(shards)}, "train": {**RECIPE["train"], **train}}


def test_training_on_shards_stopped_and_resumed_equals_one_run(shards, tmp_path):
    """9 steps (6 per epoch) from 2 streams in 2 loader workers; SIGTERM during step 2 stops the run after step 3,
    mid-epoch at an odd micro-batch (the resumed loader's worker 0 must run stream 1); resumed, it ends bitwise
    where the run that was not interrupted ended."""
    from test_resume import assert_same_run

    from vitkit.train import resume, train
    recipe = shard_recipe(shards)
    assert train(recipe, tmp_path / "whole").status == "completed"
    done = []

    def stop_at_2(optimizer, args, kwargs):
        done.append(1)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's handler stops it after the next step

    handle = register_optimizer_step_post_hook(stop_at_2)
    try:
        assert train(recipe, tmp_path / "run").status == "interrupted"
    finally:
        handle.remove()
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "train_state.json").read_text())["state"]
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    done.clear()
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: done.append(1))
    try:
        assert resume(tmp_path / "run").status == "completed"
    finally:
        handle.remove()
    assert len(done) == 6  # only the remaining steps
    assert_same_run(tmp_path / "run", tmp_path / "whole", steps=9)


# torchrun starts 2 processes, each with 2 loader workers: ~10 s alone
def test_two_processes_with_two_workers_each_see_every_sample_once(shards, tmp_path):
    """torchrun, 2 processes (gloo) x 2 loader workers, batch 8 in 2 micro-batches: per step the processes train on
    disjoint halves, over epoch 0 on every sample but the tail exactly once, and each process on exactly the
    micro-batches its reader yields in one process."""
    from conftest import skip_or_fail
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        skip_or_fail("this torch build has no gloo backend")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(shard_recipe(shards, steps=8, accum_steps=2, eval_every=100)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path / "seen"), "train", str(recipe), "--out", str(tmp_path / "run")],
                          check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / "seen" / f"rank{r}.json").read_text()) for r in (0, 1)]  # micro-batches
    assert [len(s) for s in seen] == [16, 16] and all(len(m) == 2 for s in seen for m in s)
    for step in range(8):
        mine = [{n for m in s[2 * step:2 * step + 2] for n in m} for s in seen]
        assert len(mine[0]) == len(mine[1]) == 4 and not mine[0] & mine[1], f"step {step}"
    epoch0 = [n for s in seen for m in s[:12] for n in m]
    sequence = epoch_sequence(ShardIndex.load(shards / "train"), 0, 0)
    assert sorted(epoch0) == sorted(sequence[:48])  # the 4 of the tail are not trained on
    for rank in (0, 1):
        s = stream(shards, batch=8, accum=2, rank=rank, world=2, streams=2, buffer=8)
        expected = [ids(images) for epoch in (0, 1) for images, _ in read(s, epoch)][:16]
        assert seen[rank] == expected, f"rank {rank}"


def _record_training_samples(out: Path) -> None:
    """Wrap the classification task so each training micro-batch's sample numbers are written to
    ``out/rank<RANK>.json`` at exit (inputs are x / 255 with the recipe's mean 0 and std 1)."""
    import atexit

    from vitkit.train.tasks import ClassifyTask
    call, seen = ClassifyTask.__call__, []

    def recording(self, model, batch, g):
        seen.append(ids((batch[0] * 255).round().to(torch.uint8)))
        return call(self, model, batch, g)

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))

    ClassifyTask.__call__ = recording
    atexit.register(write)


if __name__ == "__main__":
    from vitkit.cli.main import main as vitkit_main
    _record_training_samples(Path(sys.argv[1]))
    sys.exit(vitkit_main(sys.argv[2:]))
