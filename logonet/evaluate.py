"""``logonet evaluate PRED REF``: per-organ Dice and 95th-percentile Hausdorff distance (MONAI metrics).

Both label maps are read with their geometry. A prediction on another grid is refused (a silent resample
gave Dice 0.40 for a 0.91 prediction); ``--resample`` puts it onto the reference's grid (nearest neighbour)
on purpose. Negative, fractional or image-like values (a CT given as the reference) are refused. By default the organs present in the reference are scored; the mean is
over those. Output: a table on stdout and, with ``--csv``, the same rows in a CSV file.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .errors import UserError


def score(pred: np.ndarray, ref: np.ndarray, values: Sequence[int], spacing: Sequence[float],
          names: Optional[Mapping[int, str]] = None, hausdorff: bool = True) -> List[Dict[str, Any]]:
    """Per-label rows ``{value, name, dice, hd95_mm, ref_voxels, pred_voxels}``.

    pred/ref: integer arrays of the same shape (any axis order, with ``spacing`` in that order).
    Dice of a label absent from both is NaN (not counted), 0 when only one side has it; HD95 is NaN when
    either side is empty.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if pred.shape != ref.shape:
        raise UserError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    names = dict(names or {})
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    rows = []
    for value in values:
        p = torch.from_numpy(np.ascontiguousarray(pred == value))[None, None]
        r = torch.from_numpy(np.ascontiguousarray(ref == value))[None, None]
        n_ref, n_pred = int(r.sum()), int(p.sum())
        dice = float(dice_metric(p, r)[0, 0]) if (n_ref or n_pred) else float("nan")
        hd95 = float("nan")
        if hausdorff and n_ref and n_pred:
            with warnings.catch_warnings():  # MONAI's own deprecation notice about an internal argument
                warnings.simplefilter("ignore", FutureWarning)
                hd95 = float(hd_metric(p, r, spacing=[float(s) for s in spacing])[0, 0])
        rows.append({"value": int(value), "name": names.get(int(value), f"label_{int(value)}"), "dice": dice,
                     "hd95_mm": hd95, "ref_voxels": n_ref, "pred_voxels": n_pred})
    return rows


def _names(*paths: Path) -> Dict[int, str]:
    from .data import volumes
    from .data.labels import BTCV_NAMES

    names = dict(BTCV_NAMES)
    for path in paths:
        try:
            names.update(volumes.read_label_names(path))
        except UserError:
            pass
    return names


def parse_labels(text: Optional[str], names: Mapping[int, str]) -> Optional[List[int]]:
    """``--labels 1,2,liver`` -> values (names matched case-insensitively, '_' = ' ')."""
    if not text:
        return None
    by_name = {n.lower().replace("_", " "): v for v, n in names.items()}
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.isdigit():
            out.append(int(item))
        elif item.lower().replace("_", " ") in by_name:
            out.append(by_name[item.lower().replace("_", " ")])
        else:
            raise UserError(f"--labels: unknown label {item!r}; use values or names such as "
                            f"{', '.join(list(by_name)[:4])}")
    return out


#: More distinct values than this is an image (a CT has one per HU value), not a label map.
MAX_DISTINCT_LABELS = 1000


def _label_values(array: np.ndarray, what: str, path: Any) -> np.ndarray:
    """Check that ``array`` is a label map (whole, non-negative values, not thousands of them) -> int64."""
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UserError(f"{path} ({what}) has fractional values: it is not a label map")
    if array.size and array.min() < 0:
        raise UserError(f"{path} ({what}) has negative values (down to {array.min():g}): it is not a label map; "
                        "is it the CT instead of its segmentation?")
    values = np.unique(array)
    if len(values) > MAX_DISTINCT_LABELS:
        raise UserError(f"{path} ({what}) has {len(values)} distinct values: it looks like an image, not a label "
                        "map; is it the CT instead of its segmentation?")
    return array.astype(np.int64)


def evaluate_files(pred_path: Any, ref_path: Any, labels: Optional[Sequence[int]] = None,
                   hausdorff: bool = True, resample: bool = False) -> List[Dict[str, Any]]:
    """Score a predicted label map file against a reference file (see :func:`score`)."""
    import SimpleITK as sitk

    from .data import volumes

    pred_img, ref_img = volumes.read_image(pred_path), volumes.read_image(ref_path)
    ref = _label_values(sitk.GetArrayFromImage(ref_img), "reference", ref_path)
    differences = volumes.geometry_differences(pred_img, ref_img)
    if differences and not resample:
        raise UserError(f"{pred_path} is not on the grid of {ref_path} (" + "; ".join(differences) + "); "
                        "segment the reference's CT, or pass --resample to put the prediction onto its grid")
    pred = _label_values(sitk.GetArrayFromImage(pred_img), "prediction", pred_path)
    if differences:
        pred_img = volumes.resample_to_reference(sitk.Cast(pred_img, sitk.sitkUInt16), ref_img)
        pred = sitk.GetArrayFromImage(pred_img).astype(np.int64)
    names = _names(Path(pred_path), Path(ref_path))
    values = list(labels) if labels else [int(v) for v in np.unique(ref) if v != 0]
    if not values:
        raise UserError(f"{ref_path} contains no labels (all background); nothing to evaluate")
    spacing_zyx = tuple(reversed(ref_img.GetSpacing()))  # arrays are (z, y, x)
    return score(pred, ref, values, spacing_zyx, names, hausdorff)


def mean_row(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    def mean(key: str) -> float:
        vals = [r[key] for r in rows if isinstance(r[key], float) and math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    return {"value": "", "name": "mean", "dice": mean("dice"), "hd95_mm": mean("hd95_mm"),
            "ref_voxels": sum(r["ref_voxels"] for r in rows), "pred_voxels": sum(r["pred_voxels"] for r in rows)}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'value':>5}  {'organ':<26} {'Dice':>7} {'HD95 mm':>9} {'ref vox':>9} {'pred vox':>9}"]
    for r in list(rows) + [mean_row(rows)]:
        lines.append(f"{str(r['value']):>5}  {r['name'][:26]:<26} {r['dice']:>7.4f} {r['hd95_mm']:>9.2f} "
                     f"{r['ref_voxels']:>9} {r['pred_voxels']:>9}")
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Any) -> None:
    from .atomic import atomic_write

    buffer = io.StringIO()
    fields = ["value", "name", "dice", "hd95_mm", "ref_voxels", "pred_voxels"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in list(rows) + [mean_row(rows)]:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})
    with atomic_write(path) as tmp:
        tmp.write_text(buffer.getvalue())


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", metavar="PRED", help="predicted label map (file or DICOM folder)")
    parser.add_argument("ref", metavar="REF", help="reference label map")
    parser.add_argument("--labels", default=None, help="comma-separated values or names (default: all in REF)")
    parser.add_argument("--csv", default=None, metavar="CSV", help="also write the table as CSV")
    parser.add_argument("--no-hausdorff", action="store_true", help="Dice only (faster)")
    parser.add_argument("--resample", action="store_true",
                        help="score a prediction on another grid after a nearest-neighbour resample (refused otherwise)")


def run(args: argparse.Namespace) -> int:
    if args.csv:  # before reading anything: a bad --csv must not cost the scoring
        from .atomic import check_output_file

        check_output_file(args.csv, "--csv", inputs=[args.pred, args.ref])
    names = _names(Path(args.pred), Path(args.ref))
    rows = evaluate_files(args.pred, args.ref, parse_labels(args.labels, names), not args.no_hausdorff,
                          resample=args.resample)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"written {args.csv}", file=sys.stderr)
    return 0
