"""Networks: LKA3D, ULKANet, LoGoNet and a registry that also builds the paper's MONAI baselines."""
from __future__ import annotations

from .lka import LKA3D, LKABlock
from .logonet import LoGoNet
from .presets import PRESETS, get_preset
from .registry import ModelInfo, available_models, build_model, model_info, parse_spec
from .ulkanet import ULKANet, ULKASubNet

__all__ = ["LKA3D", "LKABlock", "LoGoNet", "ULKANet", "ULKASubNet", "PRESETS", "get_preset", "available_models",
           "build_model", "ModelInfo", "model_info", "parse_spec"]
