"""Named pretrained weights: download once into a cache, verify, then work offline.

Cache root: ``$VITKIT_HOME``, else ``$XDG_CACHE_HOME/vitkit`` (``~/.cache/vitkit``); files live in
``<root>/checkpoints/``. A URL download streams into a ``.partial`` file, is checked (its full sha256 when the catalog
has one, else the hash prefix in the release file name, e.g. ``-a1311bcf.pth``, as ``torch.hub`` checks it) and only
then renamed to its final name, so a wrong hash or an interrupted transfer leaves nothing a later call would trust.
A release published with no hash at all (CCT's, T2T-ViT's files) cannot be checked the first time; the sha256 of that
first complete download is recorded beside it (``<file>.sha256``) before the file takes its final name, and every
later use, and any later download of it (after the cached file was deleted), is checked against that record; delete
the record too to accept a release its authors replaced. Hugging Face Hub files (``hf-hub:owner/repo``) go through
``huggingface_hub``; their sha256 is recorded beside them once downloaded, and later uses are checked against it. The
Hub is asked once, with a short timeout, before ``huggingface_hub`` (which retries an unreachable server for ~25 s) is
called, so offline use fails in seconds.

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

from vitkit.weights.load_report import CheckpointError

__all__ = ["cache_root", "cached_path", "resolve_pretrained", "download_url", "verify_cached", "sha256_file",
           "requests_named_weights", "no_named_weights_reason", "hash_status", "DownloadError", "HUB_TIMEOUT"]

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


def _write_record(record: Path, hexdigest: str) -> None:
    """Write ``<file>.sha256`` whole or not at all (a temporary name, then a rename)."""
    tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(hexdigest + "\n")
        os.replace(tmp, record)
    finally:
        if tmp.exists():
            tmp.unlink()


def requests_named_weights(value) -> bool:
    """True for ``pretrained=True`` and for the literal ``true`` (any case) a command line or a recipe gives as
    ``--pretrained`` / ``model.pretrained``: the catalog's named weights rather than a path (``./true`` is a path)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def no_named_weights_reason(spec) -> str | None:
    """Why a variant without a ``WeightSpec`` has none although its authors published weights (its family catalog's
    ``NO_STABLE_SOURCE``: the official page and why no file there can be a catalog entry), or None."""
    if spec.weights is not None:
        return None
    from vitkit.families import no_stable_source
    return no_stable_source(spec.family, spec.name)


def hash_status(weights) -> str:
    """How a download of ``weights`` is verified, in words (``vitkit models --pretrained``)."""
    if weights.sha256:
        return "published sha256"
    m = _HASH_IN_NAME.search(cached_path(weights).name)
    if m:
        return f"sha256 prefix {m.group(1)} in its name"
    return "sha256 recorded at first download"


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
                 timeout: float = 60.0, record: Path | None = None) -> Path:
    """Stream ``url`` to ``dest`` through a partial file; verify length and hash before the final rename.

    ``record``: a ``<file>.sha256`` to write the verified file's sha256 into before the rename (a release published
    without a hash: later uses are checked against it); when it exists already, ``expected`` is its hash and a
    mismatch names it."""
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
        _verify(url, digest.hexdigest(), expected, record)
        if record is not None:
            if expected is None:
                log.warning("%s has no published hash: its sha256 %s is recorded in %s, and every later use is "
                            "checked against it", url, digest.hexdigest(), record)
            _write_record(record, digest.hexdigest())
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


def _verify(url: str, actual: str, expected: tuple[str, bool] | None, record: Path | None = None) -> None:
    if expected is None:
        if record is None:
            log.warning("no hash known for %s; the file is not verified", url)
        return
    want, full = expected
    ok = actual == want if full else actual.startswith(want)
    if ok:
        return
    if record is not None and record.is_file():
        raise DownloadError(f"{url}: sha256 {actual} does not match the hash recorded at its first download ({want}, "
                            f"in {record}); the file was discarded. If its authors replaced the release, delete "
                            f"{record} to accept the new file")
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
        reason = no_named_weights_reason(spec)
        formats = " or ".join(f.name for f in spec.formats) or "any supported format"
        if reason:
            raise ValueError(f"{spec.name} has no named weights: {reason}. Download the file by hand and pass its "
                             f"path as pretrained=PATH (format {formats})")
        raise ValueError(f"{spec.name} has no default pretrained weights registered; pass a checkpoint path as "
                         f"pretrained=PATH (any supported format)")
    dest = cached_path(weights)
    if dest.is_file():
        verify_cached(weights, dest)
        log.info("using cached weights %s (verified)", dest)
        return str(dest)
    if weights.url.startswith("hf-hub:"):
        return str(_hf_download(weights, dest))
    expected = _expected_hash(weights, dest)
    if expected is not None:
        return str(download_url(weights.url, dest, expected, progress))
    # no published hash: the first complete download is recorded, a later one must match that record
    record = _record_path(dest)
    pinned = (record.read_text().strip().lower(), True) if record.is_file() else None
    return str(download_url(weights.url, dest, pinned, progress, record=record))
