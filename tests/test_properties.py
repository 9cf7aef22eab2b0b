"""Property-based tests, bounded so the default suite stays fast: random recipe dictionaries and
``--set`` strings either validate or raise ``ConfigError`` (never another exception, never a run folder left
behind); random bytes as checkpoint files and as images give the documented one-line errors, never a traceback or
a hang."""
from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vitkit  # noqa: E402
from vitkit.config import ConfigError  # noqa: E402
from vitkit.train import load_recipe, train  # noqa: E402
from vitkit.train.config import RecipeConfig  # noqa: E402

FAST = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _fields(cls) -> dict[str, object]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


SECTIONS = {f.name: f.default_factory().__class__ for f in dataclasses.fields(RecipeConfig)}
KEYS = {s: sorted(_fields(cls)) for s, cls in SECTIONS.items()}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["cifar10", "fake", "digits", "folder", "adamw", "sgd", "auto", "bf16", "cosine", "cpu", "cuda",
                     "vit_tiny_patch16_224", "swin_t", "classify", "distill"]))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=3))


@st.composite
def recipes(draw):
    """A recipe dict: known sections with known (and some unknown) keys, values of any type."""
    raw = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS) + ["extra"]), max_size=4, unique=True)):
        keys = KEYS.get(section, []) + ["bogus"]
        raw[section] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=4))
    if draw(st.booleans()):
        raw.setdefault("data", {})["name"] = "fake"  # often valid enough to reach the deeper checks
    return raw


def _text_value(value) -> str:
    if isinstance(value, float) and value != value:
        return ".nan"
    return repr(value) if not isinstance(value, str) else value


set_strings = st.builds(
    lambda section, key, value, sep: f"{section}.{key}{sep}{value}",
    st.sampled_from(sorted(SECTIONS) + ["nope"]),
    st.one_of(st.sampled_from(sorted({k for keys in KEYS.values() for k in keys})), st.text(max_size=8)),
    st.one_of(st.text(max_size=16), values.map(_text_value)),
    st.sampled_from(["=", "=", ":", ""]))


def _only_config_errors(fn):
    try:
        return fn()
    except ConfigError:
        return None


@FAST
@given(recipes())
def test_random_recipes_validate_or_raise_config_error(raw):
    _only_config_errors(lambda: load_recipe(None, [], base=raw))


@FAST
@given(st.lists(set_strings, max_size=4))
def test_random_set_strings_validate_or_raise_config_error(sets):
    base = {"data": {"name": "fake"}, "train": {"steps": 1}}
    _only_config_errors(lambda: load_recipe(None, sets, base=base))


@settings(max_examples=25, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(recipes(), st.lists(set_strings, max_size=2))
def test_a_rejected_recipe_leaves_no_run_folder(raw, sets):
    try:
        load_recipe(None, sets, base=raw)
    except ConfigError:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            with pytest.raises(ConfigError):
                train(raw, out, sets)
            assert not out.exists()


# --------------------------------------------------------------------------------------------- random bytes as files
MAGIC = [b"", b"PK\x03\x04", b"\x80\x02", b"\x93NUMPY", b"{\"__metadata__\":", b"\x08\x00\x00\x00\x00\x00\x00\x00{",
         b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"]
blobs = st.builds(lambda head, tail: head + tail, st.sampled_from(MAGIC), st.binary(max_size=256))


@settings(max_examples=60, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blobs, st.sampled_from([".pth", ".bin", ".safetensors", ".npz", ".pt", ""]))
def test_random_bytes_as_a_checkpoint_are_a_one_line_error(tmp_path, data, suffix):
    """`vitkit convert FILE OUT --model ...` on garbage: exit status 2, one line, nothing written."""
    import contextlib
    from vitkit.cli.main import main
    path, out = tmp_path / f"ckpt{suffix}", tmp_path / "out"
    path.write_bytes(data)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["convert", str(path), str(out), "--model", "vit_tiny_patch16_224", "--set", "depth=1"])
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith("vitkit convert: error: ") and str(path) in lines[0]
    assert not out.exists()


@settings(max_examples=60, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blobs, st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp", ".txt"]))
def test_random_bytes_as_an_image_are_one_error_row(tmp_path, data, suffix):
    from vitkit.cli.predict import write_table
    from vitkit.evaluate import predict_files
    path = tmp_path / f"img{suffix}"
    path.write_bytes(data)
    model = _tiny_model()
    (pred,) = predict_files(model, [path], topk=2)
    if pred.ok:  # a few random byte strings do decode (e.g. a valid tiny BMP): then it is predicted
        assert len(pred.topk) == 2
        return
    out = io.StringIO()
    write_table([pred], out)
    lines = out.getvalue().splitlines()
    assert lines == [str(path), f"  error: {pred.error}"]


_MODEL = []


def _tiny_model():
    if not _MODEL:
        torch.manual_seed(0)
        _MODEL.append(vitkit.create_model("vit_tiny_patch16_224", patch_size=4, depth=1, embed_dim=24, num_heads=2,
                                          img_size=16, num_classes=3).eval())
    return _MODEL[0]
