"""The pre-training head (paper section 2): backbone output map -> per-slice cluster logits.

Used only during masked self-supervised pre-training and dropped at fine-tuning (its keys start with
``pretrain_head.``, which ``finetune --init`` skips). Kept small on purpose: each slice's in-plane map is
average-pooled to a ``C``-vector (optionally a ``grid x grid`` map), normalised, and one zero-initialised linear
layer gives ``N * K_max`` logits. Logits of cluster ids a clusterer does not have (``k >= K_n``) are ``-inf``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PretrainHead(nn.Module):
    """``(B, C, X, Y, Z)`` full-resolution features -> logits ``(B, S, N, K_max)`` along ``slice_axis``.

    Args:
        in_channels: channels ``C`` of the backbone output.
        ks: number of clusters ``K_n`` of every clusterer (``N = len(ks)``, ``K_max = max(ks)``).
        slice_axis: spatial axis (0, 1, 2 = X, Y, Z) whose slices are the sequence.
        grid: in-plane pooling grid per slice (1 = one vector per slice).
    """

    def __init__(self, in_channels: int, ks: Sequence[int], slice_axis: int = 2, grid: int = 1) -> None:
        super().__init__()
        if not ks or min(ks) < 1:
            raise ValueError(f"every clusterer needs at least one cluster, got ks={list(ks)}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        self.ks = [int(k) for k in ks]
        self.k_max = max(self.ks)
        self.slice_axis = slice_axis
        self.grid = int(grid)
        features = in_channels * self.grid * self.grid
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, len(self.ks) * self.k_max)
        # Zero init: training starts from uniform predictions (loss = mean log K_n). A random init divided by the
        # small temperature (tau = 0.1) would start far more confident, and wrong, than chance.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        invalid = torch.arange(self.k_max)[None, :] >= torch.tensor(self.ks)[:, None]  # (N, K_max)
        # Derived from ks, so not saved: the card's weights hold only learnt tensors.
        self.register_buffer("invalid", invalid, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        seq = features.movedim(2 + self.slice_axis, 2)  # (B, C, S, H, W)
        batch, channels, slices = seq.shape[:3]
        pooled = F.adaptive_avg_pool3d(seq, (slices, self.grid, self.grid))  # (B, C, S, g, g)
        vectors = pooled.permute(0, 2, 1, 3, 4).reshape(batch, slices, -1)  # (B, S, C*g*g)
        logits = self.proj(self.norm(vectors)).view(batch, slices, len(self.ks), self.k_max)
        return logits.masked_fill(self.invalid, float("-inf"))
