"""Slicer-side helpers shared by the LoGoNetSegment and LoGoNetTrain modules (one copy, imported by both).

Nothing here imports Qt at import time and nothing heavy (torch, MONAI) is imported at all: the work runs in a
separate ``PythonSlicer -m logonet ...`` process and these helpers only launch it, read its progress lines and
move data between the MRML scene and files.
"""
from __future__ import annotations

#: The Lib submodules, in dependency order (the modules' ``onReload`` reloads them in this order).
SUBMODULES = ("core", "messages", "gui", "process", "catalog", "download", "install", "scene", "parameters",
              "dicomseg", "segmentlogic", "trainlogic")


def reload_submodules():
    """Developer mode's "Reload": reload every Lib submodule in dependency order, so that an edited helper takes
    effect without restarting Slicer (Slicer reloads only the module file itself). Returns the new modules."""
    import importlib
    import sys

    reloaded = []
    for name in SUBMODULES:
        full = f"{__name__}.{name}"
        module = sys.modules.get(full)
        reloaded.append(importlib.import_module(full) if module is None else importlib.reload(module))
    return reloaded
