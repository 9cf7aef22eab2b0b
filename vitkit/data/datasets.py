"""Datasets whose items are ``(uint8 tensor (3, H, W), int label)`` and which expose ``classes`` and ``targets``.

Conventions:
- CIFAR-10/100 read the python-pickle layout of the official tarballs (torchvision's ``CIFAR10``/``CIFAR100`` file
  names and URLs), without requiring the ``filenames`` entry, with a restricted unpickler that only rebuilds numpy
  arrays. The whole split is kept in memory as one ``uint8`` tensor ``(N, 3, 32, 32)``.
- ``ImageFolder`` follows torchvision's: one sub-folder per class, classes sorted by name, files sorted by path.
  Unlike torchvision, an unreadable file yields ``None`` (with one warning) instead of crashing a run, and
  ``collate_skip_none`` drops it, so labels never shift.
- ``Digits`` is scikit-learn's bundled 8×8 digits (UCI optdigits test set), scaled 0..16 → 0..255.
- Limits, held-out validation and the recipe's ``data:`` section (``DataConfig``, ``build_splits``) live in
  ``splits.py``; this module holds the datasets themselves.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .download import DownloadError, download_url, md5sum, safe_extract
from .images import IMG_EXTENSIONS, ImageLoadError, load_image, pil_to_tensor
from .rng import sample_generator

__all__ = ["CIFAR10", "CIFAR100", "ImageFolder", "Digits", "FakeData", "Subset", "collate_skip_none",
           "load_cifar_pickle", "stratified_pick"]

log = logging.getLogger(__name__)


class Subset(Dataset):
    """``base`` restricted to ``indices``, keeping ``classes`` and the matching ``targets``."""

    def __init__(self, base, indices):
        self.base = base
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def targets(self) -> list[int]:
        base_targets = self.base.targets
        return [int(base_targets[i]) for i in self.indices]


# --- CIFAR ----------------------------------------------------------------------------------------------------------

def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: numpy's array reconstruction (old and new module paths)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except numpy's array reconstruction, so a crafted file cannot run code."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: CIFAR files may only contain numpy arrays, lists, "
                f"numbers and strings") from None


def load_cifar_pickle(path: str | os.PathLike) -> dict:
    """Load one CIFAR batch/meta file (Python-2 pickle) with string keys, allowing only numpy globals."""
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None


class _CIFAR(Dataset):
    base_folder: str
    filename: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    meta_key: str
    label_key: str

    def __init__(self, root: str | os.PathLike, split: str = "train", download: bool = False,
                 url: str | None = None, md5: str | None = None, progress: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__}: split must be 'train' or 'test', got {split!r}")
        self.root, self.split = Path(root), split
        folder = self._find_folder()
        if folder is None and download:
            self._download(url or self.url, md5 or self.md5, progress)
            folder = self._find_folder()
        if folder is None:
            raise FileNotFoundError(
                f"{type(self).__name__} not found: expected {self.root / self.base_folder} (or {self.root}) to hold "
                f"{', '.join(self._files())}. Put the extracted {self.base_folder}/ folder, or {self.filename} "
                f"(from {self.url}), in {self.root}, or point --set data.root=DIR at the folder that holds it; "
                f"with network, --set data.download=true fetches it")
        self.folder = folder
        self.classes = list(load_cifar_pickle(folder / self.meta_file)[self.meta_key])
        self.data, self.targets = self._load(folder)  # (N, 3, 32, 32) uint8, list[int]

    def _files(self) -> tuple[str, ...]:
        return (self.train_files if self.split == "train" else self.test_files) + (self.meta_file,)

    def _find_folder(self) -> Path | None:
        for folder in (self.root / self.base_folder, self.root):
            if all((folder / f).is_file() for f in self._files()):
                return folder
        return None

    def _download(self, url: str, md5: str, progress: bool) -> None:
        archive = self.root / self.filename
        if archive.is_file() and md5sum(archive) == md5:
            log.info("using the archive already at %s", archive)
        else:
            try:
                download_url(url, archive, md5, progress=progress)
            except DownloadError as e:
                raise DownloadError(f"{e}. Offline? Download {url} elsewhere and put {self.filename} (or the "
                                    f"extracted {self.base_folder}/ folder) in {self.root}, or point --set "
                                    f"data.root=DIR at the folder that holds it") from None
        safe_extract(archive, self.root)

    def _load(self, folder: Path) -> tuple[torch.Tensor, list[int]]:
        files = self.train_files if self.split == "train" else self.test_files
        arrays, labels = [], []
        for name in files:
            entry = load_cifar_pickle(folder / name)
            data = np.asarray(entry["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / name}: expected data of shape (N, 3072), got {data.shape}")
            arrays.append(data.reshape(-1, 3, 32, 32))  # (n, 3, 32, 32): R, G, B planes, row-major
            labels.extend(int(y) for y in entry[self.label_key])
        data = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays)))  # (N, 3, 32, 32)
        if len(labels) != data.shape[0]:
            raise ValueError(f"{folder}: {data.shape[0]} images but {len(labels)} labels")
        return data, labels

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # clone: a view would make DataLoader workers share the whole split's storage for each item
        return self.data[i].clone(), self.targets[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, folder={str(self.folder)!r})"


class CIFAR10(_CIFAR):
    """CIFAR-10 (Krizhevsky 2009), python version: ``cifar-10-batches-py/data_batch_1..5, test_batch``."""

    base_folder = "cifar-10-batches-py"
    filename = "cifar-10-python.tar.gz"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5 = "c58f30108f718f92721af3b95e74349a"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, meta_key, label_key = "batches.meta", "label_names", "labels"


class CIFAR100(_CIFAR):
    """CIFAR-100 with its 100 fine labels: ``cifar-100-python/train, test, meta``."""

    base_folder = "cifar-100-python"
    filename = "cifar-100-python.tar.gz"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files = ("train",)
    test_files = ("test",)
    meta_file, meta_key, label_key = "meta", "fine_label_names", "fine_labels"


# --- image folders --------------------------------------------------------------------------------------------------

class ImageFolder(Dataset):
    """``root/<class>/**/<image>``; pass ``classes`` (e.g. the train split's) to keep label indices aligned."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None,
                 extensions: tuple[str, ...] = IMG_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        found = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if classes is not None and sorted(set(found) - set(classes)):
            raise ValueError(f"{self.root}: classes {sorted(set(found) - set(classes))} are not in {classes}")
        self.classes = list(classes) if classes is not None else found
        self.samples = self._scan(self.classes, tuple(e.lower() for e in extensions))
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {extensions} under {self.root}/<class>/")
        self.targets = [label for _, label in self.samples]
        self._warned: set[str] = set()

    def _scan(self, classes: list[str], extensions: tuple[str, ...]) -> list[tuple[str, int]]:
        samples = []
        for label, name in enumerate(classes):
            for folder, _, files in sorted(os.walk(self.root / name, followlinks=True)):  # sorted by folder path
                samples += [(os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(extensions)]
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[i]
        try:
            return pil_to_tensor(load_image(path)), label
        except ImageLoadError as e:
            if path not in self._warned:  # once per path (per worker process)
                self._warned.add(path)
                log.warning("skipping unreadable image: %s", e)
            return None

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"


class UnlabelledImages(ImageFolder):
    """Every image under ``root`` (any depth, sorted by path), each with label 0 of the one class ``"unlabelled"``:
    the input of training without labels (masked-image modelling), whose targets come from the images."""

    def __init__(self, root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = ["unlabelled"]
        exts = tuple(e.lower() for e in extensions)
        walk = sorted(os.walk(self.root, followlinks=True))  # sorted by folder path
        self.samples = [(os.path.join(folder, f), 0) for folder, _, files in walk
                        for f in sorted(files) if f.lower().endswith(exts)]
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {extensions} under {self.root}")
        self.targets = [0] * len(self.samples)
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"UnlabelledImages({str(self.root)!r}, n={len(self)})"


def collate_skip_none(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` items, dropping ``None`` ones; an all-``None`` batch gives empty tensors
    ``(torch.empty(0), torch.empty(0, dtype=torch.long))``, which a training loop should skip."""
    items = [b for b in batch if b is not None]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images = torch.stack([img for img, _ in items])  # (B, C, H, W)
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)  # (B,)
    return images, labels


# --- offline demo and test data ---------------------------------------------------------------------------------------

class Digits(Dataset):
    """scikit-learn's 1797 handwritten digits (8×8, grey levels 0..16) as ``uint8 (3, 8, 8)`` RGB.

    The train/test split is stratified and fixed (``test_fraction`` of each class, chosen with ``seed``), so the two
    splits are disjoint and identical on every run.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", test_fraction: float = 0.2, seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"Digits: split must be 'train' or 'test', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("Digits needs scikit-learn: pip install 'vitkit[train]'") from e
        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        test_idx = stratified_pick(bunch.target, test_fraction, seed)
        mask = np.zeros(len(images), dtype=bool)
        mask[test_idx] = True
        keep = np.flatnonzero(mask if split == "test" else ~mask)
        self.split = split
        self.indices = keep.tolist()  # positions in sklearn's array
        self.data = torch.from_numpy(images[keep]).unsqueeze(1).repeat(1, 3, 1, 1)  # (N, 3, 8, 8)
        self.targets = [int(t) for t in bunch.target[keep]]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i].clone(), self.targets[i]

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, n={len(self)})"


class FakeData(Dataset):
    """``n`` uniform-noise ``uint8`` images with uniform labels; item ``i`` depends only on ``(seed, i)``."""

    def __init__(self, n: int = 256, num_classes: int = 10, size: int | tuple[int, int] = 32, seed: int = 0):
        self.n, self.seed = n, seed
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.classes = [f"class_{k}" for k in range(num_classes)]
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(num_classes, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"FakeData index {i} out of range for {self.n} items")
        g = sample_generator(self.seed, -1, i)
        img = torch.randint(0, 256, (3, *self.size), dtype=torch.uint8, generator=g)  # (3, H, W)
        return img, self.targets[i]

    def __repr__(self) -> str:
        return f"FakeData(n={self.n}, classes={len(self.classes)}, size={self.size})"


def stratified_pick(targets, fraction: float, seed: int) -> np.ndarray:
    """Indices of ``round(fraction * N)`` items spread over classes in proportion (largest remainder), each class's
    picks chosen by a seeded permutation; sorted."""
    targets = np.asarray(targets)
    labels, counts = np.unique(targets, return_counts=True)
    quotas = counts * fraction  # exact share per class
    take = np.floor(quotas).astype(int)
    extra = int(round(fraction * len(targets))) - int(take.sum())
    order = np.argsort(-(quotas - take), kind="stable")  # largest fractional part first
    take[order[:max(extra, 0)]] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for label, k in zip(labels, take):
        members = np.flatnonzero(targets == label)
        perm = torch.randperm(len(members), generator=g).numpy()
        picked.append(members[perm[:k]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=int)
