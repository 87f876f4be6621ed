"""Networks: LKA3D, ULKANet, LoGoNet and a registry that also builds the paper's MONAI baselines."""
from __future__ import annotations

from .lka import LKA3D, LKABlock
from .logonet import LoGoNet
from .presets import PRESETS, get_preset
from .registry import available_models, build_model
from .ulkanet import ULKANet, ULKASubNet

__all__ = ["LKA3D", "LKABlock", "LoGoNet", "ULKANet", "ULKASubNet", "PRESETS", "get_preset", "available_models",
           "build_model"]
