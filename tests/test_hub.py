"""Named pretrained weights: download → verify → cache → offline, against a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit import registry
from vitkit.registry import WeightSpec
from vitkit.weights.hub import DownloadError, cached_path

from conftest import require

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=5)


class _Server:
    """Serves ``files`` (path → bytes); paths in ``truncate`` announce the full length but send half and hang up.
    ``headers`` are added to every answer (e.g. the Hub's ``X-Repo-Commit`` and ``ETag``); HEAD answers like GET
    without a body. GET requests are recorded in ``requests``, HEAD requests in ``heads``."""

    def __init__(self, files: dict[str, bytes], truncate: set[str] = frozenset(), headers: dict[str, str] = None):
        self.files, self.truncate, self.requests, self.heads = files, truncate, [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body_too: bool):
                (server.requests if body_too else server.heads).append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if body_too:
                    self.wfile.write(body[: len(body) // 2] if self.path in server.truncate else body)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._answer(body_too=True)

            def do_HEAD(self):  # noqa: N802
                self._answer(body_too=False)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def source(tmp_path):
    """A tiny model and its state dict as the bytes of a safetensors file."""
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY).eval()
    torch.nn.init.normal_(model.head.weight)
    path = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path.read_bytes()


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("VITKIT_HOME", str(root))
    return root


def _register(monkeypatch, weights: WeightSpec) -> str:
    base = vitkit.get_spec("vit_tiny_patch16_224")
    spec = dataclasses.replace(base, name="vit_hubtest", config={**base.config, **TINY}, weights=weights)
    monkeypatch.setitem(registry._REGISTRY, "vit_hubtest", spec)
    return "vit_hubtest"


def _cache_files(root):
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_download_then_cache_hit_offline(source, home, monkeypatch):
    model, blob = source
    server = _Server({"/w/tiny.safetensors": blob})
    name = _register(monkeypatch, WeightSpec(url=f"{server.url}/w/tiny.safetensors", source_format="timm",
                                             sha256=hashlib.sha256(blob).hexdigest(), filename="tiny.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    try:
        first = vitkit.create_model(name, pretrained=True).eval()
    finally:
        server.stop()
    assert server.requests == ["/w/tiny.safetensors"]
    assert _cache_files(home) == ["tiny.safetensors"]
    torch.testing.assert_close(first(x), model(x), rtol=0, atol=0)
    again = vitkit.create_model(name, pretrained=True).eval()  # the server is gone: must come from the cache
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_hash_prefix_in_release_name_is_checked(source, home, monkeypatch):
    """Release files named like torch.hub's convention (``name-<sha256 prefix>.pth``) are checked by that prefix."""
    model, blob = source
    good = f"tiny-{hashlib.sha256(blob).hexdigest()[:8]}.safetensors"
    server = _Server({f"/{good}": blob, "/tiny-deadbeef.safetensors": blob})
    try:
        name = _register(monkeypatch, WeightSpec(url=f"{server.url}/{good}", source_format="timm"))
        vitkit.create_model(name, pretrained=True)
        assert good in _cache_files(home)
        monkeypatch.delitem(registry._REGISTRY, "vit_hubtest")
        name = _register(monkeypatch, WeightSpec(url=f"{server.url}/tiny-deadbeef.safetensors", source_format="timm"))
        with pytest.raises(DownloadError, match="prefix deadbeef"):
            vitkit.create_model(name, pretrained=True)
    finally:
        server.stop()
    assert _cache_files(home) == [good]


def test_wrong_hash_leaves_nothing(source, home, monkeypatch):
    _, blob = source
    server = _Server({"/w.safetensors": blob})
    name = _register(monkeypatch, WeightSpec(url=f"{server.url}/w.safetensors", source_format="timm",
                                             sha256="0" * 64, filename="w.safetensors"))
    try:
        with pytest.raises(DownloadError, match="does not match"):
            vitkit.create_model(name, pretrained=True)
    finally:
        server.stop()
    assert _cache_files(home) == []


def test_truncated_transfer_leaves_nothing(source, home, monkeypatch):
    _, blob = source
    server = _Server({"/w.safetensors": blob}, truncate={"/w.safetensors"})
    name = _register(monkeypatch, WeightSpec(url=f"{server.url}/w.safetensors", source_format="timm",
                                             sha256=hashlib.sha256(blob).hexdigest(), filename="w.safetensors"))
    try:
        with pytest.raises(DownloadError):
            vitkit.create_model(name, pretrained=True)
    finally:
        server.stop()
    assert _cache_files(home) == []


def test_offline_error_names_url_and_destination(home, monkeypatch):
    server = _Server({})
    url = f"{server.url}/missing.pth"
    server.stop()  # nothing listens there any more
    name = _register(monkeypatch, WeightSpec(url=url, source_format="official", filename="missing.pth"))
    with pytest.raises(DownloadError) as err:
        vitkit.create_model(name, pretrained=True)
    dest = cached_path(vitkit.get_spec(name).weights)
    assert url in str(err.value) and str(dest) in str(err.value)
    assert str(dest).startswith(str(home))


def test_catalog_names_only_known_releases():
    """Every DeiT release in the catalog carries the hash prefix of its official file name; no invented hashes."""
    for name in vitkit.list_models("deit*"):
        w = vitkit.get_spec(name).weights
        if w is None:
            continue
        assert w.url.startswith("https://dl.fbaipublicfiles.com/deit/") and w.sha256 is None
        assert w.url.endswith(w.filename) and "-" in w.filename
    assert vitkit.get_spec("deit_tiny_patch16_224").weights.filename == "deit_tiny_patch16_224-a1311bcf.pth"
    assert vitkit.get_spec("vit_base_patch16_224").weights.url.startswith("hf-hub:timm/vit_base_patch16_224.")


def test_pretrained_true_through_a_hub_style_repository(source, home, monkeypatch):
    """``hf-hub:owner/repo`` weights (timm's ViT ports) through the real huggingface_hub client, against a local
    stand-in of the Hub's ``/{repo}/resolve/{revision}/{file}`` endpoint; then offline from vitkit's cache."""
    constants = require("huggingface_hub.constants")
    model, blob = source
    commit = hashlib.sha1(b"vitkit test repository").hexdigest()
    repo, path = "timm/vit_hubtest.augreg_in21k", "/timm/vit_hubtest.augreg_in21k/resolve/main/model.safetensors"
    server = _Server({path: blob}, headers={"X-Repo-Commit": commit,
                                            "ETag": f'"{hashlib.sha256(blob).hexdigest()}"'})
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    name = _register(monkeypatch, WeightSpec(url=f"hf-hub:{repo}", source_format="timm",
                                             filename="model.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    try:
        first = vitkit.create_model(name, pretrained=True).eval()
    finally:
        server.stop()
    assert server.requests.count(path) == 1  # one download, from the repository's resolve endpoint (the client
    assert path in server.heads  # asked for its metadata first; it may also query other /api routes)
    dest = cached_path(vitkit.get_spec(name).weights)
    assert str(dest).startswith(str(home)) and dest.is_file(), f"the file is not at vitkit's cache path {dest}"
    assert dest.read_bytes() == blob
    assert first.load_report.format == "timm"
    torch.testing.assert_close(first(x), model(x), rtol=0, atol=0)
    again = vitkit.create_model(name, pretrained=True).eval()  # the stand-in is gone: vitkit's cache answers
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)

