"""Fine-grid validation: does a model card hold up on 1 mm scans? Synthetic validation cases only.

Clinical CTs come at about 1 x 1 x 2 mm with tens of HU of per-voxel noise; the default model works at 3 mm and was
trained on 3 mm images. Each synthetic validation case (3 mm, ``logonet synth``) is resampled to FINE (linear),
given white noise of each NOISE_HU at that grid, and segmented with the card's preprocessing, its ``antialias``
low-pass on and off; Dice against the label resampled (nearest) to the same grid. Deterministic (seed 0).
Never reads a test scan: this is how the anti-aliasing default was chosen (REPRODUCE.md).

    .venv/bin/python scripts/fine_grid_check.py CARD VAL_DIR [VAL_DIR ...] [--noise-hu 0,40] [--csv OUT.csv]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

FINE = (1.0, 1.0, 2.0)


def fine_grid(image: sitk.Image) -> sitk.Image:
    size = [int(round(n * s / f)) for n, s, f in zip(image.GetSize(), image.GetSpacing(), FINE)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(FINE)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def main(argv: list[str] | None = None) -> int:
    from logonet.evaluate import score
    from logonet.bench.common import write_csv
    from logonet.infer import Predictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card")
    parser.add_argument("val_dirs", nargs="+", help="MSD folders (imagesTr/, labelsTr/) of synthetic validation CTs")
    parser.add_argument("--noise-hu", default="0,40", help="comma-separated white-noise SDs at the fine grid")
    parser.add_argument("--csv", help="per case rows: case, noise_hu, antialias, mean_dice")
    args = parser.parse_args(argv)
    noise_levels = [float(v) for v in args.noise_hu.split(",")]
    predictor = Predictor(args.card)
    values = [v for v in predictor.card.label_values if v]
    rng = np.random.default_rng(0)
    rows = []
    for folder in args.val_dirs:
        for path in sorted((Path(folder) / "imagesTr").glob("*.nii.gz")):
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
            grid = fine_grid(image)
            fine = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
            label = sitk.ReadImage(str(Path(folder) / "labelsTr" / path.name))
            reference = sitk.GetArrayFromImage(sitk.Resample(label, grid, sitk.Transform(),
                                                             sitk.sitkNearestNeighbor, 0))
            for noise in noise_levels:
                array = sitk.GetArrayFromImage(fine)
                noisy = sitk.GetImageFromArray(array + rng.normal(0.0, noise, array.shape).astype(np.float32))
                noisy.CopyInformation(fine)
                for antialias in (False, True):
                    predictor.cfg.antialias = antialias
                    labels, _ = predictor.predict(noisy)
                    dice = [r["dice"] for r in score(sitk.GetArrayFromImage(labels), reference, values, FINE[::-1],
                                                     hausdorff=False)]
                    rows.append({"case": f"{Path(folder).name}/{path.name}", "noise_hu": noise,
                                 "antialias": antialias, "mean_dice": round(float(np.nanmean(dice)), 4)})
                    print(*rows[-1].values(), flush=True)
    if args.csv:
        write_csv(rows, list(rows[0]), Path(args.csv))
    print("\n| noise (HU, at 1x1x2 mm) | anti-aliasing off | on | cases |\n|---|---|---|---|")
    for noise in noise_levels:
        means = [np.mean([r["mean_dice"] for r in rows if r["noise_hu"] == noise and r["antialias"] == a])
                 for a in (False, True)]
        count = sum(1 for r in rows if r["noise_hu"] == noise and r["antialias"])
        print(f"| {noise:g} | {means[0]:.3f} | {means[1]:.3f} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
