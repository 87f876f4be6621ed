"""Where and how tensors run: device choice, mixed precision (AMP) and seeds.

Shared by inference (:mod:`logonet.infer`), training (:mod:`logonet.train`) and the benchmarks; it imports
nothing else from the package but :mod:`logonet.errors`, so every layer may use it.
"""
from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np
import torch

from .errors import UserError


def select_device(preference: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``; ``"cuda"``/``"cuda:N"`` (UserError if absent)."""
    preference = (preference or "auto").lower()
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {preference} was requested but no CUDA GPU is available; "
                            "use --device cpu or --device auto")
        return torch.device(preference)
    raise UserError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``amp`` in auto|bf16|fp16|off.

    CUDA: ``auto`` = bf16 where supported, else fp16. CPU: only an explicit ``bf16`` autocasts (about 1.7x
    faster on CPUs with AMX/AVX512-BF16, slower on older ones, so ``auto`` stays fp32 there).
    """
    amp = (amp or "auto").lower()
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"unknown AMP mode {amp!r}: use auto, bf16, fp16 or off")
    if amp == "off":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if amp == "bf16" and device.type == "cpu" else None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` when ``dtype`` is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
