"""vitkit.data datasets: CIFAR pickles (restricted unpickling, download from a local server), ImageFolder with a
corrupt file, Digits, FakeData, the held-out split and DataConfig / build_splits. No internet, no ../shared."""
import collections
import functools
import hashlib
import http.server
import io
import logging
import os
import pickle
import shutil
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitkit.config import ConfigError, from_dict
from vitkit.data import (CIFAR10, CIFAR100, DataConfig, Digits, DownloadError, FakeData, ImageFolder,
                         UnsafeArchiveError, build_splits, collate_skip_none, load_cifar_pickle, safe_extract,
                         train_val_split)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- fake CIFAR files, written the way Python 2 wrote the originals ---------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with ``bytes`` written as Python-2 ``str`` (BINSTRING), as in the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_dump(obj, path, old_numpy_name=True):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    if old_numpy_name:  # numpy 1.x wrote numpy.core.multiarray
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(data)


def _batch(n, seed, label_key="labels", num_classes=10):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake batch", label_key.encode(): [int(v) for v in rng.integers(0, num_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}  # no b"filenames", like our local copy


def make_cifar10(folder, n=6):
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _batch(n, i)
        _py2_dump(batches[name], folder / name, old_numpy_name=i % 2 == 0)
    _py2_dump({b"label_names": [c.encode() for c in CIFAR10_NAMES], b"num_vis": 3072}, folder / "batches.meta")
    return batches


def test_cifar10_reads_python2_pickles(tmp_path):
    batches = make_cifar10(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        train = CIFAR10(root, "train")
        assert train.classes == CIFAR10_NAMES and len(train) == 30
        assert train.data.dtype == torch.uint8 and train.data.shape == (30, 3, 32, 32)
    second = batches["data_batch_2"]
    img, label = train[6]  # first row of data_batch_2
    assert label == second[b"labels"][0] and isinstance(label, int)
    assert torch.equal(img, torch.from_numpy(second[b"data"][0].reshape(3, 32, 32)))  # R, G, B planes
    assert img.data_ptr() != train.data[6].data_ptr()  # a copy, not a view of the whole split
    test = CIFAR10(tmp_path, "test")
    assert test.targets == batches["test_batch"][b"labels"]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, seed in (("train", 0), ("test", 1)):
        entry = _batch(5, seed, "fine_labels", 100)
        entry[b"coarse_labels"] = [0] * 5
        _py2_dump(entry, folder / name)
    _py2_dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []},
              folder / "meta")
    ds = CIFAR100(tmp_path, "test")
    assert len(ds.classes) == 100 and len(ds) == 5 and max(ds.targets) < 100


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*system"):
        load_cifar_pickle(path)
    assert not (tmp_path / "pwned.txt").exists()
    path.write_bytes(pickle.dumps({"x": collections.OrderedDict()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        load_cifar_pickle(path)


def test_missing_cifar_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        CIFAR10(tmp_path, "val")


# --- download from a local HTTP server --------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A fake ``cifar-10-python.tar.gz`` served from 127.0.0.1 on a free port; yields (url, md5, request log)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    site = tmp_path / "site"
    make_cifar10(site / "build" / "cifar-10-batches-py", n=4)
    archive = site / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(site / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    requests = []

    class Handler(_Handler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
        yield url, hashlib.md5(archive.read_bytes()).hexdigest(), requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_success(tmp_path, served):
    url, md5, requests = served
    root = tmp_path / "data"
    ds = CIFAR10(root, "train", download=True, url=url, md5=md5, progress=False)
    assert len(ds) == 20 and len(requests) == 1
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_download_checksum_mismatch_leaves_nothing(tmp_path, served):
    url, _, requests = served
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        CIFAR10(root, "train", download=True, url=url, md5="0" * 32, progress=False)
    assert len(requests) == 1 and list(root.iterdir()) == []


def test_already_present_is_not_downloaded(tmp_path, served):
    url, md5, requests = served
    root = tmp_path / "data"
    CIFAR10(root, "train", download=True, url=url, md5=md5, progress=False)
    CIFAR10(root, "test", download=True, url=url, md5=md5, progress=False)  # folder present
    assert len(requests) == 1
    shutil.rmtree(root / "cifar-10-batches-py")  # folder gone, archive still there and good
    assert len(CIFAR10(root, "test", download=True, url=url, md5=md5, progress=False)) == 4
    assert len(requests) == 1  # re-extracted from the verified archive, no second download


def test_download_unreachable_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.tar.gz"
    with pytest.raises(DownloadError, match="cannot download"):
        CIFAR10(tmp_path, "train", download=True, url=url, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", "link"])
def test_unsafe_archive_members_are_refused(tmp_path, member):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="refusing member"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


# --- ImageFolder ------------------------------------------------------------------------------------------------------

def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def _folder_tree(root):
    _png(root / "cat" / "a.png", 10)
    _png(root / "cat" / "nested" / "b.PNG", 20)
    (root / "cat" / "c.png").write_bytes(b"not a png")  # corrupt
    (root / "cat" / "readme.txt").write_text("ignored")
    _png(root / "dog" / "d.jpg", 30)


def test_image_folder_skips_corrupt_files_without_shifting_labels(tmp_path, caplog):
    _folder_tree(tmp_path)
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1] and len(ds) == 4
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert names == ["a.png", "c.png", "b.PNG", "d.jpg"]
    with caplog.at_level(logging.WARNING, logger="vitkit.data.datasets"):
        assert ds[1] is None and ds[1] is None
    assert len([r for r in caplog.records if "c.png" in r.getMessage()]) == 1  # warned once
    img, label = ds[3]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and label == 1
    images, labels = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)))
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 1]
    assert images[:, 0, 0, 0].tolist() == [10, 20, 30]  # each image kept its own label


def test_collate_skip_none_edge_cases():
    images, labels = collate_skip_none([None, None])
    assert images.numel() == 0 and labels.shape == (0,) and labels.dtype == torch.long
    images, labels = collate_skip_none([(torch.zeros(3, 2, 2), 4), None])
    assert images.shape == (1, 3, 2, 2) and labels.tolist() == [4]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty")


# --- Digits, FakeData, splits -------------------------------------------------------------------------------------------

def test_digits_split_is_disjoint_stratified_and_stable():
    train, test = Digits("train"), Digits("test")
    assert len(train) + len(test) == 1797 and len(test) == round(0.2 * 1797)
    img, label = train[0]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(img[0], img[1]) and int(train.data.max()) == 255
    per_class = collections.Counter(test.targets)
    assert set(per_class) == set(range(10)) and max(per_class.values()) - min(per_class.values()) <= 2
    assert set(train.indices).isdisjoint(test.indices) and len(set(train.indices) | set(test.indices)) == 1797
    assert torch.equal(Digits("test").data, test.data)


def test_fake_data_is_deterministic():
    a, b = FakeData(8, 3, (6, 5), seed=1), FakeData(8, 3, (6, 5), seed=1)
    assert torch.equal(a[5][0], b[5][0]) and a.targets == b.targets and a[5][0].shape == (3, 6, 5)
    assert not torch.equal(a[5][0], FakeData(8, 3, (6, 5), seed=2)[5][0])
    with pytest.raises(IndexError):
        a[8]


def test_train_val_split_is_seeded_disjoint_and_stratified():
    ds = FakeData(1000, 10, 4, seed=0)
    train, val = train_val_split(ds, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train.indices).isdisjoint(val.indices) and len(set(train.indices) | set(val.indices)) == 1000
    counts, val_counts = collections.Counter(ds.targets), collections.Counter(val.targets)
    assert all(abs(val_counts[c] - 0.1 * counts[c]) <= 1 for c in counts)
    assert train_val_split(ds, 0.1, seed=3)[1].indices == val.indices
    assert train_val_split(ds, 0.1, seed=4)[1].indices != val.indices
    assert val.classes == ds.classes and val.targets == [ds.targets[i] for i in val.indices]


def test_data_config_validation():
    cfg = from_dict(DataConfig, {"name": "digits", "img_size": 32, "mean": [0.5, 0.5, 0.5]})
    assert cfg.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="val_fractoin"):
        from_dict(DataConfig, {"name": "digits", "val_fractoin": 0.1})
    with pytest.raises(ConfigError, match="name"):
        from_dict(DataConfig, {"name": "imagenet"})
    with pytest.raises(ConfigError, match="data.root"):
        from_dict(DataConfig, {"name": "cifar10"})
    with pytest.raises(ConfigError, match="val_fraction"):
        from_dict(DataConfig, {"name": "digits", "val_fraction": 1.5})
    with pytest.raises(ConfigError, match="train_limit"):
        from_dict(DataConfig, {"name": "fake", "train_limit": 0})


def test_build_splits_digits_and_fake():
    s = build_splits(DataConfig(name="digits", val_fraction=0.1, split_seed=1))
    assert len(s.train) + len(s.val) == len(Digits("train")) and s.classes == [str(d) for d in range(10)]
    s = build_splits(DataConfig(name="fake", img_size=16, train_limit=50, test_limit=10, val_fraction=0.2))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 10) and s.train[0][0].shape == (3, 16, 16)


def test_build_splits_cifar_limits(tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-py", n=20)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), train_limit=50, test_limit=7, val_fraction=0.2)
    s = build_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 7) and s.classes == CIFAR10_NAMES
    assert max(s.train.indices + s.val.indices) < 50  # carved from the first 50 items only


def test_build_splits_folder_with_and_without_val(tmp_path):
    _folder_tree(tmp_path / "train")
    _png(tmp_path / "test" / "dog" / "t.png", 40)  # test lacks "cat": labels still follow train's classes
    s = build_splits(DataConfig(name="folder", root=str(tmp_path), val_fraction=0.25))
    assert s.classes == ["cat", "dog"] and len(s.val) == 1 and len(s.train) == 3 and s.test.targets == [1]
    _png(tmp_path / "val" / "dog" / "v.png", 50)
    s = build_splits(DataConfig(name="folder", root=str(tmp_path)))
    assert len(s.train) == 4 and s.val.targets == [1]
    _png(tmp_path / "val" / "bird" / "v.png", 50)
    with pytest.raises(ValueError, match="bird"):
        build_splits(DataConfig(name="folder", root=str(tmp_path)))


def test_readme_describes_the_image_folder_layout_as_built():
    """The README's folder layout names the extensions ImageFolder reads, and the split folders build_splits opens."""
    import re
    from pathlib import Path

    from vitkit.data.images import IMG_EXTENSIONS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = re.search(r"by extension \(([^)]*)\)", readme).group(1).split()
    assert tuple(listed) == IMG_EXTENSIONS
    for folder in ("DIR/train/<class>/<images>", "DIR/val/<class>/", "DIR/test/<class>/"):
        assert folder in readme
