"""The progress protocol shared by the CLI, training and the Slicer modules.

With ``--progress jsonl`` long work prints one JSON object per line on stdout::

    {"event": "<name>", "step": i, "total": n, ...metrics}

``event`` is always present; ``step``/``total`` are present for countable work; any other keys are metrics
(numbers or strings). Well-known events: ``start``, ``stage`` (a named phase began, key ``stage``),
``progress`` (a step of the current stage), ``epoch`` (end of a training epoch: ``loss``, optional ``dice``),
``checkpoint`` (``path``), ``warning`` (``message``), ``done`` (``outputs``/timings), ``error`` (``message``).
Without ``--progress jsonl`` a human gets tqdm bars on stderr and log lines instead. ``warning`` events
always reach stderr, also with ``--progress none`` and off a terminal (a skipped file must never go unsaid).
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any, Dict, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

#: The keys every event line may carry besides metrics.
RESERVED_KEYS = ("event", "step", "total", "time")


def _jsonable(value: Any) -> Any:
    """Make numbers from numpy/torch plain, and NaN/inf valid JSON (null)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            value = str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class ProgressReporter:
    """Emit progress either as JSON lines (machine-readable) or as tqdm bars and log lines (human).

    One reporter is passed down through segment/finetune/pretrain/bench so that every long loop
    reports the same way. ``mode`` is ``"jsonl"``, ``"tqdm"`` (default for terminals) or ``"none"``.
    """

    def __init__(self, mode: str = "tqdm", stream: Optional[IO[str]] = None) -> None:
        if mode not in ("jsonl", "tqdm", "none"):
            raise ValueError(f"progress mode must be 'jsonl', 'tqdm' or 'none', got {mode!r}")
        self.mode = mode
        self.stream = stream if stream is not None else (sys.stdout if mode == "jsonl" else sys.stderr)
        self._t0 = time.monotonic()

    def emit(self, event: str, step: Optional[int] = None, total: Optional[int] = None, **metrics: Any) -> None:
        """Report one event. In human mode only ``warning``, ``error``, ``stage``, ``epoch`` and ``done`` print."""
        if self.mode == "none":
            if event == "warning":  # silence is for progress, never for what went wrong
                sys.stderr.write(f"[logonet] warning: {metrics.get('message', '')}".rstrip() + "\n")
                sys.stderr.flush()
            return
        if self.mode == "jsonl":
            record: Dict[str, Any] = {"event": event}
            if step is not None:
                record["step"] = int(step)
            if total is not None:
                record["total"] = int(total)
            record["time"] = round(time.monotonic() - self._t0, 3)
            for key, value in metrics.items():
                if key in RESERVED_KEYS:
                    raise ValueError(f"metric name {key!r} is reserved by the progress protocol")
                record[key] = _jsonable(value)
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
            return
        if event in ("warning", "error", "stage", "epoch", "done", "start", "checkpoint"):
            parts = [f"{k}={_format(v)}" for k, v in metrics.items()]
            where = f" {step}/{total}" if step is not None and total is not None else ""
            self.stream.write(f"[logonet] {event}{where} {' '.join(parts)}".rstrip() + "\n")
            self.stream.flush()

    def iterate(self, items: Iterable[T], total: Optional[int] = None, desc: str = "", event: str = "progress",
                **metrics: Any) -> Iterator[T]:
        """Wrap a loop: a tqdm bar for humans, one ``event`` line per item in jsonl mode."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        if self.mode == "tqdm":
            from tqdm.auto import tqdm

            yield from tqdm(items, total=total, desc=desc, file=self.stream, leave=False)
            return
        for i, item in enumerate(items):
            yield item
            self.emit(event, step=i + 1, total=total, stage=desc, **metrics)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def parse_event_line(line: str) -> Optional[Dict[str, Any]]:
    """Parse one stdout line of a ``--progress jsonl`` run; ``None`` for lines that are not events.

    Used by the Slicer modules' background reader: a subprocess may also print plain log lines.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "event" not in record:
        return None
    return record


def reporter_for(mode: Optional[str]) -> ProgressReporter:
    """``--progress`` -> reporter; default: tqdm on a terminal, silent otherwise."""
    if mode is None:
        mode = "tqdm" if sys.stderr.isatty() else "none"
    return ProgressReporter(mode)
