"""Models by URL: download a zipped model card, verify its SHA-256, unpack it safely, cache it.

How TotalSegmentator and MONAIAuto3DSeg deliver their models. Every step works in a private folder next to the
cache (same file system), and only a verified, complete card is moved into place with one rename; a wrong
checksum, a truncated download or an archive with unsafe names raises :class:`LoGoNetError` and leaves
nothing behind. Only ``https`` URLs are fetched (``http`` only from this machine, for tests and local mirrors).
Pure Python (urllib, zipfile): runs inside Slicer without extra packages.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from logonet.cardschema import META

from .errors import LoGoNetError

CHUNK = 1 << 20
#: Refuse archives that would unpack to more than this (a "zip bomb"); LoGoNet-L in fp32 is ~0.3 GB.
MAX_UNPACKED_BYTES = 8 << 30
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

Progress = Callable[[int, Optional[int]], None]


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in LOOPBACK:
        return url
    raise LoGoNetError(f"refusing to download {url!r}: only https URLs are allowed")


def download(url: str, dest: Path, sha256: str, progress: Optional[Progress] = None, timeout: float = 60.0) -> Path:
    """Stream ``url`` into ``dest`` while hashing it; a short or wrong file is deleted and raises."""
    check_url(url)
    digest, received, total = hashlib.sha256(), 0, None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "LoGoNet-Slicer"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as handle:  # noqa: S310
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress is not None:
                progress(0, total)
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as error:
                    received += len(error.partial)
                    raise LoGoNetError(f"the download of {url} was cut off after {received} of {total} bytes; "
                                        "try again") from error
                if not chunk:
                    break
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
    except LoGoNetError:
        dest.unlink(missing_ok=True)
        raise
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError is an OSError
        dest.unlink(missing_ok=True)
        raise LoGoNetError(f"downloading {url} failed: {error}") from error
    if total is not None and received != total:
        dest.unlink(missing_ok=True)
        raise LoGoNetError(f"the download of {url} was cut off after {received} of {total} bytes; try again")
    if digest.hexdigest() != sha256.lower():
        dest.unlink(missing_ok=True)
        raise LoGoNetError(f"the file downloaded from {url} has the wrong checksum (SHA-256 {digest.hexdigest()}, "
                            f"expected {sha256.lower()}); it was deleted")
    return dest


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a zip into ``dest``, refusing absolute names, ``..`` parts, drive letters, links and zip bombs."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise LoGoNetError(f"{archive.name} would unpack to more than {MAX_UNPACKED_BYTES >> 30} GB")
            root = dest.resolve()
            for member in members:
                name = member.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                mode = member.external_attr >> 16
                if (name.startswith("/") or ".." in parts or any(":" in p for p in parts)
                        or stat.S_ISLNK(mode)):
                    raise LoGoNetError(f"{archive.name} holds an unsafe entry {member.filename!r}; nothing was "
                                        "unpacked")
                target = (root / name).resolve()
                if target != root and root not in target.parents:
                    raise LoGoNetError(f"{archive.name} holds an unsafe entry {member.filename!r}; nothing was "
                                        "unpacked")
            for member in members:
                target = root / member.filename.replace("\\", "/")
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
    except zipfile.BadZipFile as error:
        raise LoGoNetError(f"{archive.name} is not a zip archive: {error}") from error


def _card_root(folder: Path) -> Path:
    """The card inside an unpacked archive: at its top, or in its only top-level folder."""
    if (folder / META).is_file():
        return folder
    children = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and children[0].is_dir() and (children[0] / META).is_file():
        return children[0]
    raise LoGoNetError(f"the archive holds no {META} (expected a LoGoNet model card folder)")


def install_model_zip(url: str, sha256: str, target: Path, check_card: Callable[[Path], object],
                      progress: Optional[Progress] = None, timeout: float = 60.0) -> Path:
    """Download, verify and unpack the zipped card at ``url`` into ``target`` (returned). ``check_card(folder)``
    raises :class:`LoGoNetError` for a card that cannot be used (the catalog passes its ``read_card``: this
    module knows archives, not cards). On any error nothing is left: neither the archive nor a partial folder."""
    target = Path(target)
    if (target / META).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=str(target.parent)))
    try:
        archive = download(url, work / "model.zip", sha256, progress=progress, timeout=timeout)
        unpacked = work / "unpacked"
        unpacked.mkdir()
        safe_extract(archive, unpacked)
        card = _card_root(unpacked)
        try:
            check_card(card)
        except LoGoNetError as error:
            raise LoGoNetError(f"the downloaded model is not usable: {error}") from error
        os.replace(card, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


__all__ = ["download", "safe_extract", "install_model_zip", "check_url"]
