"""Checked downloads and safe archive extraction (used by the CIFAR datasets).

Conventions: a download goes to a temporary ``<name>.<random>.part`` file beside its destination and is renamed only
after its MD5 matched (the canonical CIFAR checksums are MD5s, as published by the dataset authors and checked by
torchvision), so an interrupted or corrupt download never looks present. Extraction refuses absolute paths, ``..``
components, links and device files, applies Python's ``tarfile`` ``data`` filter where available, unpacks into a
temporary folder and moves the result into place only when everything was extracted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

from ..progress import progress as bar_for

__all__ = ["DownloadError", "UnsafeArchiveError", "md5sum", "download_url", "safe_extract"]

log = logging.getLogger(__name__)


class DownloadError(ValueError):
    """A download failed or its checksum did not match."""


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target folder or is not a plain file or folder."""


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def download_url(url: str, dest: str | os.PathLike, md5: str | None = None, *, progress: bool = True,
                 timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` through a temporary file; raise ``DownloadError`` (leaving nothing) on failure."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, dest.name, progress, timeout)
        if md5 is not None and digest != md5:
            raise DownloadError(f"checksum mismatch for {url}: expected md5 {md5}, got {digest}")
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DownloadError(f"cannot download {url}: {e}") from e
        raise
    log.info("downloaded %s to %s", url, dest)
    return dest


def _stream(url: str, out, name: str, progress: bool, timeout: float) -> str:
    """Copy the response body to ``out`` with a progress bar (plain lines off a terminal); return its MD5."""
    h = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with bar_for(enabled=progress, total=total, unit="B", unit_scale=True, desc=name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    path = PurePosixPath(member.name.replace("\\", "/"))
    drive = bool(path.parts) and ":" in path.parts[0]  # a Windows drive such as C:
    if path.is_absolute() or drive or ".." in path.parts:
        raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r} (absolute path or '..')")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r} (links and devices are not allowed)")


def safe_extract(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Extract a tar archive into ``dest_dir``; returns the top-level paths created.

    Raises ``UnsafeArchiveError`` before writing anything if any member is unsafe, and ``FileExistsError`` if a
    top-level entry already exists.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            _check_member(m, archive)
        tops = sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})
        for top in tops:
            if (dest_dir / top).exists():
                raise FileExistsError(f"cannot extract {archive}: {dest_dir / top} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
        try:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
            for top in tops:
                os.replace(tmp / top, dest_dir / top)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [dest_dir / t for t in tops]
