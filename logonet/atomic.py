"""Files that appear complete or not at all: a temp file next to the target, fsync, one ``os.replace``.

Standard library only, so every part of the core (and the Slicer side) can use it without importing
torch or MONAI. Also the output checks every command makes *before* it reads a model or a volume
(:func:`check_output_file`, :func:`check_output_folder`), so a bad output path costs no work.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

from .errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

#: Temp names carry the writer's process id (``.<name>.<pid>.<random>.tmp``), so a later run can tell a file
#: left by a killed process from one a concurrent process is still writing.
_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plain ``open()``/``mkdir()`` would give under the current umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def temp_prefix(path: PathLike) -> str:
    """Prefix of temp files/folders for ``path``: hidden, with this process's id (see :func:`clean_stale_temps`)."""
    return f".{Path(path).name}.{os.getpid()}."


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is synced); no-op where unsupported."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """Flush a written file to disk; a full disk or I/O error surfaces here as ``OSError``, before any replace."""
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds the file gets ordinary permissions, is
    flushed to disk and replaces ``path`` in one ``os.replace``. On any error it is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, ordinary_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(data: Any, path: PathLike) -> Path:
    """Write ``data`` as indented JSON with :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: PathLike) -> List[Path]:
    """Remove temp files/folders that a killed writer left in ``folder`` (its process is gone); returns them.

    Temps of live processes (a concurrent run writing into the same folder) are left alone.
    """
    removed: List[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        match = _TEMP_RE.match(item.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
            removed.append(item)
    return removed


# ----------------------------------------------------------------------------------------------------------
# output checks: before any model or volume is read
# ----------------------------------------------------------------------------------------------------------
def check_name_encodable(path: PathLike, what: str) -> None:
    """Refuse a path that is not valid UTF-8 (undecodable bytes): ITK/SimpleITK abort on it in C++."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise UserError(f"{what} {shown}: the name is not valid UTF-8; rename it (or its folder)") from None


def _existing_ancestor(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        if current.is_symlink():  # a dangling link: writing would follow it elsewhere
            raise UserError(f"{current} is a broken symbolic link; remove it or choose another path")
        current = current.parent
    return current


def check_writable_folder(folder: PathLike, what: str) -> Path:
    """The folder (or the nearest existing folder above it, which would hold it) must accept a new file.

    Tried for real with a temp file, so a read-only mount, missing permissions or a file in the way are all
    found here, with the reason, before any work is done. Nothing is left behind.
    """
    folder = Path(folder)
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise UserError(f"{what} {folder}: {base} is a file, not a folder; choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix("write-check"), suffix=".tmp", dir=str(base))
    except OSError as error:
        raise UserError(f"{what} {folder}: cannot write into {base} ({os_reason(error)}); "
                        "choose a folder you can write to") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return base


def check_output_file(path: PathLike, what: str = "OUTPUT", suffixes: Optional[Sequence[str]] = None,
                      inputs: Sequence[PathLike] = ()) -> Path:
    """An output file path is usable: encodable name, not a folder, not one of ``inputs`` (also via a link),
    a known suffix (when ``suffixes`` is given) and a writable folder to hold it."""
    path = Path(path)
    check_name_encodable(path, what)
    if suffixes is not None and not any(path.name.lower().endswith(s) for s in suffixes):
        raise UserError(f"{what} {path} must end in one of {', '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise UserError(f"{what} {path} is the input image itself; choose another output path or folder")
    check_writable_folder(path.parent, what)
    return path


def check_output_folder(path: PathLike, what: str = "--out") -> Path:
    """An output folder path is usable: encodable name, not an existing file, creatable and writable."""
    path = Path(path)
    check_name_encodable(path, what)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is an existing file, not a folder; choose another path")
    check_writable_folder(path, what)
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Same file by path (after links) or by inode (a hard link)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def prepare_run_folder(out: PathLike, what: str = "--out") -> Path:
    """One call at the start of ``finetune``/``pretrain``: the output folder is usable, and temp files a
    killed earlier run left there (e.g. a half-written checkpoint) are removed."""
    path = check_output_folder(out, what)
    clean_stale_temps(path)
    return path


_OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many symbolic links",
    errno.EIO: "input/output error",
}

#: ``OSError`` numbers that describe the user's machine or paths, not a bug: the CLI reports them in one line.
USER_OS_ERRNOS = frozenset(_OS_REASONS)


def os_reason(error: OSError) -> str:
    """A short reason for an ``OSError`` ("no space left on the device")."""
    return _OS_REASONS.get(error.errno or -1, error.strerror or type(error).__name__)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
