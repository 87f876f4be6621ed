"""Size presets for ULKANet/LoGoNet, as small config tables (timm style).

``S`` and ``L`` are the paper's (Table 10 of Karimi Monsefi et al., KDD 2024). ``T`` is ours: small enough to train on a CPU in
minutes (tests, the bundled demo model). Each tuple has one entry per encoder stage; dims double per stage,
as the decoder's channel plan requires.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class ULKAPreset:
    dims: Tuple[int, ...]
    depths: Tuple[int, ...]
    mlp_ratios: Tuple[int, ...]
    #: how many encoder stages each local network of LoGoNet keeps
    local_stages: int = 2


PRESETS: Dict[str, ULKAPreset] = {
    "T": ULKAPreset(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), mlp_ratios=(4, 4, 4, 4)),
    "S": ULKAPreset(dims=(64, 128, 256, 512), depths=(3, 4, 6, 3), mlp_ratios=(8, 8, 4, 4)),
    "L": ULKAPreset(dims=(96, 192, 384, 768), depths=(3, 3, 24, 3), mlp_ratios=(8, 8, 4, 4)),
}
DEFAULT_PRESET = "S"


def get_preset(name: str) -> ULKAPreset:
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
