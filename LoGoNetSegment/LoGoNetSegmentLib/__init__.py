"""LoGoNetSegment's own code: its logic (volume -> ``logonet segment`` -> segmentation), its panel and the
DICOM SEG export. Shared helpers come from the top-level LoGoNetLib."""
from __future__ import annotations

#: The submodules, in dependency order (for the module's ``onReload``).
SUBMODULES = ("dicomseg", "logic", "widget")
