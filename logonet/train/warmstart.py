"""Initialise a network from another model card (``logonet finetune --init``): SSL or a previous fine-tune.

Every tensor whose name and shape match is copied; the pre-training head (keys ``pretrain_head.*``) is never
copied (the paper drops it at fine-tuning, section 2 on pre-training). Mismatched tensors (e.g. a classifier with a different
number of organs) keep their fresh initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping

import torch
from torch import nn

from .. import modelcard
from ..errors import UserError

HEAD_PREFIX = "pretrain_head."


@dataclass
class InitReport:
    source: str
    loaded: int                       # tensors copied
    total: int                        # tensors in the target model's state dict
    skipped_head: int = 0             # pre-training head tensors ignored
    mismatched: List[str] = field(default_factory=list)  # same name, different shape
    missing: List[str] = field(default_factory=list)     # target tensors the source does not have

    def summary(self) -> str:
        return (f"initialised {self.loaded}/{self.total} tensors from {self.source} "
                f"({len(self.mismatched)} shape mismatches, {len(self.missing)} not in source, "
                f"{self.skipped_head} pre-training head tensors skipped)")


def load_matching(model: nn.Module, source: Mapping[str, torch.Tensor], source_name: str = "state dict") -> InitReport:
    """Copy every tensor of ``source`` whose name and shape match ``model``'s, except the pre-training head."""
    target = model.state_dict()
    update = {}
    report = InitReport(source=source_name, loaded=0, total=len(target))
    for key, value in source.items():
        if key.startswith(HEAD_PREFIX):
            report.skipped_head += 1
            continue
        if key not in target:
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append(key)
            continue
        update[key] = value.to(dtype=target[key].dtype)
    report.missing = [k for k in target if k not in update and k not in report.mismatched]
    if not update:
        raise UserError(f"{source_name} shares no tensor (same name and shape) with this model; "
                        "was it trained with a different architecture or preset?")
    model.load_state_dict(update, strict=False)
    report.loaded = len(update)
    return report


def init_from_card(model: nn.Module, spec: str) -> InitReport:
    """Load matching tensors from the model card ``spec`` (a folder, a training output folder, or ``demo``)."""
    card = modelcard.load_model(spec)
    return load_matching(model, card.state_dict(), str(card.path))
