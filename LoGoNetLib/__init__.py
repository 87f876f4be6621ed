"""The Slicer-side library shared by the LoGoNetSegment and LoGoNetTrain modules (one copy, imported by both).

It lives beside the modules, not inside one: installed in ``<qt-scripted-modules>/LoGoNetLib`` (LoGoNetLib/
CMakeLists.txt), next to the ``logonet`` core, and imported by plain ``import LoGoNetLib``. Each module keeps its
own logic and panel in ``<Module>Lib`` next to its module file.

Nothing here imports Qt at import time and nothing heavy (torch, MONAI) is imported at all: the work runs in a
separate ``PythonSlicer -m logonet ...`` process and these helpers only launch it, read its progress lines and
move data between the MRML scene and files.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import List, Sequence

#: The submodules, in dependency order (the modules' ``onReload`` reloads them in this order).
SUBMODULES = ("errors", "core", "messages", "process", "catalog", "download", "install", "worker", "scene",
              "parameters", "gui")


def reload_submodules(package: str = __name__, submodules: Sequence[str] = SUBMODULES) -> List[ModuleType]:
    """Reload ``package``'s submodules in the given (dependency) order, so an edited helper takes effect without
    restarting Slicer (Slicer's "Reload" reloads only the module file itself). Returns the new modules."""
    reloaded = []
    for name in submodules:
        full = f"{package}.{name}"
        module = sys.modules.get(full)
        reloaded.append(importlib.import_module(full) if module is None else importlib.reload(module))
    return reloaded


def reload_libraries(*packages: str) -> List[ModuleType]:
    """Developer mode's "Reload" of a module: LoGoNetLib first, then the module's own library ``packages``
    (each names its submodules in ``SUBMODULES``)."""
    reloaded = reload_submodules()
    for package in packages:
        module = importlib.import_module(package)
        reloaded += reload_submodules(package, module.SUBMODULES)
    return reloaded
