"""Thin-slab validation: does a model card still find the organs when a scan it segments whole comes as a slab?

The sample's unseen DICOM series is a 40 mm slab of the upper abdomen (20 slices of 2 mm); clinical series are often
partial fields of view. Each case (synthetic validation CTs, or the training scan: never a test scan) is cut to
SLAB_MM about the slice where its spleen is largest (the level of that series: liver, spleen, stomach, aorta) and
segmented as a volume of its own; Dice against the label in the slab, next to the whole scan's prediction cropped to
the same slices. This is the selection figure of the thin-slab arm (REPRODUCE.md).

    .venv/bin/python scripts/slab_check.py CARD VAL_DIR [VAL_DIR ...] [--pair IMAGE:LABEL ...] [--csv OUT.csv]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk

from logonet.data.labels import BTCV_NAMES

SPLEEN, LIVER = ({name: value for value, name in BTCV_NAMES.items()}[organ] for organ in ("spleen", "liver"))


def spleen_slab(label: np.ndarray, spacing_z: float, slab_mm: float) -> Tuple[int, int]:
    """(first, stop) slices (array axis 0) of a slab ``slab_mm`` thick centred on the largest spleen slice."""
    centre = int(np.argmax((label == SPLEEN).sum(axis=(1, 2))))
    half = int(round(slab_mm / 2 / spacing_z))
    return max(0, centre - half), min(label.shape[0], centre + half + 1)


def organ_dice(pred: np.ndarray, ref: np.ndarray, values: List[int], spacing: Tuple[float, ...]) -> Dict[int, float]:
    """Dice per organ value present in ``ref`` (organs the slab does not hold are not scored)."""
    from logonet.evaluate import score

    present = [v for v in values if (ref == v).any()]
    return {row["value"]: row["dice"] for row in score(pred, ref, present, spacing, hausdorff=False)}


def mean_of_scored(values: List[float]) -> float:
    """Mean over the cases where the organ was scored (NaN: absent from the slab), NaN if none was."""
    scored = [v for v in values if np.isfinite(v)]
    return float(np.mean(scored)) if scored else float("nan")


def main(argv: List[str] | None = None) -> int:
    from logonet.bench.common import write_csv
    from logonet.infer import Predictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card")
    parser.add_argument("val_dirs", nargs="*", help="MSD folders (imagesTr/, labelsTr/) of synthetic validation CTs")
    parser.add_argument("--pair", action="append", default=[], help="IMAGE:LABEL of another case (the training scan)")
    parser.add_argument("--slab-mm", type=float, default=40.0)
    parser.add_argument("--csv", help="per-case rows")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pair]
    for folder in args.val_dirs:
        pairs += [(str(p), str(Path(folder) / "labelsTr" / p.name))
                  for p in sorted((Path(folder) / "imagesTr").glob("*.nii.gz"))]
    predictor = Predictor(args.card)
    values = [v for v in predictor.card.label_values if v]
    rows = []
    for image_path, label_path in pairs:
        image = sitk.ReadImage(image_path, sitk.sitkFloat32)
        label = sitk.GetArrayFromImage(sitk.ReadImage(label_path))
        first, stop = spleen_slab(label, image.GetSpacing()[2], args.slab_mm)
        spacing = image.GetSpacing()[::-1]
        whole = sitk.GetArrayFromImage(predictor.predict(image)[0])[first:stop]
        slab = sitk.GetArrayFromImage(predictor.predict(image[:, :, first:stop])[0])
        reference = label[first:stop]
        scores = {name: organ_dice(pred, reference, values, spacing) for name, pred in (("whole", whole), ("slab", slab))}
        rows.append({"case": f"{Path(image_path).parent.parent.name}/{Path(image_path).name}", "slices": stop - first,
                     **{f"{name}_{organ}": round(s.get(value, float("nan")), 4)
                        for name, s in scores.items() for organ, value in (("spleen", SPLEEN), ("liver", LIVER))},
                     **{f"{name}_mean": round(float(np.nanmean(list(s.values()))), 4) for name, s in scores.items()}})
        print(*rows[-1].values(), flush=True)
    if args.csv:
        write_csv(rows, list(rows[0]), Path(args.csv))
    synthetic = [r for r in rows if "synth" in r["case"]]
    print(f"\n| cases | whole scan, same slices | {args.slab_mm:g} mm slab | slab: spleen | slab: liver |\n|---|---|---|---|---|")
    for name, group in (("synthetic validation", synthetic), ("other", [r for r in rows if r not in synthetic])):
        if group:
            print(f"| {name} ({len(group)}) | " + " | ".join(
                f"{mean_of_scored([r[key] for r in group]):.3f}"
                for key in ("whole_mean", "slab_mean", "slab_spleen", "slab_liver")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
