"""Files that appear complete or not at all: a temp file next to the target, fsync, one ``os.replace``.

Standard library only, so every part of the core (and the Slicer side) can use it without importing
torch or MONAI.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plain ``open()``/``mkdir()`` would give under the current umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds the file gets ordinary permissions, is
    flushed to disk and replaces ``path`` in one ``os.replace``. On any error it is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, ordinary_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(data: Any, path: PathLike) -> Path:
    """Write ``data`` as indented JSON with :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return Path(path)
