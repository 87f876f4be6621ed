"""Where the bundled ``logonet`` core is, and how to launch it in a separate process.

LoGoNetLib and the ``logonet`` package are siblings in both layouts, so whoever can import one can import the
other and nothing edits ``sys.path``:

- installed extension: ``<qt-scripted-modules>/LoGoNetLib`` and ``<qt-scripted-modules>/logonet`` (that folder is
  on Slicer's Python path; the CMake lists install both there);
- a source checkout: ``<repo>/LoGoNetLib`` and ``<repo>/logonet`` (``<repo>`` on the Python path, docs/slicer.md).

Only torch-free core modules (``logonet.events``, ``logonet.cardschema``, ``logonet.atomic``, dataset
discovery and label names) are imported into Slicer's process; the work runs in ``PythonSlicer -m logonet``.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .errors import LoGoNetError

#: The folder that holds LoGoNetLib, the ``logonet`` package and the extension-level ``Resources``.
ROOT = Path(__file__).resolve().parent.parent

#: The GUI's device choices and what the worker's ``--device`` gets for each.
DEVICES = {"auto": "auto", "gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}


def core_root() -> Path:
    """The folder that contains the ``logonet`` package (a clear error when the extension is broken)."""
    if not (ROOT / "logonet" / "__init__.py").is_file():
        raise LoGoNetError(f"the bundled logonet package was not found in {ROOT}; reinstall the LoGoNet extension")
    return ROOT


def resources_dir() -> Path:
    """The extension-level ``Resources`` folder (model catalog, bundled demo model)."""
    return core_root() / "Resources"


def python_executable() -> str:
    """``PythonSlicer`` inside Slicer (it sets up library paths), else this interpreter."""
    exe_dir = Path(sys.executable).resolve().parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (exe_dir / name).is_file():
            return str(exe_dir / name)
    slicer = sys.modules.get("slicer")
    if getattr(slicer, "app", None) is not None:  # inside the Slicer application
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def logonet_command(python: Optional[str] = None) -> List[str]:
    """The command prefix that runs the bundled CLI: ``[PythonSlicer, -m, logonet]``."""
    return [python or python_executable(), "-m", "logonet"]


def subprocess_env(force_cpu: bool = False, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the worker: the bundled core first on PYTHONPATH; no CUDA when forced to CPU."""
    env = dict(os.environ if base is None else base)
    root = str(core_root())
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p != root])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    if force_cpu:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def fake_worker() -> Path:
    """The GPU-free stand-in for ``python -m logonet`` that the modules' self-tests run (``Testing/``)."""
    return Path(__file__).resolve().parent / "Testing" / "fake_logonet.py"


__all__ = ["ROOT", "DEVICES", "core_root", "resources_dir", "python_executable", "logonet_command",
           "subprocess_env", "fake_worker"]
