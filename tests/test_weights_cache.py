"""The weights cache is verified, not trusted: a cached file is hashed again before use and a
mismatch is refused with the way to repair it; Hub downloads record their hash; offline, the Hub fails in seconds.

Every server here is on 127.0.0.1 (a tiny stand-in for the Hub's resolve endpoint, or a port that refuses or never
answers); the real catalog URLs are never contacted (a cached file is checked before any download is tried)."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit import registry
from vitkit.registry import WeightSpec
from vitkit.weights import hub
from vitkit.weights.hub import DownloadError, cached_path

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=5)
REPO = "timm/vit_cachetest.tag"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def blob(tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


def register(monkeypatch, weights: WeightSpec) -> str:
    base = vitkit.get_spec("vit_tiny_patch16_224")
    spec = dataclasses.replace(base, name="vit_cachetest", config={**base.config, **TINY}, weights=weights)
    monkeypatch.setitem(registry._REGISTRY, "vit_cachetest", spec)
    return "vit_cachetest"


def test_a_different_file_in_the_deit_cache_path_is_refused(home, blob):
    """The issue's case: another file copied to ~/.cache/vitkit/checkpoints/deit_tiny_patch16_224-a1311bcf.pth."""
    dest = cached_path(vitkit.get_spec("deit_tiny_patch16_224").weights)
    assert dest.name == "deit_tiny_patch16_224-a1311bcf.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(blob)  # a valid checkpoint file, just not the release
    with pytest.raises(DownloadError) as e:
        vitkit.create_model("deit_tiny_patch16_224", pretrained=True)
    message = str(e.value)
    assert str(dest) in message and "hash prefix in its name (a1311bcf)" in message
    assert f"rm '{dest}'" in message and "\n" not in message


def test_catalog_hash_checked_on_every_use(home, blob, monkeypatch):
    name = register(monkeypatch, WeightSpec(url="http://127.0.0.1:9/never", source_format="timm",
                                            sha256=hashlib.sha256(blob).hexdigest(), filename="w.safetensors"))
    dest = cached_path(vitkit.get_spec(name).weights)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(blob)
    vitkit.create_model(name, pretrained=True)  # the right file: used
    dest.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # one bit flipped
    with pytest.raises(DownloadError, match="does not match the expected hash"):
        vitkit.create_model(name, pretrained=True)


class FakeHub:
    """Answers ``/{repo}/resolve/main/{file}`` as the Hub does for a stored file (HEAD: commit, ETag, size), or
    never answers at all (``hang``)."""

    def __init__(self, files: dict[str, bytes], hang: bool = False):
        self.files, self.hang, self.requests = files, hang, []
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _head(self):
                hub_.requests.append((self.command, self.path))
                if hub_.hang:
                    time.sleep(30)
                    return None
                body = hub_.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.end_headers()
                return body

            def do_HEAD(self):  # noqa: N802
                self._head()

            def do_GET(self):  # noqa: N802
                body = self._head()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_hub_download_records_its_hash_and_later_uses_check_it(home, blob, monkeypatch):
    pytest.importorskip("huggingface_hub")
    server = FakeHub({f"/{REPO}/resolve/main/model.safetensors": blob})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    name = register(monkeypatch, WeightSpec(url=f"hf-hub:{REPO}", source_format="timm", filename="model.safetensors"))
    try:
        vitkit.create_model(name, pretrained=True)
    finally:
        server.stop()
    dest = cached_path(vitkit.get_spec(name).weights)
    assert dest.read_bytes() == blob
    assert (dest.parent / "model.safetensors.sha256").read_text().strip() == hashlib.sha256(blob).hexdigest()
    vitkit.create_model(name, pretrained=True)  # the server is gone: the cached, verified file
    dest.write_bytes(blob[:100] + b"\0" + blob[101:])
    with pytest.raises(DownloadError, match="does not match the hash recorded when it was downloaded"):
        vitkit.create_model(name, pretrained=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.serial
@pytest.mark.parametrize("how", ["refused", "no answer", "HF_HUB_OFFLINE"])
def test_offline_hub_fails_in_seconds(home, monkeypatch, how):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "HUB_TIMEOUT", 2.0)
    server = None
    if how == "refused":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    elif how == "no answer":
        server = FakeHub({}, hang=True)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
    else:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = register(monkeypatch, WeightSpec(url=f"hf-hub:{REPO}", source_format="timm", filename="model.safetensors"))
    start = time.monotonic()
    try:
        with pytest.raises(DownloadError) as e:
            vitkit.create_model(name, pretrained=True)
    finally:
        if server:
            server.stop()
    seconds = time.monotonic() - start
    assert seconds < 2.0 + 3.0, f"{how}: {seconds:.1f} s"
    dest = cached_path(vitkit.get_spec(name).weights)
    assert str(dest) in str(e.value) and "without network" in str(e.value)
    assert {"no answer": "no answer within 2 s", "HF_HUB_OFFLINE": "HF_HUB_OFFLINE is set"}.get(how, "") in str(e.value)
    assert not dest.exists()
