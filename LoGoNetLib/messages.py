"""What the panels show: the worker's ``--progress jsonl`` events as sentences a radiologist reads, and a
throttle so the GUI is updated a few times per second instead of once per sliding window.

Pure Python (no Qt, no Slicer): the logics call it, the tests check it.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional

#: Status words for the worker's stage keys (``logonet segment``/``finetune``/``pretrain`` and the logics' own).
STAGE_WORDS: Dict[str, str] = {
    "start": "Starting",
    "load_model": "Loading the model",
    "engine": "Preparing the CPU engine (the first run exports the model)",
    "read": "Reading the CT",
    "preprocess": "Preparing the CT",
    "inference": "Segmenting",
    "cases": "Segmenting",
    "postprocess": "Cleaning up the result",
    "write": "Saving the result",
    "importing": "Adding the segmentation to the scene",
    "done": "Finished",
    "resume": "Resuming from the checkpoint",
    "scan": "Checking the volumes",
    "validation": "Checking the model on the validation cases",
    "cache": "Preparing the training data",
    "pseudolabels": "Preparing the pre-training targets",
}


def stage_words(stage: Optional[str]) -> str:
    """A stage key in words; unknown keys are made readable instead of shown raw."""
    if not stage:
        return ""
    key = str(stage)
    if key in STAGE_WORDS:
        return STAGE_WORDS[key]
    if key.startswith("epoch"):
        return "Training"
    return key.replace("_", " ").capitalize()


def describe_event(event: Mapping) -> Optional[str]:
    """One log sentence for an event, or ``None`` for events that only move a progress bar (one per window)."""
    kind = event.get("event")
    if kind == "start":
        device = event.get("device")
        return "Worker started" + (f" on {device}." if device else ".")
    if kind == "stage":
        text = stage_words(event.get("stage"))
        if event.get("stage") == "resume" and event.get("epoch") is not None:
            return f"{text} (after epoch {event['epoch']})."
        return f"{text}..." if text else None
    if kind == "epoch":
        parts = [f"Epoch {event.get('step')}/{event.get('total')}"]
        if isinstance(event.get("loss"), (int, float)):
            parts.append(f"loss {event['loss']:.4f}")
        if isinstance(event.get("dice"), (int, float)):
            parts.append(f"validation Dice {event['dice']:.3f}")
        if isinstance(event.get("best_dice"), (int, float)):
            parts.append(f"best {event['best_dice']:.3f}")
        return ", ".join(parts) + "."
    if kind == "checkpoint":
        return None  # every epoch writes one; the stop/finish messages name it
    if kind == "warning":
        return f"Warning: {event.get('message')}"
    if kind == "error":
        return f"Error: {event.get('message')}"
    if kind == "done":
        return "The worker finished."
    return None  # "progress" and anything new: the bar shows it


class Throttle:
    """``ready()`` is True at most once per ``interval_s`` (and always when forced): a few GUI updates a second."""

    def __init__(self, interval_s: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: Optional[float] = None

    def ready(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


__all__ = ["STAGE_WORDS", "stage_words", "describe_event", "Throttle"]
