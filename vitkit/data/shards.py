"""Sharded datasets in the WebDataset format: write them once, then stream them in training, resumable exactly.

Format (webdataset/webdataset README, "WebDataset format"): a split is a folder of POSIX tar files
``shard-000000.tar``, ... in which each sample is consecutive members sharing a basename, the *key*: here
``{key}.png`` (a folder source keeps each file's own bytes and extension) and ``{key}.cls``, the label as an ASCII
integer. Keys are the samples' numbers in the split, zero-padded. Beside the shards, ``index.json`` records the format
version, the class names and, per shard, its file, sample count, size and sha256. The writer is deterministic: fixed
tar headers (mtime 0, uid/gid 0, mode 0644, USTAR), PNG encoded by Pillow with fixed settings and no metadata, so the
same input gives the same bytes (with the same Pillow and zlib); each split is written into a temporary folder and
renamed when complete.

A sharded epoch. Epoch ``e``'s sample sequence is the shards in a permutation drawn from
``stream_seed(seed, "shards", e)``, each shard's samples in order. With ``B = train.batch_size``, an epoch has
``N // B`` optimiser steps, as with ``StepBatchSampler``; the first ``(N // B) * B`` positions of the sequence are
used and the rest, the *tail*, is dropped: the last ``N % B`` samples of the epoch's last shard(s), which differ from
epoch to epoch. Process ``r`` of ``R`` takes the ``r``-th of ``R`` equal contiguous parts of the used sequence; it
cuts its part into ``S`` contiguous streams (``data.shard_streams``; micro-batch ``i`` of the epoch belongs to stream
``i % S``, so stream ``s`` holds ``ceil((M - s) / S)`` of the process's ``M`` micro-batches). A stream reads only the
shards overlapping its range, in order, through a shuffle buffer (``data.shuffle_buffer`` samples; a torch generator
seeded ``stream_seed(seed, "shuffle", e, r, s)``), and cuts its output into micro-batches; each sample is decoded
and transformed with the generator of ``(seed, epoch, index)`` that ``TransformDataset`` uses, ``index`` being its
number in index.json order. With ``S`` loader workers (one per stream), PyTorch's DataLoader takes its workers'
outputs round-robin, so micro-batch ``i`` comes from stream ``i % S``; without workers the process round-robins the
``S`` streams itself, in the same order. So the order depends on ``(seed, epoch, step)`` and on ``R`` and ``S``; the
resolved ``data.shard_streams`` is part of the run's config, so changing ``data.num_workers`` on resume keeps it,
while resuming with another number of processes changes the order.

Resume. ``set_position(epoch, step)`` is all that is stored: from micro-batch ``i0 = step * accum_steps`` on, loader
worker ``d`` runs stream ``(i0 + d) % S`` (so the round-robin still yields micro-batch ``i`` from stream ``i % S``),
and each stream replays its epoch from the start and discards the micro-batches before ``i0`` without decoding them.
The cost of a resume mid-epoch is reading and hashing, not decoding, the consumed part of every stream: about
``step / steps_per_epoch`` of the epoch's shard bytes, spread over the streams.

Integrity. Every shard is read in one sequential pass that hashes every byte; at its end a size, sha256 or sample
count that differs from index.json raises ``ShardError`` naming the shard and the index, before any further sample
is used (samples of that shard which the shuffle buffer emitted earlier may have been used). A stream reads its two
boundary shards whole, to verify them, even where it uses only a part of each. Memory: each stream holds at most
``data.shuffle_buffer`` encoded samples and one micro-batch.

Why ``tarfile`` rather than the ``webdataset`` package (1.0.2 installs; its source was read for this choice): it
assigns *whole shards* to processes and workers (``shardlists.split_by_node`` / ``split_by_worker`` take every n-th
shard), so they get unequal sample counts and cannot cut the equal per-step batches the loop needs; ``shuffle``
seeds ``random.Random`` from the pid and the clock unless given a seed, and ``detshuffle`` counts epochs inside the
process running the pipeline, which a non-persistent DataLoader worker forgets (webdataset/webdataset #299); and it
keeps no position to resume from, which its maintainer leaves to the user (webdataset/webdataset #234, #271). What
is needed here (a sample-range split of one permuted sequence, counter-seeded buffers, replay to a step, sha256
checks) is a few functions over ``tarfile``; the shards themselves follow its format.

Evaluation splits (``val/``, ``test/``) are read as map-style ``ShardDataset``s: sample ``i`` in index.json order,
loaded into memory (encoded, every shard verified) on first access, or up front by ``load()``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .datasets import ImageFolder, collate_skip_none
from .images import ImageLoadError, pil_to_tensor, tensor_to_pil, to_rgb
from .rng import randrange, sample_generator, stream_seed

if TYPE_CHECKING:
    from vitkit.train.distributed import StepBatchSampler

    from .splits import Splits
    from .transforms import Transform

__all__ = ["EncodedSample", "RawSample", "ShardDataset", "ShardError", "ShardIndex", "ShardInfo", "ShardStream",
           "buffer_shuffle", "encode_png", "encoded_samples", "read_shard", "verify_split", "write_shards",
           "write_split"]

log = logging.getLogger(__name__)

FORMAT, VERSION = "vitkit-shards", 1
INDEX = "index.json"
KEY_DIGITS = 9  # keys 000000000 ... 999999999
SPLITS = ("train", "val", "test")
T = TypeVar("T")


class ShardError(ValueError):
    """A shard or index.json that is damaged, truncated or was changed after writing; the message names both."""


# ------------------------------------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """A split's ``index.json``: its class names and shards, in sample order."""

    folder: Path
    classes: tuple[str, ...]
    shards: tuple[ShardInfo, ...]

    @property
    def path(self) -> Path:
        return self.folder / INDEX

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @functools.cached_property
    def starts(self) -> list[int]:
        """The number of each shard's first sample."""
        return list(itertools.accumulate((s.samples for s in self.shards[:-1]), initial=0))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "split": self.folder.name,
                           "classes": list(self.classes), "samples": self.samples,
                           "shards": [asdict(s) for s in self.shards]}, indent=1)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ShardIndex:
        path = Path(folder) / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (write shards with `vitkit shards SOURCE OUT`)")
        try:
            meta = json.loads(path.read_text())
            header, total = (meta["format"], meta["version"]), meta["samples"]
            index = cls(Path(folder), tuple(meta["classes"]), tuple(ShardInfo(**s) for s in meta["shards"]))
        except (ValueError, KeyError, TypeError) as e:  # not JSON, a missing key, a wrong type
            raise ShardError(f"{path}: not a valid shard index ({type(e).__name__}: {e})") from None
        if header != (FORMAT, VERSION):
            raise ShardError(f"{path}: format {header[0]!r} version {header[1]}; this vitkit reads {FORMAT!r} "
                             f"version {VERSION}")
        if not index.shards or index.samples != total:
            raise ShardError(f"{path}: lists {len(index.shards)} shards of {index.samples} samples, and says {total}")
        return index


# ------------------------------------------------------------------------------------------------------- writing
class EncodedSample(NamedTuple):
    data: bytes  # the encoded image
    ext: str  # its format's extension, e.g. "png"
    label: int


def encode_png(image: torch.Tensor) -> bytes:
    """``uint8 (3, H, W)`` → PNG bytes: Pillow's encoder at fixed settings and without metadata, so deterministic."""
    buf = io.BytesIO()
    tensor_to_pil(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encoded_samples(dataset, limit: int | None = None) -> Iterator[EncodedSample]:
    """The first ``limit`` (default: all) items of ``dataset``: an ``ImageFolder``'s files as they are, items of any
    other dataset of ``(uint8 (3, H, W), label)`` (CIFAR) as PNG."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        if isinstance(dataset, ImageFolder):
            path, label = dataset.samples[i]
            yield EncodedSample(Path(path).read_bytes(), Path(path).suffix[1:].lower(), label)
        else:
            image, label = dataset[i]
            yield EncodedSample(encode_png(image), "png", int(label))


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with nothing of the writing machine or time in it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


def _write_shard(path: Path, samples: list[EncodedSample], first: int) -> ShardInfo:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for number, sample in enumerate(samples, first):
            key = f"{number:0{KEY_DIGITS}d}"
            for name, data in ((f"{key}.{sample.ext}", sample.data), (f"{key}.cls", str(sample.label).encode())):
                tar.addfile(_member(name, len(data)), io.BytesIO(data))
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return ShardInfo(path.name, len(samples), path.stat().st_size, sha256)


def write_split(samples: Iterable[EncodedSample], folder: str | os.PathLike, classes: Sequence[str],
                shard_size: int) -> ShardIndex:
    """Write ``samples`` as ``folder/shard-NNNNNN.tar`` (``shard_size`` samples each, the last one fewer) and
    ``folder/index.json``, whole or not at all: into a temporary folder beside it, renamed when complete."""
    folder = Path(folder)
    if shard_size <= 0:
        raise ValueError(f"--shard-size: must be positive, got {shard_size}")
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another OUT")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        shards = tuple(_write_shard(tmp / f"shard-{k:06d}.tar", chunk, k * shard_size)
                       for k, chunk in enumerate(_chunks(samples, shard_size)))
        if not shards:
            raise ValueError(f"{folder}: no samples to write")
        index = ShardIndex(folder, tuple(classes), shards)
        (tmp / INDEX).write_text(index.to_json())
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    return index


def write_shards(splits: Splits, out: str | os.PathLike, shard_size: int, limit: int | None = None
                 ) -> list[ShardIndex]:
    """Each split of ``splits`` (``build_splits`` of a cifar or folder source) as ``out/<split>/``."""
    out = Path(out)
    present = [(name, getattr(splits, name)) for name in SPLITS if getattr(splits, name) is not None]
    taken = [str(out / name) for name, _ in present if (out / name).exists()]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; remove "
                              f"{'it' if len(taken) == 1 else 'them'} or choose another OUT")
    return [write_split(encoded_samples(dataset, limit), out / name, splits.classes, shard_size)
            for name, dataset in present]


# ------------------------------------------------------------------------------------------------------- reading
class RawSample(NamedTuple):
    """A sample as stored: its number in the split, key, encoded image and label."""

    index: int
    key: str
    image: bytes
    ext: str
    label: int
    shard: str


class _HashingReader:
    """A file read through ``read`` only, hashing (sha256) and counting every byte."""

    def __init__(self, f):
        self.f, self.sha256, self.count = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of each run of consecutive files sharing a key (WebDataset's grouping)."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name = member.name.rsplit("/", 1)[-1]
        k, _, ext = name.partition(".")
        if k != key and parts:
            yield key, parts
            parts = {}
        key, parts[ext] = k, tar.extractfile(member).read()
    if parts:
        yield key, parts


def _sample(key: str, parts: dict[str, bytes], index: int, path: Path) -> RawSample:
    images = [ext for ext in parts if ext != "cls"]
    if "cls" not in parts or len(images) != 1:
        raise ShardError(f"{path}: sample {key} has members {sorted(parts)}, expected one image and a .cls")
    try:
        label = int(parts["cls"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"{path}: {key}.cls is not an integer label") from None
    return RawSample(index, key, parts[images[0]], images[0], label, path.name)


def read_shard(index: ShardIndex, k: int) -> Iterator[RawSample]:
    """Shard ``k``'s samples in order, from one sequential pass over the file that hashes every byte. At its end, a
    size, sha256 or sample count that differs from index.json raises ``ShardError`` before anything more is
    returned."""
    info, first = index.shards[k], index.starts[k]
    path = index.folder / info.file
    if not path.is_file():
        raise ShardError(f"{path}: missing (listed in {index.path})")
    count = 0
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for count, (key, parts) in enumerate(_members(tar), 1):
                    yield _sample(key, parts, first + count - 1, path)
        except tarfile.TarError as e:
            raise ShardError(f"{path}: unreadable tar ({e}); it does not match {index.path}: write the shards "
                             f"again with `vitkit shards`") from None
        reader.drain()
    _check(index, info, path, reader, count)


def _check(index: ShardIndex, info: ShardInfo, path: Path, reader: _HashingReader, count: int) -> None:
    sha256 = reader.sha256.hexdigest()
    if (reader.count, sha256, count) != (info.bytes, info.sha256, info.samples):
        raise ShardError(f"{path}: {reader.count} bytes, sha256 {sha256[:16]}..., {count} samples where {index.path} "
                         f"records {info.bytes} bytes, {info.sha256[:16]}..., {info.samples} samples: the shard is "
                         f"damaged or was changed after writing; write the shards again with `vitkit shards`")


def verify_split(folder: str | os.PathLike) -> ShardIndex:
    """Read every shard of a split, checking it against index.json (``ShardError`` at the first mismatch)."""
    index = ShardIndex.load(folder)
    for k in range(len(index.shards)):
        for _ in read_shard(index, k):
            pass
    return index


def _decoded(sample: RawSample, warned: set[str]) -> torch.Tensor | None:
    """``uint8 (3, H, W)`` with ``load_image``'s conventions (EXIF orientation, then RGB), or None with one warning
    per sample when it does not decode (as ``ImageFolder``: ``collate_skip_none`` drops it, labels never shift)."""
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            img.load()
            return pil_to_tensor(to_rgb(ImageOps.exif_transpose(img)))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's decoding errors
        name = f"{sample.shard}:{sample.key}.{sample.ext}"
        if name not in warned:
            warned.add(name)
            log.warning("skipping unreadable image: %s", ImageLoadError(name, f"{type(e).__name__}: {e}"))
        return None


# ------------------------------------------------------------------------------------------- evaluation splits
class ShardDataset(Dataset):
    """A shard split as a map-style dataset of ``(uint8 (3, H, W), label)`` (None for an image that does not
    decode): item ``i`` is sample ``i`` in index.json order, of the first ``limit`` samples. ``len`` and ``classes``
    come from index.json; the samples' bytes are read (their shards verified) on first access or by ``load``."""

    def __init__(self, index: ShardIndex, limit: int | None = None):
        self.index = index
        self.size = index.samples if limit is None else min(limit, index.samples)
        self._samples: list[RawSample] | None = None
        self._warned: set[str] = set()

    @classmethod
    def open(cls, folder: str | os.PathLike, limit: int | None = None) -> ShardDataset:
        return cls(ShardIndex.load(folder), limit)

    def load(self) -> ShardDataset:
        """Read the shards holding the first ``len(self)`` samples into memory (encoded), once."""
        if self._samples is None:
            samples: list[RawSample] = []
            for k in range(len(self.index.shards)):
                if len(samples) >= self.size:
                    break
                samples.extend(read_shard(self.index, k))
            self._samples = samples[:self.size]
        return self

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples of {self.index.folder}")
        sample = self.load()._samples[i]
        image = _decoded(sample, self._warned)
        return None if image is None else (image, sample.label)

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.load()._samples]

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.index.folder)!r}, n={self.size}, shards={len(self.index.shards)})"


# ------------------------------------------------------------------------------------------- training streams
def buffer_shuffle(items: Iterable[T], size: int, g: torch.Generator) -> Iterator[T]:
    """WebDataset's ``shuffle(size)``: fill a buffer of ``size`` items, then for each new item emit a uniformly
    drawn buffered one and put the new one in its place; at the end, emit the rest in random order. ``size`` <= 1
    keeps the order."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = randrange(g, 0, size)
        buffer[j], item = item, buffer[j]
        yield item
    while buffer:
        j = randrange(g, 0, len(buffer))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


def _share(n: int, s: int, streams: int) -> int:
    """How many of micro-batches ``0 .. n-1`` belong to stream ``s`` (those ``i`` with ``i % streams == s``)."""
    return (n - s + streams - 1) // streams


class ShardStream(IterableDataset):
    """This process's training micro-batches ``(images, labels)`` from a shard split, one epoch at a time and
    resumable at any step (the module docstring describes the order). ``position`` (a ``StepBatchSampler`` over the
    split's samples) holds the arithmetic it shares with map-style data: steps per epoch, the dropped tail, the
    micro-batch size, ``set_position`` and ``len``. Give the DataLoader ``batch_size=None`` and ``streams`` workers,
    or none."""

    def __init__(self, index: ShardIndex, transform: Transform, position: StepBatchSampler, streams: int = 1,
                 shuffle_buffer: int = 1000):
        if position.num_items != index.samples:
            raise ValueError(f"position counts {position.num_items} samples, {index.path} {index.samples}")
        if streams < 1 or shuffle_buffer < 0:
            raise ValueError(f"streams must be >= 1 and shuffle_buffer >= 0, got {streams} and {shuffle_buffer}")
        self.index, self.transform, self.position = index, transform, position
        self.streams, self.shuffle_buffer = streams, shuffle_buffer
        self._warned: set[str] = set()

    @property
    def steps_per_epoch(self) -> int:
        return self.position.steps_per_epoch

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields ``epoch`` from optimiser step ``start_step`` on."""
        self.position.set_position(epoch, start_step)

    def __len__(self) -> int:
        return len(self.position)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per epoch, in this process."""
        return self.steps_per_epoch * self.position.accum_steps

    def shard_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(stream_seed(self.position.seed, "shards", epoch))
        return torch.randperm(len(self.index.shards), generator=g).tolist()

    def stream_range(self, s: int) -> tuple[int, int]:
        """``[start, stop)``: stream ``s``'s positions in an epoch's sample sequence."""
        M, micro = self.micro_batches, self.position.micro
        before = sum(_share(M, t, self.streams) for t in range(s))
        start = (self.position.rank * M + before) * micro
        return start, start + _share(M, s, self.streams) * micro

    def _read_range(self, epoch: int, start: int, stop: int) -> Iterator[RawSample]:
        """The samples at positions ``[start, stop)`` of epoch ``epoch``'s sequence, reading only the shards that
        overlap them (each whole, to verify it)."""
        if start >= stop:
            return
        position = 0
        for k in self.shard_order(epoch):
            n = self.index.shards[k].samples
            if position < stop and position + n > start:
                for j, sample in enumerate(read_shard(self.index, k), position):
                    if start <= j < stop:
                        yield sample
            position += n

    def stream_samples(self, epoch: int, s: int) -> Iterator[RawSample]:
        """Stream ``s``'s samples of ``epoch`` in the order they are batched (after its shuffle buffer)."""
        g = torch.Generator().manual_seed(stream_seed(self.position.seed, "shuffle", epoch, self.position.rank, s))
        return buffer_shuffle(self._read_range(epoch, *self.stream_range(s)), self.shuffle_buffer, g)

    def _collate(self, samples: list[RawSample], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = []
        for sample in samples:
            image = _decoded(sample, self._warned)
            g = sample_generator(self.position.seed, epoch, sample.index)  # TransformDataset's per-sample stream
            items.append(None if image is None else (self.transform(image, g), sample.label))
        return collate_skip_none(items)

    def _stream_batches(self, epoch: int, s: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``s``'s micro-batches after its first ``skip`` (read, not decoded). Each is yielded once the next
        one is complete or the stream is read to its end, so the last one comes after its shard was verified."""
        micro = self.position.micro
        samples = itertools.islice(self.stream_samples(epoch, s), skip * micro, None)
        pending = None
        for chunk in _chunks(samples, micro):
            if pending is not None:
                yield self._collate(pending, epoch)
            pending = chunk
        if pending is not None:
            yield self._collate(pending, epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, S = self.position.epoch, self.streams
        first = self.position.start_step * self.position.accum_steps  # the next micro-batch of the epoch
        worker = get_worker_info()
        if worker is None:  # every stream in this process, round-robin as the DataLoader takes its workers' output
            batches = [self._stream_batches(epoch, s, _share(first, s, S)) for s in range(S)]
            for i in range(first, self.micro_batches):
                yield next(batches[i % S])
            return
        if worker.num_workers != S:
            raise RuntimeError(f"a ShardStream of {S} streams needs a DataLoader with {S} workers (or none), "
                               f"got {worker.num_workers}")
        s = (first + worker.id) % S  # the DataLoader's j-th output is worker j % S's: micro-batch first + j
        yield from self._stream_batches(epoch, s, _share(first, s, S))
