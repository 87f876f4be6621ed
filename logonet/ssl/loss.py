"""The pre-training loss (paper Eq. 4-5): cross-entropy of the cluster ids of masked slices, all clusterers.

``L = mean over masked slices s and clusterers n of -log softmax(logits[s, n] / tau)[target[s, n]]``.
The temperature ``tau`` divides the logits (Eq. 5), default 0.1 per the paper; unmasked slices do not count.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError


def masked_cluster_loss(logits: torch.Tensor, targets: torch.Tensor, slice_mask: torch.Tensor,
                        tau: float = 0.1) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Eq. 4-5 over the masked slices.

    Args:
        logits: ``(B, S, N, K)`` cluster scores (``-inf`` where a clusterer has fewer than K clusters).
        targets: ``(B, S, N)`` int64 cluster ids of the unmasked slices.
        slice_mask: ``(B, S)`` bool, True for masked slices.
        tau: temperature (> 0).

    Returns:
        ``(loss, metrics)``: the scalar loss (0 with a graph when no slice is masked) and
        ``{"cluster_acc": share of (masked slice, clusterer) pairs whose arg-max is the target,
        "masked_slices": count}``.
    """
    if tau <= 0:
        raise UserError(f"the temperature tau must be positive, got {tau}")
    if logits.shape[:3] != targets.shape or targets.shape[:2] != slice_mask.shape:
        raise ValueError(f"shapes do not fit: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {tuple(slice_mask.shape)}")
    picked = logits[slice_mask].float()  # (M, N, K), in float32 so -inf/tau and log-softmax stay exact
    if picked.numel() == 0:
        # Zero that still reaches every parameter (DDP wants a gradient for all), without -inf * 0 = NaN.
        return picked.sum() * 0.0, {"masked_slices": 0.0}
    wanted = targets[slice_mask].reshape(-1)
    scores = (picked / tau).reshape(wanted.numel(), -1)
    loss = F.cross_entropy(scores, wanted)
    with torch.no_grad():
        acc = (scores.argmax(-1) == wanted).float().mean().item()
    return loss, {"cluster_acc": acc, "masked_slices": float(picked.shape[0])}
