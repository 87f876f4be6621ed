"""Checks of the training commands' numeric options (``--spacing``, ``--roi``)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..errors import UserError


def triple_argument(values: Optional[Sequence[float]], name: str, default: Sequence[float]) -> Tuple[float, float, float]:
    """``--name`` given as 1 or 3 numbers (or not at all) -> three floats."""
    if values is None:
        return tuple(float(v) for v in default)  # type: ignore[return-value]
    if len(values) == 1:
        values = list(values) * 3
    if len(values) != 3:
        raise UserError(f"--{name} takes 1 or 3 numbers, got {len(values)}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def roi_argument(values: Optional[List[int]], default: int = 96) -> Tuple[int, int, int]:
    """``--roi`` (1 or 3 ints) -> a 3-tuple whose sides are multiples of 32, else UserError."""
    values = list(values) if values else [default]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UserError(f"--roi takes 1 or 3 numbers, got {len(values)}")
    roi = tuple(int(v) for v in values)
    if any(r < 32 or r % 32 for r in roi):
        raise UserError(f"--roi {roi}: every side must be a multiple of 32 (the networks downsample 32x)")
    return roi  # type: ignore[return-value]
