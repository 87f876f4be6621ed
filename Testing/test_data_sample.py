"""The sample CTs: fetched once with pip, cached, BTCV label maps, clear errors offline."""
from __future__ import annotations

import io as pyio
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from logonet.atomic import sha256_file
from logonet.cli import main
from logonet.data import sample, volumes
from logonet.errors import UserError


def forbid_pip(monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the sample is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)


def test_sample_files_and_btcv_labels(sample_ct):
    assert set(sample_ct) == set(sample.FILES) | {"root"}
    assert all(Path(p).exists() for p in sample_ct.values())
    ct = volumes.read_image(sample_ct["ct"])
    assert ct.GetSize() == (122, 101, 112) and ct.GetSpacing() == (3.0, 3.0, 3.0)
    labels = volumes.read_image(sample_ct["ct_labels"])
    assert volumes.same_geometry(labels, ct, tol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert values == {0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13}  # 12 of 13 organs: no esophagus
    hu = sitk.GetArrayFromImage(ct)
    lab = sitk.GetArrayFromImage(labels)
    # Non-contrast CT: spleen, liver and the large vessels sit on soft tissue; shifted by 24 mm they would not.
    for value in (1, 6, 8, 9, 10):
        assert 25 < np.median(hu[lab == value]) < 80, value
        assert hu[np.roll(lab, 8, axis=2) == value].mean() < hu[lab == value].mean() - 20, value
    assert volumes.read_label_names(sample_ct["ct_labels"])[11] == "pancreas"
    assert volumes.read_image(sample_ct["ct_fine"]).GetSpacing() == (1.5, 1.5, 1.5)
    mr, mr_labels = volumes.read_image(sample_ct["mr"]), volumes.read_image(sample_ct["mr_labels_totalseg_mr"])
    assert mr.GetSize() == (117, 91, 20) and volumes.same_geometry(mr, mr_labels, tol=1e-6)
    assert {1, 5, 23, 24, 25} <= set(np.unique(sitk.GetArrayFromImage(mr_labels)).tolist())  # spleen, liver, vessels


def test_second_call_is_instant_and_offline(sample_ct, monkeypatch, capsys):
    forbid_pip(monkeypatch)
    assert sample.fetch_sample(sample_ct["root"]) == sample_ct
    assert main(["sample", "--dest", sample_ct["root"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == sample_ct
    assert main(["sample", "--dest", sample_ct["root"]]) == 0
    out = capsys.readouterr().out
    assert f"sample CTs in {sample_ct['root']}" in out and sample_ct["dicom_labels"] in out


def test_offline_error_says_what_to_do(tmp_path: Path, monkeypatch):
    calls = []

    def offline(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="ERROR: No matching distribution found for "
                                                                "totalsegmentator==2.18.0\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(UserError) as caught:
        sample.fetch_sample(tmp_path / "s")
    message = str(caught.value)
    assert "could not download the sample CTs" in message and "No matching distribution" in message
    assert "internet connection" in message and "logonet sample --archive PATH" in message
    command = calls[0]
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert command[5:8] == ["--no-binary", "totalsegmentator", "totalsegmentator==2.18.0"]
    assert not (tmp_path / "s" / sample.MANIFEST).exists()
    assert not [p for p in (tmp_path / "s").rglob("*") if p.name != ".lock"], "nothing may be left behind"


def test_metadata_build_failure_retries_without_build_isolation(tmp_path: Path, monkeypatch):
    calls = []

    def failing_build(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="error: metadata-generation-failed\n")

    monkeypatch.setattr(subprocess, "run", failing_build)
    with pytest.raises(UserError, match="metadata-generation-failed"):
        sample.fetch_sample(tmp_path / "s")
    assert len(calls) == 2 and "--no-build-isolation" not in calls[0] and calls[1][-1] == "--no-build-isolation"


def test_wrong_checksum_is_refused(tmp_path: Path):
    fake = tmp_path / sample.ARCHIVE_NAME
    fake.write_bytes(b"not the real archive")
    with pytest.raises(UserError, match="sha256 .* expected 5d4223ef"):
        sample.fetch_sample(tmp_path / "s", archive=fake)
    assert not (tmp_path / "s" / sample.MANIFEST).exists()


def test_archive_extraction_takes_only_reference_files(sample_ct, tmp_path: Path, monkeypatch):
    """--archive path (offline machines), with a stand-in archive built from the cached files."""
    root = Path(sample_ct["root"])
    archive = tmp_path / sample.ARCHIVE_NAME
    prefix = f"{sample.PACKAGE}-{sample.VERSION}/tests/reference_files/"
    originals = ["example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "example_seg_dicom.nii.gz",
                 "aorta_report/example_ct.nii.gz", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz"] + [f"example_ct_dicom/{p.name}" for p in
                                                      sorted(Path(sample_ct["dicom"]).iterdir())]
    with tarfile.open(archive, "w:gz", compresslevel=0) as tar:
        for rel in originals:
            tar.add(root / rel, arcname=prefix + rel)
        for name, data in [(prefix + "example_seg_roi_subset_mr.nii.gz", b"unwanted"),
                           (prefix + "../../evil.txt", b"evil"),
                           (f"{sample.PACKAGE}-{sample.VERSION}/setup.py", b"unwanted")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, pyio.BytesIO(data))
    monkeypatch.setattr(sample, "SHA256", sha256_file(archive))
    forbid_pip(monkeypatch)
    dest = tmp_path / "offline"
    paths = sample.fetch_sample(dest, archive=archive)
    for key in ("ct_labels", "dicom_labels"):
        mine = volumes.read_image(paths[key])
        reference = volumes.read_image(sample_ct[key])
        assert volumes.same_geometry(mine, reference, tol=0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(reference))
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and p.name != ".lock")
    assert "example_seg_roi_subset_mr.nii.gz" not in files and not (tmp_path / "evil.txt").exists()
    assert "example_mr_sm.nii.gz" in files and "example_seg_mr.nii.gz" in files
    assert len([f for f in files if f.startswith("example_ct_dicom/")]) == 20
    assert json.loads((dest / sample.MANIFEST).read_text())["files"] == sample.FILES
