"""Slicer-side helpers shared by the LoGoNetSegment and LoGoNetTrain modules (one copy, imported by both).

Nothing here imports Qt at import time and nothing heavy (torch, MONAI) is imported at all: the work runs in a
separate ``PythonSlicer -m logonet ...`` process and these helpers only launch it, read its progress lines and
move data between the MRML scene and files.
"""
from __future__ import annotations

#: The Lib submodules, in dependency order (the modules' ``onReload`` reloads them in this order).
SUBMODULES = ("core", "process", "catalog", "install", "scene", "segmentlogic", "trainlogic")
