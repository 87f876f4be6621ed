"""LoGoNetTrain's own code: its logic (``logonet finetune``/``pretrain`` runs, the live chart, "Add to training
set") and its panel. Shared helpers come from the top-level LoGoNetLib."""
from __future__ import annotations

#: The submodules, in dependency order (for the module's ``onReload``).
SUBMODULES = ("logic", "widget")
