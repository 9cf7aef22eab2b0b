"""The DALL-E dVAE encoder against the official openai/DALL-E code (files made by ``data/make_dalle_case.py``), and
the restricted reader of pickled modules: the official file loads without the ``dall_e`` package, a pickle that
would run code is refused and nothing runs."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vitkit.tokenizers.dalle import PICKLED_CLASSES, DalleConfig, DalleEncoder, map_pixels
from vitkit.tokenizers.module_pickle import PickledFile, StorageRef, TensorRef, module_state_dict, read_module_pickle
from vitkit.weights.load_report import CheckpointError, UnsafeCheckpointError

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
CASES = ("legacy", "zip")


def test_official_files_load_without_the_official_package(tmp_path):
    """In a process where ``import dall_e`` writes a marker and fails, both official files (legacy and zip
    containers) load and give the official logits (1e-6) and exactly its ids."""
    marker = tmp_path / "dall_e_was_imported"
    poison = tmp_path / "poison" / "dall_e"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('poisoned')\n")
    out = tmp_path / "out.safetensors"
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from vitkit.tokenizers.dalle import DalleEncoder
        io, result = load_file({str(DATA / "dalle_io.safetensors")!r}), {{}}
        for case in {CASES!r}:
            model = DalleEncoder.from_pickle({str(DATA)!r} + f"/dalle_encoder_{{case}}.pkl")
            images = io[f"{{case}}_images"]
            with torch.no_grad():
                result[f"{{case}}_logits"] = model(model.preprocess(images))
            result[f"{{case}}_ids"] = model.tokenize(images)
        save_file(result, {str(out)!r})
        print("dall_e" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(poison.parent), str(REPO)])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False" and not marker.exists(), "the dall_e package was imported"
    expected, got = load_file(DATA / "dalle_io.safetensors"), load_file(out)
    for case in CASES:
        torch.testing.assert_close(got[f"{case}_logits"], expected[f"{case}_logits"], atol=1e-6, rtol=0)
        assert got[f"{case}_ids"].dtype == torch.int64
        assert torch.equal(got[f"{case}_ids"], expected[f"{case}_ids"])


def test_the_file_gives_the_architecture():
    """The config comes from the pickled ``Encoder``'s attributes; ids are (B, H/8, W/8)."""
    model = DalleEncoder.from_pickle(DATA / "dalle_encoder_zip.pkl")
    assert model.cfg == DalleConfig(n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=64)
    assert model.vocab_size == 64 and model.grid((112, 224)) == (14, 28)
    assert model.tokenize(torch.rand(3, 3, 16, 40)).shape == (3, 2, 5)


def test_released_architecture_parameter_names():
    """The released encoder's shape (n_hid 256, 2 blocks per group, vocab 8192): the official names, 14x14 ids at
    112 px. Shapes only (meta tensors), no weights."""
    with torch.device("meta"):
        model = DalleEncoder()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["blocks.input.w"] == (256, 3, 7, 7)
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert "blocks.group_2.block_2.id_path.w" not in shapes
    assert shapes["blocks.group_4.block_2.res_path.conv_1.w"] == (512, 2048, 3, 3)
    assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    assert model.grid((112, 112)) == (14, 14)


def test_map_pixels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(map_pixels(x).flatten(), torch.tensor([0.1, 0.5, 0.9]))


def test_tokenize_refuses_normalised_images():
    model = DalleEncoder.from_pickle(DATA / "dalle_encoder_zip.pkl")
    normalised = (torch.rand(1, 3, 16, 16) - 0.485) / 0.229
    with pytest.raises(ValueError, match=r"raw RGB in \[0, 1\]"):
        model.tokenize(normalised)
    with pytest.raises(ValueError, match="multiple of"):
        model.tokenize(torch.rand(1, 3, 20, 16))


def test_safetensors_copy_gives_the_same_ids(tmp_path):
    model = DalleEncoder.from_pickle(DATA / "dalle_encoder_legacy.pkl")
    model.save_safetensors(tmp_path / "enc.safetensors")
    again = DalleEncoder.load_safetensors(tmp_path / "enc.safetensors")
    images = load_file(DATA / "dalle_io.safetensors")["legacy_images"]
    assert again.cfg == model.cfg and torch.equal(again.tokenize(images), model.tokenize(images))


# ----------------------------------------------------------------------------------------------- refusing to run code
class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_module(marker: Path) -> nn.Module:
    """An allowed container class whose ``__dict__`` carries a payload."""
    module = nn.Sequential(nn.ReLU())
    module.note = _RunsShell(marker)
    return module


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("where", ["top", "inside a module"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, container, where):
    marker = tmp_path / "pwned"
    obj = _RunsShell(marker) if where == "top" else _evil_module(marker)
    path = tmp_path / "evil.pkl"
    if container == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(UnsafeCheckpointError) as e:
        DalleEncoder.from_pickle(path)
    message = str(e.value)
    assert "\n" not in message and f"{path}: refused to unpickle" in message and "nothing was executed" in message
    if container != "pickle" or where == "top":  # a bare pickle stops at its first global, the container class
        assert f"refused to unpickle {os.system.__module__}.system" in message
    assert not marker.exists(), "the payload ran"


def test_the_payload_is_real(tmp_path):
    """Control: torch's unrestricted loader does run it."""
    marker = tmp_path / "pwned"
    torch.save(_RunsShell(marker), tmp_path / "evil.pkl")
    torch.load(tmp_path / "evil.pkl", weights_only=False)
    assert marker.exists()


def test_a_module_class_not_listed_is_refused(tmp_path):
    """The allowlist is exact: a pickled nn.Linear is not a dVAE encoder part."""
    torch.save(nn.Linear(2, 2), tmp_path / "linear.pkl")
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        DalleEncoder.from_pickle(tmp_path / "linear.pkl")


def test_a_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    for case in CASES:
        raw = (DATA / f"dalle_encoder_{case}.pkl").read_bytes()
        (tmp_path / "cut.pkl").write_bytes(raw[: len(raw) // 2])
        with pytest.raises(CheckpointError):
            DalleEncoder.from_pickle(tmp_path / "cut.pkl")
    torch.save(nn.Sequential(nn.ReLU()), tmp_path / "seq.pkl")
    with pytest.raises(CheckpointError, match="not a pickled dall_e.encoder.Encoder"):
        DalleEncoder.from_pickle(tmp_path / "seq.pkl")


class _Stub:
    def __setstate__(self, state):
        self.state = state


def _walk(module, prefix=""):
    out = {prefix + k: v.data for k, v in module.state["_parameters"].items()}
    for name, child in module.state["_modules"].items():
        out.update(_walk(child, f"{prefix}{name}."))
    return out


def test_the_zip_reader_agrees_with_torchs_restricted_loader():
    """Independent reference for the container parsing: torch's own ``weights_only`` loader, with inert stand-ins
    registered under the official class names, reads the same tensors from the zip file. (It cannot read the
    legacy container's module records, the release's format; the official logits cover that one.)"""
    path = DATA / "dalle_encoder_zip.pkl"
    stubs = [(type(name.rsplit(".", 1)[1], (_Stub,), {}), name) for name in PICKLED_CLASSES]
    with torch.serialization.safe_globals(stubs):
        reference = _walk(torch.load(path, weights_only=True))
    ours = module_state_dict(read_module_pickle(path, PICKLED_CLASSES))
    assert sorted(ours) == sorted(reference) and len(ours) == 42
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


def test_a_tensor_reaching_past_its_storage_is_refused():
    storage = StorageRef("0", torch.float32, 4)
    file = PickledFile("f", None, {"0": torch.arange(4.0)})
    assert torch.equal(file.tensor(TensorRef(storage, 1, (3,), (1,))), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(CheckpointError, match="reaches element 4"):
        file.tensor(TensorRef(storage, 1, (2, 2), (2, 1)))


def test_zip_records_are_read_from_the_archive_layout(tmp_path):
    """The reader follows torch's zip layout (``<archive>/data.pkl``, ``<archive>/data/<key>``) whatever the
    archive folder is called."""
    src, dst = DATA / "dalle_encoder_zip.pkl", tmp_path / "renamed.pkl"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr("other/" + name.split("/", 1)[1], zin.read(name))
    file = read_module_pickle(dst, PICKLED_CLASSES)
    assert file.root.source == "dall_e.encoder.Encoder" and len(file.storages) > 0
