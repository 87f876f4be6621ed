"""Sequence masking of 3-D crops (paper section 2, "Masked LoGoNet").

The slices of a crop along one spatial axis form a sequence. Each slice is an *anchor* with probability
``phi1``; an anchor and its ``M - 1`` preceding slices are masked. A masked slice draws a patch size ``P``
from ``patch_sizes``, is cut into a grid of ``P x P`` patches, and each patch is zeroed with probability
``phi2`` (SimMIM-style). Unmasked slices are left bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from ..errors import UserError

#: The paper's patch sizes; a size larger than the slice clips to the slice (the whole slice is one patch).
PAPER_PATCH_SIZES: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 96)


@dataclass(frozen=True)
class MaskingConfig:
    """Settings of the sequence masking; the defaults are the paper's.

    ``slice_axis`` is a *spatial* axis (0, 1 or 2) of a ``(B, C, X, Y, Z)`` crop: 2 = the last axis, which
    is the axial (superior-inferior) axis of RAS-oriented volumes.
    """

    phi1: float = 0.1
    chain: int = 5
    phi2: float = 0.7
    patch_sizes: Tuple[int, ...] = field(default=PAPER_PATCH_SIZES)
    slice_axis: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.phi1 <= 1.0 or not 0.0 <= self.phi2 <= 1.0:
            raise UserError(f"masking probabilities must lie in [0, 1], got phi1={self.phi1}, phi2={self.phi2}")
        if self.chain < 1:
            raise UserError(f"the masked chain length M must be at least 1, got {self.chain}")
        if not self.patch_sizes or any(int(p) < 1 for p in self.patch_sizes):
            raise UserError(f"patch sizes must be positive integers, got {self.patch_sizes}")
        if self.slice_axis not in (0, 1, 2):
            raise UserError(f"slice axis must be 0, 1 or 2 (a spatial axis), got {self.slice_axis}")


def slice_mask(batch: int, slices: int, phi1: float, chain: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Which slices are masked: anchors with probability ``phi1``, each masking itself and ``chain - 1`` slices before.

    Returns a bool tensor ``(batch, slices)`` on the CPU. Slice ``s`` is masked iff an anchor lies in
    ``[s, s + chain - 1]``, so away from the last ``chain - 1`` slices the masked share is ``1 - (1 - phi1)^chain``.
    """
    anchors = torch.rand(batch, slices, generator=generator) < phi1
    # Pad the end so that unfold gives, for every slice s, the window of anchors s .. s+chain-1.
    padded = torch.nn.functional.pad(anchors.to(torch.uint8), (0, chain - 1))
    return padded.unfold(1, chain, 1).amax(dim=-1).bool()


def patch_mask(masked: torch.Tensor, plane: Tuple[int, int], phi2: float, patch_sizes: Sequence[int],
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Voxels to zero: for each masked slice, one patch size and a Bernoulli(``phi2``) draw per patch.

    ``masked`` is ``(B, S)`` bool; ``plane`` the in-plane shape ``(H, W)``. Returns bool ``(B, S, H, W)`` on the CPU,
    all False on unmasked slices.
    """
    batch, slices = masked.shape
    height, width = plane
    choice = torch.randint(len(patch_sizes), (batch, slices), generator=generator)
    zero = torch.zeros(batch, slices, height, width, dtype=torch.bool)
    for index, size in enumerate(patch_sizes):
        # One random grid per size for all slices (vectorised); each slice keeps the grid of its own size.
        ph, pw = min(int(size), height), min(int(size), width)
        gh, gw = -(-height // ph), -(-width // pw)
        grid = torch.rand(batch, slices, gh, gw, generator=generator) < phi2
        full = grid.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)[:, :, :height, :width]
        zero |= full & (choice == index)[:, :, None, None]
    return zero & masked[:, :, None, None]


def mask_crop(crop: torch.Tensor, config: MaskingConfig = MaskingConfig(),
              generator: Optional[torch.Generator] = None, fill: float = 0.0
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch of crops.

    Args:
        crop: ``(B, C, X, Y, Z)`` float tensor (any device).
        config: masking settings (``slice_axis`` picks X, Y or Z as the sequence axis).
        generator: a CPU ``torch.Generator`` for reproducible masks.
        fill: value written into zeroed patches (0 = air after the [-1000, 1000] -> [0, 1] window).

    Returns:
        ``(masked_crop, slice_mask)``: the masked copy ``(B, C, X, Y, Z)`` and the bool per-slice mask ``(B, S)``
        on ``crop.device``, where ``S`` is the crop's size along the slice axis.
    """
    if crop.dim() != 5:
        raise UserError(f"masking expects a (B, C, X, Y, Z) crop, got shape {tuple(crop.shape)}")
    dim = 2 + config.slice_axis
    seq = crop.movedim(dim, 2)  # (B, C, S, H, W)
    batch, _, slices, height, width = seq.shape
    masked = slice_mask(batch, slices, config.phi1, config.chain, generator)
    zero = patch_mask(masked, (height, width), config.phi2, config.patch_sizes, generator)
    out = seq.masked_fill(zero[:, None].to(crop.device), fill).movedim(2, dim)
    return out.contiguous(), masked.to(crop.device)
