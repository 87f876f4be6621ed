"""Where the bundled ``logonet`` core is, and how to launch it in a separate process.

Installed extension: ``<qt-scripted-modules>/logonet`` next to ``LoGoNetSegment.py`` (the LoGoNetSegment
CMakeLists bundles it there). Developer mode / a source checkout: ``<repo>/logonet`` next to the
``LoGoNetSegment`` folder. Only the light ``logonet.events`` module is ever imported into Slicer's process.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

_HERE = Path(__file__).resolve().parent


def core_root() -> Path:
    """The folder that contains the ``logonet`` package (raises a clear error when the extension is broken)."""
    for candidate in (_HERE.parent, _HERE.parent.parent):
        if (candidate / "logonet" / "__init__.py").is_file():
            return candidate
    raise RuntimeError(f"the bundled logonet package was not found next to {_HERE.parent}; "
                       "reinstall the LoGoNet extension")


def resources_dir() -> Path:
    """The extension-level ``Resources`` folder (model catalog, bundled demo model)."""
    return core_root() / "Resources"


def ensure_core_importable() -> None:
    """Put the bundled ``logonet`` on ``sys.path`` (developer mode) so ``logonet.events`` can be imported."""
    root = str(core_root())
    if root not in sys.path:
        sys.path.insert(0, root)


def parse_event_line(line: str) -> Optional[Dict]:
    """:func:`logonet.events.parse_event_line`, the one parser of the progress protocol."""
    ensure_core_importable()
    from logonet.events import parse_event_line as parse

    return parse(line)


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
