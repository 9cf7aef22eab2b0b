"""Reading the tensors of a ``torch.save``'d *module* (a whole pickled ``nn.Module``, not a state_dict) without
running any of its code.

Some released files are pickles of the module object itself (the DALL-E dVAE's ``encoder.pkl``: ``torch.save`` of
``dall_e.encoder.Encoder``). ``torch.load`` rebuilds such a file by importing the module's package and calling its
classes; ``torch.load(weights_only=True)`` refuses it (the classes are not on its allowlist). Its allowlist can take
stand-ins under the classes' names (``torch.serialization.safe_globals([(stub, "dall_e.encoder.Encoder"), ...])``),
and that reads a zip container, but torch 2.13's restricted loader stops at the legacy container's
``('module', ...)`` persistent ids ("Only persistent_load of storage is allowed"), and the release is a legacy
container. So the pickle is read here, by ``ModuleUnpickler``, whose ``find_class`` admits only:

- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (``_with_state``) and the ``torch.<T>Storage`` types,
  each answered by a function or record written *here* that only notes where a tensor's bytes are
  (``TensorRef``); no torch deserialisation code is called from the pickle;
- ``collections.OrderedDict``, ``set`` and ``torch.device`` (the latter recorded as a string);
- the module classes the caller names (``module_classes``, e.g. ``"dall_e.encoder.Encoder"``), each answered by a
  ``PickledModule`` stub made here: NEWOBJ creates an empty stub and BUILD stores the pickled ``__dict__`` in
  ``stub.state``. The named package is never imported and none of its methods run.

Anything else (``os.system`` via ``__reduce__``, ``builtins.eval``, an unexpected class) raises
``UnsafeCheckpointError`` in one line before it is created. The tensor bytes are then read from the container and
``module_state_dict`` walks the stubs' ``_parameters`` / ``_buffers`` / ``_modules`` into a state_dict with the
module's own parameter names.

Both containers of ``torch.save`` are read, laid out as torch/serialization.py writes them:

- zip (torch >= 1.6 default): ``<archive>/data.pkl`` with persistent ids ``('storage', type, key, location, numel)``
  and each storage's raw bytes in ``<archive>/data/<key>``, ``<archive>/byteorder``;
- legacy (``_use_new_zipfile_serialization=False``, and the DALL-E release: ``torch.load`` takes its
  ``_legacy_load`` path, microsoft/unilm issue #756): four pickles (magic number, protocol version 1001, sys_info,
  the object with storage ids ``(..., numel, view_metadata)`` and module classes as ``('module', class,
  source_file, source)``), the sorted storage keys, then per key an int64 element count and the raw bytes.

Only little-endian files are read; a big-endian one is refused with a message.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import torch
from torch import Tensor

from vitkit.weights.load_report import CheckpointError, UnsafeCheckpointError

__all__ = ["ModuleUnpickler", "PickledFile", "PickledModule", "TensorRef", "module_state_dict",
           "read_module_pickle"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch/serialization.py PROTOCOL_VERSION
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a persistent id: its key in the container, element type and element count."""
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it, before the container's bytes are read."""
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class PickledModule:
    """A module object of the pickle, kept as data: ``source`` is the class it named (``module.Name``), ``state``
    the ``__dict__`` its BUILD carried. Subclassed per class name by ``ModuleUnpickler``; nothing of the named class
    is imported or run."""

    source: ClassVar[str] = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledModule({self.source})"


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
    """Stands for ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])``."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"a tensor's storage is {type(storage).__name__}, not a storage record")
    if not (_ints(size) and _ints(stride) and isinstance(offset, int) and len(size) == len(stride)):
        raise CheckpointError(f"malformed tensor record: offset {offset!r}, size {size!r}, stride {stride!r}")
    return TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> TensorRef:
    """Stands for ``torch._utils._rebuild_parameter(data, requires_grad, hooks)`` (and ``_with_state``): the
    parameter's tensor; ``requires_grad`` and hooks do not matter for reading values."""
    if not isinstance(data, TensorRef):
        raise CheckpointError(f"a parameter holds {type(data).__name__}, not a tensor")
    return data


def _device(*args: Any) -> str:
    """Stands for ``torch.device(type[, index])``: the device as text (tensors are read to the CPU anyway)."""
    return ":".join(str(a) for a in args)


def _ints(values: Any) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, int) and v >= 0 for v in values)


class _StorageType:
    """Stands for ``torch.FloatStorage`` and the like in a persistent id: only its element type is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_DATA_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2 module names
    ("torch", "device"): _device,
}


class ModuleUnpickler(pickle.Unpickler):
    """Admits the tensor/storage records above and stubs for ``module_classes`` (``"package.module.Class"``);
    refuses every other global, before creating it. ``storages`` collects each persistent id it met."""

    def __init__(self, file: IO[bytes], module_classes: frozenset[str], source: str):
        super().__init__(file)
        self.module_classes, self.source = module_classes, source
        self.storages: dict[str, StorageRef] = {}
        self._stubs: dict[str, type[PickledModule]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if (module, name) in _DATA_GLOBALS:
            return _DATA_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:  # a fresh record: a BUILD on it changes nothing shared
            return _StorageType(STORAGE_DTYPES[name])
        if qualified in self.module_classes:
            return self._stubs.setdefault(qualified, type(name, (PickledModule,), {"source": qualified}))
        raise UnsafeCheckpointError(
            f"{self.source}: refused to unpickle {qualified}: this file may only name tensors, storages, "
            f"OrderedDict/set/torch.device and the module classes {', '.join(sorted(self.module_classes))} "
            f"(nothing was executed)")

    def persistent_load(self, pid: Any) -> StorageRef | type[PickledModule]:
        """``('storage', type, key, location, numel[, view_metadata])`` to a ``StorageRef``; the legacy container's
        ``('module', class, source_file, source)`` (a module class with its source text, for torch's "source has
        changed" warning) to the class, which ``find_class`` has already answered with a stub."""
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            if not (isinstance(pid[1], type) and issubclass(pid[1], PickledModule)):
                raise CheckpointError(f"{self.source}: a module record names {pid[1]!r:.60}, not a module class")
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.source}: malformed storage record {pid!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: storage views (torch < 1.0 files) are not supported")
        ref = StorageRef(str(key), storage_type.dtype, numel)
        if self.storages.setdefault(ref.key, ref) != ref:
            raise CheckpointError(f"{self.source}: storage {ref.key} is declared twice with different types")
        return ref


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy container's header pickles and key list: numbers, strings, lists and dicts only."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpointError(f"{self.source}: refused to unpickle {module}.{name}: a torch.save file starts "
                                    f"with plain numbers and dicts, this one does not (nothing was executed)")


@dataclass
class PickledFile:
    """What a pickled-module file holds: ``root`` (a ``PickledModule`` for a whole-module save) and its storages,
    each a 1-D tensor of its element type."""
    path: str
    root: Any
    storages: dict[str, Tensor]

    def tensor(self, ref: TensorRef) -> Tensor:
        """The tensor ``ref`` describes, copied out of its storage (bounds checked)."""
        storage = self.storages[ref.storage.key]
        last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) if all(ref.size) else -1
        if last >= storage.numel():
            raise CheckpointError(f"{self.path}: a tensor of size {ref.size} reaches element {last} of storage "
                                  f"{ref.storage.key}, which has {storage.numel()}")
        return torch.as_strided(storage, ref.size, ref.stride, ref.offset).clone()


def _storage_tensor(raw: bytes, ref: StorageRef, source: str) -> Tensor:
    """Raw little-endian bytes to a 1-D tensor of ``ref.numel`` elements of ``ref.dtype``."""
    nbytes = ref.numel * ref.dtype.itemsize
    if len(raw) < nbytes:
        raise CheckpointError(f"{source}: storage {ref.key} has {len(raw)} bytes, expected {nbytes} (truncated?)")
    if nbytes == 0:
        return torch.empty(0, dtype=ref.dtype)
    return torch.frombuffer(bytearray(raw[:nbytes]), dtype=ref.dtype)


def _read_zip(path: str, module_classes: frozenset[str]) -> PickledFile:
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a torch zip file holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in z.namelist() and z.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: big-endian files are not supported")
        unpickler = ModuleUnpickler(io.BytesIO(z.read(pickles[0])), module_classes, path)
        root = unpickler.load()
        storages = {key: _storage_tensor(_zip_record(z, f"{prefix}data/{key}", ref, path), ref, path)
                    for key, ref in unpickler.storages.items()}
    return PickledFile(path, root, storages)


def _zip_record(z: zipfile.ZipFile, name: str, ref: StorageRef, path: str) -> bytes:
    """The first bytes of record ``name`` that ``ref`` needs (only those are read)."""
    try:
        with z.open(name) as record:
            return record.read(ref.numel * ref.dtype.itemsize)
    except KeyError:
        raise CheckpointError(f"{path}: storage record {name} is missing") from None


def _read_legacy(path: str, module_classes: frozenset[str]) -> PickledFile:
    with open(path, "rb") as f:
        if _PlainUnpickler(f, path).load() != LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch.save file (no magic number)")
        if _PlainUnpickler(f, path).load() != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unknown legacy torch.save protocol")
        sys_info = _PlainUnpickler(f, path).load()
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
            raise CheckpointError(f"{path}: big-endian files are not supported")
        unpickler = ModuleUnpickler(f, module_classes, path)
        root = unpickler.load()
        keys = _PlainUnpickler(f, path).load()
        storages = {str(key): _legacy_storage(f, unpickler.storages, str(key), path) for key in keys}
    missing = set(unpickler.storages) - set(storages)
    if missing:
        raise CheckpointError(f"{path}: storages {sorted(missing)[:3]} are referenced but not stored")
    return PickledFile(path, root, storages)


def _legacy_storage(f: IO[bytes], refs: dict[str, StorageRef], key: str, path: str) -> Tensor:
    """One stored storage: an int64 element count, then its bytes."""
    if key not in refs:
        raise CheckpointError(f"{path}: stored storage {key} is not referenced by the pickle")
    count = int.from_bytes(f.read(8), "little")
    if count != refs[key].numel:
        raise CheckpointError(f"{path}: storage {key} stores {count} elements, the pickle says {refs[key].numel}")
    nbytes = count * refs[key].dtype.itemsize
    if nbytes > os.fstat(f.fileno()).st_size - f.tell():  # before reading: a crafted count must not allocate
        raise CheckpointError(f"{path}: storage {key} needs {nbytes} bytes, more than the file has left (truncated?)")
    return _storage_tensor(f.read(nbytes), refs[key], path)


def read_module_pickle(path: str | os.PathLike, module_classes: frozenset[str]) -> PickledFile:
    """Read a ``torch.save`` file (zip or legacy container) whose pickle may name only ``module_classes`` besides
    tensors; see the module docstring. Raises ``UnsafeCheckpointError`` for any other global, ``CheckpointError`` for
    a malformed or truncated file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"PK":
            return _read_zip(path, module_classes)
        if head[:1] == b"\x80":
            return _read_legacy(path, module_classes)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, IndexError, KeyError,
            AttributeError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: corrupt or truncated torch.save file ({str(e).splitlines()[0]})") from None
    raise CheckpointError(f"{path}: not a torch.save file (neither a zip archive nor a pickle)")


def module_state_dict(file: PickledFile, module: Any = None, prefix: str = "") -> dict[str, Tensor]:
    """The state_dict of a pickled module (``file.root`` by default): its ``_parameters`` and persistent
    ``_buffers`` and, recursively, its ``_modules``', named as ``nn.Module.state_dict`` names them."""
    state = _module_state(file.root if module is None else module, file.path)
    out: dict[str, Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, ref in _entries(state, kind, file.path).items():
            if ref is None or name in skip:
                continue
            if not isinstance(ref, TensorRef):
                raise CheckpointError(f"{file.path}: {prefix}{name} is {type(ref).__name__}, not a tensor")
            out[prefix + name] = file.tensor(ref)
    for name, child in _entries(state, "_modules", file.path).items():
        if child is not None:
            out.update(module_state_dict(file, child, f"{prefix}{name}."))
    return out


def _module_state(module: Any, path: str) -> dict[str, Any]:
    if not isinstance(module, PickledModule) or not isinstance(getattr(module, "state", None), dict):
        raise CheckpointError(f"{path}: expected a pickled module, found {type(module).__name__}")
    return module.state


def _entries(state: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    entries = state.get(kind, {})
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: a module's {kind} is {type(entries).__name__}, not a dict")
    return entries
