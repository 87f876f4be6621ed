"""``logonet evaluate``: Dice and HD95 values on known shapes, grid handling, table + CSV, bad input."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from logonet import cli
from logonet.evaluate import mean_row, score


def test_dice_and_hd95_known_values():
    ref = np.zeros((20, 20, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[5:15, 5:15, 5:15] = 1            # 1000 voxels
    pred[5:15, 5:15, 7:17] = 1           # shifted by 2 voxels along x: overlap 800
    ref[0:2, 0:2, 0:2] = 3               # organ missed entirely
    pred[18:, 18:, 18:] = 5              # organ predicted where the reference has none
    rows = score(pred, ref, [1, 3, 4, 5], spacing=(2.0, 1.0, 1.5), names={1: "spleen", 3: "left kidney"})
    by_value = {r["value"]: r for r in rows}
    assert by_value[1]["dice"] == pytest.approx(2 * 800 / 2000)
    assert by_value[1]["hd95_mm"] == pytest.approx(2 * 1.5)  # 2 voxels along x at 1.5 mm
    assert by_value[3]["dice"] == 0.0 and np.isnan(by_value[3]["hd95_mm"])
    assert np.isnan(by_value[4]["dice"])  # absent from both: not counted
    assert by_value[1]["name"] == "spleen" and by_value[4]["name"] == "label_4"
    assert by_value[5]["dice"] == 0.0  # a false positive counts as a miss, not as "not applicable"
    assert mean_row(rows)["dice"] == pytest.approx((0.8 + 0.0 + 0.0) / 3)


def test_cli_table_csv_and_resampled_prediction(tmp_path, capsys):
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[4:12, 4:12, 4:12] = 6
    ref_img = sitk.GetImageFromArray(ref)
    ref_img.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(ref_img, str(tmp_path / "ref.nrrd"))
    # The same labels at half the spacing: refused unless --resample says to put them onto the reference's
    # grid (a silent resample hid a wrong grid); resampled, Dice stays 1.
    fine = sitk.Resample(ref_img, [32, 32, 32], sitk.Transform(), sitk.sitkNearestNeighbor, (-0.5, -0.5, -0.5),
                         (1.0, 1.0, 1.0), ref_img.GetDirection(), 0, ref_img.GetPixelID())
    sitk.WriteImage(fine, str(tmp_path / "pred.nii.gz"))
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nrrd"), "--csv", str(tmp_path / "dice.csv")]
    assert cli.main(argv) == 2
    assert "not on the grid" in capsys.readouterr().err and not (tmp_path / "dice.csv").exists()
    code = cli.main([*argv, "--resample"])
    out = capsys.readouterr().out
    assert code == 0 and "liver" in out and "mean" in out
    rows = list(csv.DictReader(open(tmp_path / "dice.csv")))
    assert [r["name"] for r in rows] == ["liver", "mean"]
    assert float(rows[0]["dice"]) == pytest.approx(1.0)
    assert float(rows[0]["hd95_mm"]) == pytest.approx(0.0)


def test_cli_bad_input(tmp_path, capsys):
    (tmp_path / "x.nii.gz").write_text("nope")
    empty = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8))
    sitk.WriteImage(empty, str(tmp_path / "empty.nrrd"))
    assert cli.main(["evaluate", str(tmp_path / "x.nii.gz"), str(tmp_path / "empty.nrrd")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "empty.nrrd"), str(tmp_path / "empty.nrrd")]) == 2
    assert "no labels" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "empty.nrrd"), str(tmp_path / "empty.nrrd"),
                     "--labels", "kidneyish"]) == 2
    assert "unknown label" in capsys.readouterr().err


def test_slab_check_cuts_the_slab_at_the_largest_spleen_slice_and_scores_both_ways(tmp_path):
    """scripts/slab_check.py (the thin-slab arm's selection figure): the slab is centred on the slice where the
    spleen is largest and holds slab_mm of slices; the per-case CSV has the whole-scan and slab Dice."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("slab_check", root / "scripts" / "slab_check.py")
    slab_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slab_check)
    label = np.zeros((40, 8, 8), dtype=np.int16)
    label[5:30, 2:6, 2:6] = 1
    label[22, :, :] = 1  # the largest spleen slice
    assert slab_check.spleen_slab(label, 3.0, 40.0) == (15, 30)  # 7 slices either side of slice 22 at 3 mm
    assert slab_check.spleen_slab(label, 3.0, 400.0) == (0, 40)  # clipped to the volume
    image = sitk.GetImageFromArray(np.where(label > 0, 120.0, 0.0).astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    labels = sitk.GetImageFromArray(label)
    labels.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "ct_labels.nii.gz"))
    assert slab_check.main([str(root / "Resources" / "Models" / "demo"), "--pair",
                            f"{tmp_path / 'ct.nii.gz'}:{tmp_path / 'ct_labels.nii.gz'}",
                            "--csv", str(tmp_path / "slabs.csv")]) == 0
    rows = (tmp_path / "slabs.csv").read_text().splitlines()
    assert rows[0].split(",") == ["case", "slices", "whole_spleen", "whole_liver", "slab_spleen", "slab_liver",
                                  "whole_mean", "slab_mean"]
    assert rows[1].split(",")[1] == "15" and len(rows) == 2
