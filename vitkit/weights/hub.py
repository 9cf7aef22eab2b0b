"""Named pretrained weights: download once into a cache, verify, then work offline.

Cache root: ``$VITKIT_HOME``, else ``$XDG_CACHE_HOME/vitkit`` (``~/.cache/vitkit``); files live in
``<root>/checkpoints/``. A URL download streams into a ``.partial`` file, is checked (its full sha256 when the catalog
has one, else the hash prefix in the release file name, e.g. ``-a1311bcf.pth``, as ``torch.hub`` checks it) and only
then renamed to its final name, so a wrong hash or an interrupted transfer leaves nothing a later call would trust.
Hugging Face Hub files (``hf-hub:owner/repo``) go through ``huggingface_hub``; their sha256 is recorded beside them
(``<file>.sha256``) once downloaded. The Hub is asked once, with a short timeout, before ``huggingface_hub`` (which
retries an unreachable server for ~25 s) is called, so offline use fails in seconds.

The cache is verified, not trusted: a cached file is hashed again before every use and compared with the catalog's
hash, the prefix in its name, or the hash recorded after its verified download; a mismatch is an error that says how
to repair the cache (delete the file to download it again).
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from vitkit.weights.report import CheckpointError

__all__ = ["cache_root", "cached_path", "resolve_pretrained", "download_url", "verify_cached", "sha256_file",
           "DownloadError", "HUB_TIMEOUT"]

log = logging.getLogger(__name__)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torch.hub's convention for release file names
_CHUNK = 1 << 20
HUB_TIMEOUT = 5.0  # seconds to wait for the Hub to answer before calling it offline


class DownloadError(CheckpointError):
    """Weights could not be downloaded or failed verification."""


def cache_root() -> Path:
    if os.environ.get("VITKIT_HOME"):
        return Path(os.environ["VITKIT_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitkit"


def cached_path(weights) -> Path:
    """Where the file of a ``WeightSpec`` lives (and where a user may put it by hand)."""
    if weights.url.startswith("hf-hub:"):
        repo = weights.url[len("hf-hub:"):]
        return cache_root() / "checkpoints" / repo.replace("/", "--") / (weights.filename or "model.safetensors")
    return cache_root() / "checkpoints" / (weights.filename or weights.url.rsplit("/", 1)[-1])


def _expected_hash(weights, path: Path) -> tuple[str, bool] | None:
    """(hex, is_full) to check against the file's sha256, or None when nothing is known."""
    if weights.sha256:
        return weights.sha256.lower(), True
    m = _HASH_IN_NAME.search(path.name)
    return (m.group(1), False) if m else None


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached(weights, path: Path) -> None:
    """Hash a cached file and compare it with what is known of it; refuse a mismatch with the way to repair it."""
    expected = _expected_hash(weights, path)
    record = _record_path(path)
    if expected is None and record.is_file():
        expected = (record.read_text().strip().lower(), True)
    if expected is None:
        log.warning("%s: no hash is known for this file (put there by hand?); it is used unverified", path)
        return
    actual, (want, full) = sha256_file(path), expected
    if not (actual == want if full else actual.startswith(want)):
        what = "the hash recorded when it was downloaded" if record.is_file() and not weights.sha256 else (
            "the expected hash" if full else "the hash prefix in its name")
        raise DownloadError(f"the cached weights {path} are damaged or another file: sha256 {actual[:16]}... does "
                            f"not match {what} ({want[:16]}); delete the file (rm '{path}') and load again to download "
                            f"it, or put the right file there")


def download_url(url: str, dest: Path, expected: tuple[str, bool] | None, progress: bool = True,
                 timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` through a partial file; verify length and hash before the final rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(partial, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            received = _copy(resp, out, digest, total, progress, dest.name)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise DownloadError(f"{url}: transfer interrupted ({received} of {total} bytes)")
        _verify(url, digest.hexdigest(), expected)
        os.replace(partial, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(f"could not download {url} ({e}); without network, download it elsewhere and put it "
                            f"at {dest}") from None
    finally:
        if partial.exists():
            partial.unlink()
    return dest


def _copy(resp, out, digest, total: int | None, progress: bool, name: str) -> int:
    from vitkit.progress import progress as bar_for
    received = 0
    with bar_for(enabled=progress, total=total, unit="B", unit_scale=True, desc=name, leave=False) as bar:
        while chunk := resp.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def _verify(url: str, actual: str, expected: tuple[str, bool] | None) -> None:
    if expected is None:
        log.warning("no hash known for %s; the file is not verified", url)
        return
    want, full = expected
    ok = actual == want if full else actual.startswith(want)
    if not ok:
        raise DownloadError(f"{url}: sha256 {actual} does not match the expected "
                            f"{'hash' if full else 'prefix'} {want}; the file was discarded")


def _hub_reachable(url: str, timeout: float) -> str | None:
    """None when the server behind ``url`` answers an HTTP HEAD within ``timeout`` seconds (any status: a 401 or 404
    is for huggingface_hub to report), else why not."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"no answer within {timeout:g} s" if "timed out" in str(reason) else str(reason)


def _hf_download(weights, dest: Path) -> Path:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise DownloadError(f"{weights.url} needs huggingface_hub (pip install 'vitkit[hub]'), or put "
                            f"{weights.filename} from that repository at {dest}") from None
    repo, filename = weights.url[len("hf-hub:"):], weights.filename or "model.safetensors"
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/{filename}"
    offline = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE") in (
        "1", "true", "TRUE", "yes") else _hub_reachable(url, HUB_TIMEOUT)
    if offline:
        raise DownloadError(f"could not download {url} ({offline}); without network, download it elsewhere and put "
                            f"it at {dest}")
    try:
        path = Path(hf_hub_download(repo, filename, local_dir=str(dest.parent), endpoint=endpoint,
                                    etag_timeout=HUB_TIMEOUT))
    except Exception as e:  # huggingface_hub raises many error types (offline, 404, auth)
        raise DownloadError(f"could not download {url} ({type(e).__name__}); without network, put the file at "
                            f"{dest}") from None
    _record_path(path).write_text(sha256_file(path) + "\n")  # what later uses check the cached file against
    return path


def resolve_pretrained(spec, progress: bool = True) -> str:
    """Local path of ``spec``'s default weights, downloading and verifying them on first use."""
    weights = spec.weights
    if weights is None:
        raise ValueError(f"{spec.name} has no default pretrained weights registered; pass a checkpoint path as "
                         f"pretrained=PATH (any supported format)")
    dest = cached_path(weights)
    if dest.is_file():
        verify_cached(weights, dest)
        log.info("using cached weights %s (verified)", dest)
        return str(dest)
    if weights.url.startswith("hf-hub:"):
        return str(_hf_download(weights, dest))
    return str(download_url(weights.url, dest, _expected_hash(weights, dest), progress))
