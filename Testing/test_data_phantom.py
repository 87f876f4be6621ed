"""Synthetic phantoms: deterministic, every organ present, plausible HU, MSD layout via the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from logonet.cli import main
from logonet.data import datasets, volumes
from logonet.data.labels import BTCV_NAMES
from logonet.data.phantom import PHANTOM_LABELS, make_phantom


def test_same_seed_same_phantom_other_seed_other_phantom():
    hu_a, lab_a = make_phantom(32, seed=3, index=1)
    hu_b, lab_b = make_phantom(32, seed=3, index=1)
    np.testing.assert_array_equal(hu_a, hu_b)
    np.testing.assert_array_equal(lab_a, lab_b)
    hu_c, lab_c = make_phantom(32, seed=4, index=1)
    hu_d, lab_d = make_phantom(32, seed=3, index=2)
    assert (lab_a != lab_c).mean() > 0.005 and (lab_a != lab_d).mean() > 0.005
    assert np.abs(hu_a.astype(float) - hu_c).mean() > 10


def test_every_organ_present_with_plausible_intensities():
    hu, lab = make_phantom(96, seed=0, index=0)
    assert hu.shape == lab.shape == (96, 96, 96) and hu.dtype == np.int16 and lab.dtype == np.uint8
    assert set(np.unique(lab)) == {0, *PHANTOM_LABELS} and len(PHANTOM_LABELS) >= 8
    mean = {v: float(hu[lab == v].mean()) for v in PHANTOM_LABELS}
    assert 60 < mean[6] < 160  # liver
    assert mean[8] > mean[6] + 30  # contrast-filled aorta brighter than liver
    assert mean[4] < mean[6] - 40  # bile in the gallbladder darker than liver
    assert (lab == 6).sum() > 5 * (lab == 1).sum()  # liver much bigger than spleen
    assert hu[0, 0, 0] < -900  # air outside the body
    assert (hu > 500).sum() > 500  # bone
    assert ((hu > -140) & (hu < -60) & (lab == 0)).sum() > 10_000  # fat
    assert hu[lab == 6].std() > 5  # noise and texture, not flat
    # Organs are irregular: not a symmetric ellipsoid (left/right halves of the liver differ).
    liver = lab == 6
    assert (liver != liver[:, :, ::-1]).mean() > 0.02


def test_small_sizes_keep_every_organ():
    for index in range(3):
        _, lab = make_phantom(24, seed=7, index=index)
        assert set(np.unique(lab)) == {0, *PHANTOM_LABELS}


def test_cli_writes_msd_dataset(tmp_path: Path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--cases", "3", "--size", "32", "--seed", "5", "--progress", "none"]) == 0
    assert "wrote 3 labelled phantom cases of 32^3" in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["labels"]["6"] == "liver" and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", **{str(v): BTCV_NAMES[v] for v in PHANTOM_LABELS}}
    index = datasets.validate(out)
    assert index.layout == "msd" and len(index.cases) == 3
    image = volumes.read_image(index.cases[0]["image"])
    label = volumes.read_image(index.cases[0]["label"])
    assert image.GetSize() == (32, 32, 32) and image.GetSpacing() == (1.5, 1.5, 2.0)
    assert volumes.same_geometry(image, label, tol=0)
    assert image.GetPixelID() == sitk.sitkInt16
    for case in index.cases:
        assert set(np.unique(sitk.GetArrayFromImage(volumes.read_image(case["label"])))) == {0, *PHANTOM_LABELS}
    # Same seed again: identical images.
    again = tmp_path / "again"
    main(["phantom", str(again), "--cases", "1", "--size", "32", "--seed", "5", "--progress", "none"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volumes.read_image(again / "imagesTr" / "phantom_000.nii.gz")),
                                  sitk.GetArrayFromImage(image))


def test_cli_unlabeled_and_refusals(tmp_path: Path, capsys):
    out = tmp_path / "u"
    assert main(["phantom", str(out), "--cases", "2", "--size", "24", "--unlabeled", "--progress", "none"]) == 0
    assert not (out / "labelsTr").exists()
    index = datasets.validate(out)
    assert len(index.images()) == 2 and not index.labeled()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["phantom", str(foreign), "--cases", "1", "--size", "24", "--progress", "none"]) == 2
    assert "is not empty and is not a phantom dataset" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    assert main(["phantom", str(tmp_path / "x"), "--cases", "0", "--progress", "none"]) == 2
    assert "--cases must be at least 1" in capsys.readouterr().err
