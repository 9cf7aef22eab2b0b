"""Named weights of CCT and T2T-ViT (official release files published without a hash) and of DAT / DAT++ (none: no
stable source): download → record the hash → verify → load → offline, the CLI's ``--pretrained true`` and
``vitkit models --pretrained``.

The release host is a local HTTP server on 127.0.0.1 (``test_hub._Server``) serving small files in the official
layouts (the family tests' reference checkpoints) at the catalog entries' own URL paths: a test replaces only the
scheme and host of the entry, so the cache file names are the release names. The real hosts are never contacted."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit import registry
from vitkit.cli.main import main
from vitkit.config import ConfigError
from vitkit.train.config import resolve
from vitkit.weights.hub import DownloadError, cached_path

from test_hub import _Server

FAMILIES = Path(__file__).parent / "families"
CCT_CASE = FAMILIES / "cct" / "data" / "official_cct_2_3x2_32_shrunk"
# the official constructor of that case (CCT-2/3x2, width 64) as overrides of cct_7_3x1_32
CCT_KW = dict(num_layers=2, num_heads=2, mlp_ratio=1.0, embedding_dim=64, n_conv_layers=2)
T2T_CASE = FAMILIES / "t2t_vit" / "data" / "performer_64"
T2T_KW = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16, qk_scale=32 ** -0.5)


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("VITKIT_HOME", str(root))
    return root


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.stop()


def _serve_entry(monkeypatch, servers, name: str, blob: bytes, as_name: str | None = None, **changes) -> _Server:
    """Serve ``blob`` at the URL path of ``name``'s catalog entry and point the entry (only its host) at the server;
    ``as_name`` registers a copy of the variant under that name with ``changes`` to its config instead."""
    spec = vitkit.get_spec(name)
    path = urlsplit(spec.weights.url).path
    server = _Server({path: blob})
    servers.append(server)
    weights = dataclasses.replace(spec.weights, url=server.url + path)
    target = as_name or name
    spec = dataclasses.replace(spec, name=target, config={**spec.config, **changes}, weights=weights)
    monkeypatch.setitem(registry._REGISTRY, target, spec)
    return server


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _close(out, ref, atol=1e-4, rtol=1e-4) -> bool:
    return bool(((out - ref).abs() <= atol + rtol * ref.abs()).all())


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --------------------------------------------------------------------------------------------------- the catalog
def test_catalog_entries_name_the_official_files():
    """Every CCT and T2T-ViT entry is an official release URL in a format the family reads, with no invented hash:
    none is published, so the first download's is recorded (no hash prefix in the names either)."""
    cct = {n: vitkit.get_spec(n).weights for n in vitkit.list_models("cct*") if vitkit.get_spec(n).weights}
    assert sorted(cct) == ["cct_14_7x2_224", "cct_14_7x2_384", "cct_7_3x1_32", "cct_7_3x1_32_sine",
                           "cct_7_7x2_224_sine"]
    assert cct["cct_7_3x1_32_sine"].url == ("https://shi-labs.com/projects/cct/checkpoints/pretrained/"
                                            "cct_7_3x1_32_sine_cifar10_5000epochs.pth")  # src/cct.py model_urls
    assert cct["cct_7_7x2_224_sine"].num_classes == 102
    t2t = {n: vitkit.get_spec(n).weights for n in vitkit.list_models("t2t_vit*")}
    assert all(w is not None and w.checkpoint_key == "state_dict_ema" for w in t2t.values())
    assert t2t["t2t_vit_t_14"].url == "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/" \
                                      "81.7_T2T_ViTt_14.pth.tar"
    for name, w in {**cct, **t2t}.items():
        spec = vitkit.get_spec(name)
        assert w.source_format in [f.name for f in spec.formats], name
        assert w.url.startswith(("https://shi-labs.com/projects/cct/checkpoints/",
                                 "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"))
        assert w.sha256 is None and "-" not in cached_path(w).name, name
        assert w.num_classes == spec.config.get("num_classes", 1000), name


@pytest.mark.parametrize("name", ["dat_tiny", "dat_small", "dat_base", "dat_base_384", "dat_pp_tiny", "dat_pp_small",
                                  "dat_pp_base", "dat_pp_base_384"])
def test_dat_has_no_named_weights_and_the_error_names_the_official_page(name, home):
    assert vitkit.get_spec(name).weights is None
    commit = "32173fc" if name.startswith("dat_pp") else "566a593"
    with pytest.raises(ValueError) as e:
        vitkit.create_model(name, pretrained=True)
    message = str(e.value)
    assert f"https://github.com/LeapLabTHU/DAT/blob/{commit}/README.md#evaluate-pretrained-models" in message
    assert "share links" in message and "no stable download URL" in message and "pretrained=PATH" in message
    assert _files(home) == []
    with pytest.raises(ConfigError, match=rf"model.pretrained: true asks for the named weights of {name}.*"
                                          rf"LeapLabTHU/DAT/blob/{commit}"):
        resolve({"model": {"name": name, "pretrained": "true"}})


# ------------------------------------------------------------------------------------- download, verify, load
def test_cct_entry_downloads_records_its_hash_and_loads(home, servers, monkeypatch):
    meta = json.loads((CCT_CASE / "case.json").read_text())
    io = load_file(str(CCT_CASE / "io.safetensors"))
    blob = (CCT_CASE / "checkpoint.pth").read_bytes()
    server = _serve_entry(monkeypatch, servers, "cct_7_3x1_32", blob)
    model = vitkit.create_model("cct_7_3x1_32", pretrained=True, **CCT_KW)
    assert len(server.requests) == 1 and server.requests[0].endswith("/cct_7_3x1_32_cifar10_300epochs.pth")
    assert model.load_report.format == vitkit.get_spec("cct_7_3x1_32").weights.source_format == "official"
    assert _close(_logits(model, io["pixel_values"]), io["logits"], meta["atol"], meta["rtol"])
    dest = cached_path(vitkit.get_spec("cct_7_3x1_32").weights)
    assert dest.parent == home / "checkpoints" and dest.read_bytes() == blob
    record = dest.with_name(dest.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(blob).hexdigest()
    servers.pop().stop()  # offline from here: the cache, checked against the record
    again = vitkit.create_model("cct_7_3x1_32", pretrained=True, **CCT_KW)
    assert _close(_logits(again, io["pixel_values"]), io["logits"], meta["atol"], meta["rtol"])
    dest.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # damaged in the cache
    with pytest.raises(DownloadError, match="does not match the hash recorded when it was downloaded"):
        vitkit.create_model("cct_7_3x1_32", pretrained=True, **CCT_KW)


def test_a_later_download_must_match_the_recorded_hash(home, servers, monkeypatch):
    """After the cached file is deleted, the release is downloaded again and checked against the hash recorded at its
    first download: another file at the same URL is discarded, with the way to accept it."""
    blob = (CCT_CASE / "checkpoint.pth").read_bytes()
    _serve_entry(monkeypatch, servers, "cct_7_3x1_32", blob)
    vitkit.create_model("cct_7_3x1_32", pretrained=True, **CCT_KW)
    dest = cached_path(vitkit.get_spec("cct_7_3x1_32").weights)
    record = dest.with_name(dest.name + ".sha256")
    dest.unlink()
    other = (FAMILIES / "cct" / "data" / "official_cct_2_3x2_32_shrunk_sine" / "checkpoint.pth").read_bytes()
    _serve_entry(monkeypatch, servers, "cct_7_3x1_32", other)
    with pytest.raises(DownloadError) as e:
        vitkit.create_model("cct_7_3x1_32", pretrained=True, **CCT_KW)
    assert "recorded at its first download" in str(e.value) and f"delete {record}" in str(e.value)
    assert _files(home) == [record.name]  # nothing of the other file was kept
    _serve_entry(monkeypatch, servers, "cct_7_3x1_32", blob)  # the release as first downloaded: accepted
    vitkit.create_model("cct_7_3x1_32", pretrained=True, **CCT_KW)
    assert dest.read_bytes() == blob


def test_t2t_entry_loads_the_ema_weights_its_catalog_names(home, servers, monkeypatch):
    io = load_file(str(T2T_CASE / "io.safetensors"))
    blob = (T2T_CASE / "checkpoint.pth.tar").read_bytes()  # {'state_dict', 'state_dict_ema'}: different weights
    server = _serve_entry(monkeypatch, servers, "t2t_vit_7", blob)
    model = vitkit.create_model("t2t_vit_7", pretrained=True, **T2T_KW)
    assert server.requests[0].endswith("/71.7_T2T_ViT_7.pth.tar")
    assert model.load_report.container == "{'state_dict_ema': state_dict}"
    assert _close(_logits(model, io["pixel_values"]), io["logits_ema"])
    dest = cached_path(vitkit.get_spec("t2t_vit_7").weights)
    assert dest.name == "71.7_T2T_ViT_7.pth.tar"
    assert dest.with_name(dest.name + ".sha256").read_text().strip() == hashlib.sha256(blob).hexdigest()
    # the entry's checkpoint_key is what is loaded (an entry naming the other one loads that), and an explicit
    # checkpoint_key wins over the entry's
    spec = vitkit.get_spec("t2t_vit_7")
    other = dataclasses.replace(spec.weights, checkpoint_key="state_dict")
    monkeypatch.setitem(registry._REGISTRY, "t2t_vit_7", dataclasses.replace(spec, weights=other))
    raw = vitkit.create_model("t2t_vit_7", pretrained=True, **T2T_KW)
    assert _close(_logits(raw, io["pixel_values"]), io["logits_state_dict"])
    chosen = vitkit.create_model("t2t_vit_7", pretrained=True, checkpoint_key="state_dict_ema", **T2T_KW)
    assert _close(_logits(chosen, io["pixel_values"]), io["logits_ema"])
    assert len(server.requests) == 1  # one download; the rest came from the verified cache


# ---------------------------------------------------------------------------------------- the command line
@pytest.fixture
def cct_named(home, servers, monkeypatch):
    """``cct_namedtest``: cct_7_3x1_32 shrunk to the reference case's shape, its catalog entry served locally."""
    blob = (CCT_CASE / "checkpoint.pth").read_bytes()
    server = _serve_entry(monkeypatch, servers, "cct_7_3x1_32", blob, as_name="cct_namedtest", **CCT_KW)
    return server, vitkit.create_model("cct_namedtest", pretrained=(CCT_CASE / "checkpoint.pth")).eval()


@pytest.fixture
def image(tmp_path):
    from PIL import Image
    path = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(path)
    return path


@pytest.mark.parametrize("spelling", ["true", "True"])
def test_predict_pretrained_true_loads_the_named_weights(cct_named, image, capsys, spelling):
    server, reference = cct_named
    assert main(["predict", str(image), "--model", "cct_namedtest", "--pretrained", spelling, "--format", "json",
                 "--topk", "3", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(server.requests) == 1
    from vitkit.evaluate.predict import predict_files
    expected = predict_files(reference, [str(image)], topk=3)[0].to_dict()
    assert out[0]["topk"] == expected["topk"]


def test_eval_explain_export_bench_take_pretrained_true(cct_named, image, tmp_path, capsys):
    import argparse

    from vitkit.cli import bench, export
    server, reference = cct_named
    state = {k: v.clone() for k, v in reference.state_dict().items()}

    def same(model):
        return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert main(["eval", "--model", "cct_namedtest", "--pretrained", "true", "--set", "data.name=fake",
                 "data.img_size=32", "data.test_limit=8", "data.num_workers=0", "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_samples"] == 8
    assert main(["explain", str(image), "--model", "cct_namedtest", "--pretrained", "true", "--method", "gradcam",
                 "--out", str(tmp_path / "ex")]) == 0
    assert any((tmp_path / "ex").iterdir())
    target = export._target(argparse.Namespace(source="cct_namedtest", pretrained="true"))
    assert same(target.model) and target.checkpoint.endswith("cct_7_3x1_32_cifar10_300epochs.pth")
    model = bench.build_model(argparse.Namespace(model="cct_namedtest", pretrained="true", img_size=None), {})
    assert same(model)
    assert len(server.requests) == 1  # downloaded once, then the verified cache
    capsys.readouterr()


def test_pretrained_true_needs_a_variant_name(home, image, capsys):
    assert main(["predict", str(image), "--pretrained", "true"]) == 2
    assert "--pretrained true loads a variant's named weights: name the variant with --model" in capsys.readouterr().err
    assert main(["eval", "--pretrained", "true", "--set", "data.name=fake"]) == 2
    assert "name the variant with --model" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["model.pretrained=true", "model.pretrained=TRUE", 'model.pretrained="true"'])
def test_recipe_pretrained_true_builds_from_the_named_weights(cct_named, value):
    from vitkit.train.build import build_model
    from vitkit.train.config import load_recipe
    server, reference = cct_named
    cfg = load_recipe(None, ["model.name=cct_namedtest", value, "data.name=fake", "data.img_size=32"])
    assert cfg.model.pretrained is True
    model = build_model(cfg, num_classes=10)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert len(server.requests) == 1


def test_train_command_with_pretrained_true(cct_named, tmp_path):
    server, _ = cct_named
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: cct_namedtest}\n"
                      "data: {name: fake, img_size: 32, train_limit: 16, test_limit: 8, num_workers: 0, "
                      "val_fraction: 0.25}\n"
                      "train: {steps: 1, batch_size: 4, amp: none, threads: 1}\n"
                      "log: {progress: false, plots: false, tensorboard: false}\n")
    assert main(["train", str(recipe), "--set", "model.pretrained=true", "--out", str(tmp_path / "run")]) == 0
    assert "pretrained: true" in (tmp_path / "run" / "config.yaml").read_text()
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------------ vitkit models --pretrained
def test_models_pretrained_lists_sources_and_what_has_none(capsys):
    assert main(["models", "--pretrained", "cct*"]) == 0
    out = capsys.readouterr().out
    for name in ("cct_7_3x1_32", "cct_7_3x1_32_sine", "cct_7_7x2_224_sine", "cct_14_7x2_224", "cct_14_7x2_384"):
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert vitkit.get_spec(name).weights.url in line and "recorded at first download" in line
    assert "cct_2_3x2_32" not in out  # no published weights: not listed
    assert main(["models", "--pretrained", "t2t*", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 9 and all(r["checkpoint_key"] == "state_dict_ema" and r["format"] == "official" for r in rows)
    assert main(["models", "--pretrained", "dat*"]) == 0
    out = capsys.readouterr().out
    assert "no variant matching 'dat*' has named weights" in out and "no stable download" in out
    for name in vitkit.list_models("dat*"):
        assert f"  {name}: the official " in out and "LeapLabTHU/DAT/blob/" in out
    assert main(["models", "--pretrained", "cct_14_7x2_384", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("name,family,format,verified_by,source") and len(lines) == 2
    assert "finetuned/cct_14_7x2_384_imagenet.pth" in lines[1]


def test_hash_status_says_how_a_download_is_verified():
    from vitkit.specs import WeightSpec
    from vitkit.weights.hub import hash_status
    assert hash_status(WeightSpec("https://h/w.pth", "official", sha256="ab" * 32)) == "published sha256"
    assert hash_status(WeightSpec("https://h/deit_tiny_patch16_224-a1311bcf.pth", "official")) == \
        "sha256 prefix a1311bcf in its name"
    assert hash_status(WeightSpec("https://h/81.5_T2T_ViT_14.pth.tar", "official")) == \
        "sha256 recorded at first download"
    assert hash_status(WeightSpec("hf-hub:o/r", "timm", filename="model.safetensors")) == \
        "sha256 recorded at first download"
