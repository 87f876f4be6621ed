"""The model card's schema: what a ``model.json`` must hold and which folder a model name or path means.

The one place that knows it. :mod:`logonet.modelcard` (which loads the weights with torch) and the Slicer
modules' model catalog (which lists models inside Slicer's own process, where torch must not be imported) both
read cards through here. Standard library only (plus :mod:`logonet.errors`): importing this module never
imports torch, MONAI or numpy.

A card folder holds ``model.json`` and ``weights.safetensors`` (docs/interfaces.md). A training run's output
folder stands for one of its cards: ``best/`` (the best validation score), else ``last/`` (the last finished
epoch: a run stopped before its first validation, or one whose validation never gave a score, has only this).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Union

from .errors import UserError

FORMAT = "logonet-model"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
META = "model.json"
#: Where bundled models live in a source checkout / the Slicer extension (``<root>/Resources/Models``).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
#: The cards a training run's output folder may hold, in the order a run folder is resolved to them.
RUN_CARDS = ("best", "last")

PathLike = Union[str, "os.PathLike[str]"]

#: Bounds on every card field that sizes work (issue 15): a card outside them is refused with the field named,
#: before anything is allocated (a huge window tried to allocate petabytes; a tiny spacing failed deep in MONAI).
ROI_SIDE_RANGE = (1, 512)  # voxels per window side
SPACING_RANGE_MM = (0.1, 20.0)
INTENSITY_LIMIT = 1e5  # |HU| of the window's ends
MAX_CHANNELS = 1024  # network outputs (classes, or a pre-training feature width)
MAX_IN_CHANNELS = 16
MAX_LABEL_VALUE = 65535  # label maps are written as uint16 at most


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON's NaN/Infinity extensions and booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(path: Path, message: str) -> UserError:
    return UserError(f"{path / META}: {message}")


def _check_architecture(meta: Dict[str, Any], path: Path) -> int:
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _fail(path, '"architecture" must be an object with a "name"')
    out_channels = arch.get("out_channels")
    if not _is_int(out_channels) or not 1 <= out_channels <= MAX_CHANNELS:
        raise _fail(path, f'"architecture.out_channels" must be an integer from 1 to {MAX_CHANNELS}, got {out_channels!r}')
    in_channels = arch.get("in_channels", 1)
    if not _is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise _fail(path, f'"architecture.in_channels" must be an integer from 1 to {MAX_IN_CHANNELS}, '
                          f"got {in_channels!r}")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise _fail(path, '"architecture.kwargs" must be an object')
    return out_channels


def _check_labels(meta: Dict[str, Any], path: Path, out_channels: int) -> None:
    labels = meta.get("labels", [])
    if not isinstance(labels, list):
        raise _fail(path, '"labels" must be a list')
    seen = set()
    for entry in labels:
        if not isinstance(entry, dict) or not _is_int(entry.get("value")) \
                or not 1 <= entry["value"] <= MAX_LABEL_VALUE or not isinstance(entry.get("name"), str):
            raise _fail(path, f'every label needs an integer "value" from 1 to {MAX_LABEL_VALUE} and a "name"; '
                              f"got {entry!r}")
        if entry["value"] in seen:
            raise _fail(path, f'label value {entry["value"]} appears twice')
        seen.add(entry["value"])
        color = entry.get("color", [128, 128, 128])
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise _fail(path, f'label {entry["name"]!r}: "color" must be three integers 0-255')
    # Segmentation cards: one channel per label plus background. Pre-training cards carry no labels.
    if labels and len(labels) != out_channels - 1:
        raise _fail(path, f"{len(labels)} labels but the network predicts {out_channels} channels "
                          f"(expected {out_channels - 1} labels + background)")


def _check_preprocessing(meta: Dict[str, Any], path: Path) -> None:
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        raise _fail(path, '"preprocessing" must be an object')
    spacing, window, roi = pre.get("spacing"), pre.get("intensity_window"), pre.get("roi_size")
    low_mm, high_mm = SPACING_RANGE_MM
    if not (isinstance(spacing, list) and len(spacing) == 3
            and all(_is_number(v) and low_mm <= v <= high_mm for v in spacing)):
        raise _fail(path, f'"preprocessing.spacing" must be three numbers from {low_mm} to {high_mm} mm, got {spacing!r}')
    if not (isinstance(window, list) and len(window) == 2
            and all(_is_number(w) and abs(w) <= INTENSITY_LIMIT for w in window) and window[0] < window[1]):
        raise _fail(path, f'"preprocessing.intensity_window" must be [low, high] with low < high, both within '
                          f"+-{INTENSITY_LIMIT:g}, got {window!r}")
    low_roi, high_roi = ROI_SIDE_RANGE
    if not (isinstance(roi, list) and len(roi) == 3 and all(_is_int(r) and low_roi <= r <= high_roi for r in roi)):
        raise _fail(path, f'"preprocessing.roi_size" must be three integers from {low_roi} to {high_roi} '
                          f"(voxels per window side), got {roi!r}")


def validate_meta(meta: Any, path: Path) -> Dict[str, Any]:
    """Check ``model.json`` against the schema in docs/interfaces.md; one clear error for the first problem."""
    if not isinstance(meta, dict):
        raise _fail(path, "must be a JSON object")
    if meta.get("format") != FORMAT:
        raise _fail(path, f'"format" must be "{FORMAT}" (this is not a logonet model card)')
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise _fail(path, f'"format_version" {version!r} is not supported (this logonet reads up to '
                          f"{FORMAT_VERSION}); update logonet")
    out_channels = _check_architecture(meta, path)
    _check_labels(meta, path, out_channels)
    _check_preprocessing(meta, path)
    overlap = meta.get("metrics", {}).get("val_overlap") if isinstance(meta.get("metrics"), dict) else None
    if overlap is not None and not (_is_number(overlap) and 0.0 <= overlap < 1.0):
        raise _fail(path, f'"metrics.val_overlap" must be a number in [0, 1), got {overlap!r}')
    _check_postprocessing(meta, path)
    return meta


def _check_postprocessing(meta: Dict[str, Any], path: Path) -> None:
    """``postprocessing.largest_component``: organ values of this card (``logonet postprocess`` writes it)."""
    post = meta.get("postprocessing")
    if post is None:
        return
    if not isinstance(post, dict):
        raise _fail(path, '"postprocessing" must be an object')
    values = post.get("largest_component", [])
    organs = {entry.get("value") for entry in meta["labels"]} - {0}
    if not isinstance(values, list) or not all(_is_int(v) and v in organs for v in values):
        raise _fail(path, f'"postprocessing.largest_component" must list organ values of this card\'s labels, '
                          f"got {values!r}")


def card_folder(path: PathLike) -> Path:
    """A card folder as given, or a training run's output folder resolved to its card (see :data:`RUN_CARDS`).

    Anything else is returned unchanged, so that :func:`read_meta` can say what is wrong with it."""
    path = Path(path).expanduser()
    if (path / META).is_file():
        return path
    for sub in RUN_CARDS:
        if (path / sub / META).is_file():
            return path / sub
    return path


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The validated ``model.json`` of the card folder ``path`` (not resolved: see :func:`card_folder`), after
    checking that its weights file is there. The weights themselves are not read (that needs torch)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path} does not exist; give a model card folder or 'demo'")
    if not path.is_dir() or not (path / META).is_file():
        raise UserError(f"{path} is not a model card: expected a folder with {META} and {WEIGHTS} "
                        f"(or a training output folder with {' or '.join(s + '/' for s in RUN_CARDS)})")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(path, f"is not valid JSON ({error})") from error
    except OSError as error:  # permissions, a broken network share
        raise _fail(path, f"cannot be read ({error.strerror or error})") from error
    validate_meta(meta, path)
    if not (path / WEIGHTS).is_file():
        raise UserError(f"the model card {path} has no {WEIGHTS}")
    return meta


def require_labels(meta: Dict[str, Any], path: PathLike) -> List[Dict[str, Any]]:
    """The card's organ labels; a pre-training card (no labels) cannot segment, and says so."""
    labels = meta.get("labels") or []
    if not labels:
        raise UserError(f"{path} is a pre-training model card without organ labels; it cannot segment: "
                        "fine-tune it on labeled cases first")
    return list(labels)


def bundled_names(bundled_dir: Path = BUNDLED_DIR) -> List[str]:
    """The names of the bundled models (folders of ``bundled_dir`` that hold a ``model.json``)."""
    if not bundled_dir.is_dir():
        return []
    return sorted(p.name for p in bundled_dir.iterdir() if (p / META).is_file())


def resolve(spec: PathLike, bundled_dir: Path = BUNDLED_DIR) -> Path:
    """Turn ``--model`` into a card folder: a bundled name (``"demo"``), a card folder, or a training output
    folder (resolved by :func:`card_folder`). An existing path is returned even when it is no card, so that
    :func:`read_meta` names its problem."""
    text = str(spec)
    candidate = Path(text).expanduser()
    if candidate.exists():
        return card_folder(candidate)
    bundled = bundled_dir / text
    if "/" not in text and os.sep not in text and (bundled / META).is_file():
        return bundled
    known = bundled_names(bundled_dir)
    raise UserError(f"model {text!r} not found: give a model card folder (with {META} and {WEIGHTS})"
                    + (f" or one of the bundled models: {', '.join(known)}" if known else ""))


__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS", "META", "BUNDLED_DIR", "RUN_CARDS", "ROI_SIDE_RANGE",
           "SPACING_RANGE_MM", "INTENSITY_LIMIT", "MAX_CHANNELS", "MAX_IN_CHANNELS", "MAX_LABEL_VALUE",
           "validate_meta", "card_folder", "read_meta", "require_labels", "bundled_names", "resolve"]
