"""Volume IO: exact geometry round trips for every format, label names, MONAI bridges, clear errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from logonet.data import labels, volumes
from logonet.errors import UserError

TOL = 1e-6


def oblique_image(array: np.ndarray) -> sitk.Image:
    """An image with non-trivial spacing, origin and an oblique (rotated) direction.

    The origin is float32-exact: NIfTI stores geometry in float32, so a NIfTI round trip is exact to 1e-6
    only for geometry that NIfTI can hold (as any geometry read from a NIfTI file can).
    """
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-123.5, 78.875, -301.25))
    a = math.radians(17.0)
    b = math.radians(-8.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image.SetDirection(tuple((rz @ rx).ravel()))
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = TOL) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol)


@pytest.fixture()
def label_array() -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = np.zeros((6, 7, 8), dtype=np.uint8)  # (z, y, x)
    arr[1:4, 2:5, 3:7] = 6
    arr[4, 1, 1] = 13
    arr[rng.random(arr.shape) > 0.9] = 2
    return arr


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd"])
def test_labelmap_round_trip_keeps_geometry_values_and_names(tmp_path: Path, label_array: np.ndarray, suffix: str):
    reference = oblique_image(np.zeros(label_array.shape, dtype=np.int16))
    names = {2: "right kidney", 6: "liver", 13: "left adrenal gland"}
    path = volumes.write_labelmap(label_array, reference, tmp_path / f"seg{suffix}", names)
    back = volumes.read_image(path)
    assert_same_geometry(back, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label_array)
    assert back.GetPixelID() == sitk.sitkUInt8
    # Sidecar always, with colors; names also readable from the header once the sidecar is gone.
    sidecar = json.loads(volumes.sidecar_path(path).read_text())
    assert [e["value"] for e in sidecar["labels"]] == [2, 6, 13]
    assert sidecar["labels"][1]["color"] == list(labels.BTCV_COLORS[6])
    assert volumes.read_label_names(path) == names
    volumes.sidecar_path(path).unlink()
    header_names = volumes.read_label_names(path)
    if suffix in (".nii", ".nii.gz"):
        assert header_names == {2: "right kidney", 6: "liver", 13: "left adrenal gland"}  # fits in descrip
    else:
        assert header_names == names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_seg_nrrd_has_slicer_segment_fields(tmp_path: Path, label_array: np.ndarray):
    reference = oblique_image(np.zeros(label_array.shape, dtype=np.int16))
    path = volumes.write_labelmap(label_array, reference, tmp_path / "seg.seg.nrrd", labels.BTCV_NAMES)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    # Only the values present (2, 6, 13) plus every named BTCV label are listed; Segment1 is value 2.
    assert reader.GetMetaData("Segment1_LabelValue") == "2"
    assert reader.GetMetaData("Segment1_Name") == "right kidney"
    assert reader.GetMetaData("Segment0_Color") == "0.615686 0.423529 0.635294"  # spleen (157, 108, 162)
    assert reader.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_ct_round_trip_keeps_geometry_and_values(tmp_path: Path, suffix: str):
    ct = np.random.default_rng(1).integers(-1000, 2000, size=(5, 6, 7)).astype(np.int16)
    image = oblique_image(ct)
    path = volumes.write_image(image, tmp_path / f"ct{suffix}")
    back = volumes.read_image(path)
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), ct)


def write_dicom_series(folder: Path, array: np.ndarray, spacing, origin) -> None:
    """Minimal CT DICOM series (identity direction) with SimpleITK, one file per slice."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(array.shape[0]):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", series_uid + ".1"),
                           ("0008|0018", f"{series_uid}.2.{k}"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(f"{p:.4f}" for p in position)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", f"{spacing[2]:.4f}"),
                           ("0028|0030", f"{spacing[1]:.4f}\\{spacing[0]:.4f}")]:
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder_reads_with_geometry(tmp_path: Path):
    ct = np.random.default_rng(2).integers(-1000, 1000, size=(6, 16, 12)).astype(np.int16)
    spacing, origin = (0.75, 0.625, 2.5), (-120.5, -80.25, 310.0)
    write_dicom_series(tmp_path / "series", ct, spacing, origin)
    image = volumes.read_image(tmp_path / "series")
    assert image.GetSize() == (12, 16, 6)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=TOL)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=TOL)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=TOL)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
    # A label map written on the DICOM grid reads back on exactly that grid.
    path = volumes.write_labelmap((ct > 0).astype(np.uint8), image, tmp_path / "mask.nii.gz", {1: "positive"})
    assert_same_geometry(volumes.read_image(path), image)


def test_sample_dicom_series_matches_its_reference_label_map(sample_ct):
    dicom = volumes.read_image(sample_ct["dicom"])
    assert dicom.GetSize() == (512, 512, 20)
    btcv = volumes.read_image(sample_ct["dicom_labels"])
    assert_same_geometry(btcv, dicom)
    # The original TotalSegmentator map stores the same voxels with the y axis flipped.
    original = volumes.read_image(sample_ct["dicom_labels_totalseg"])
    assert_same_geometry(sitk.DICOMOrient(original, "LPS"), sitk.DICOMOrient(dicom, "LPS"))
    # Aligned, not just same-shaped: contrast-filled aorta is bright, the liver is soft tissue.
    hu, lab = sitk.GetArrayFromImage(dicom), sitk.GetArrayFromImage(btcv)
    assert hu[lab == 8].mean() > 120
    assert 40 < hu[lab == 6].mean() < 150
    assert set(np.unique(lab)) == {0, 1, 6, 7, 8, 9, 10, 11, 12}


def test_metatensor_round_trip_is_lossless():
    image = oblique_image(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7))
    tensor = volumes.image_to_metatensor(image)
    assert tuple(tensor.shape) == (1, 7, 6, 5)  # MONAI (C, x, y, z)
    np.testing.assert_allclose(tensor.affine.numpy(), volumes.ras_affine(image), atol=1e-12)
    # RAS affine = LPS affine with x, y negated.
    np.testing.assert_allclose(volumes.ras_affine(image)[:2], -volumes.lps_affine(image)[:2], atol=1e-12)
    back = volumes.metatensor_to_image(tensor)
    assert_same_geometry(back, image, tol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_monai_loadimaged_with_simpleitk_reader(tmp_path: Path):
    from monai.transforms import LoadImaged

    image = oblique_image(np.random.default_rng(3).normal(size=(4, 5, 6)).astype(np.float32))
    path = volumes.write_image(image, tmp_path / "x.nii.gz")
    data = LoadImaged(keys="image", reader=volumes.SimpleITKReader(), ensure_channel_first=True)({"image": str(path)})
    tensor = data["image"]
    assert tuple(tensor.shape) == (1, 6, 5, 4)
    np.testing.assert_allclose(tensor.affine.numpy(), volumes.ras_affine(image), atol=1e-6)
    np.testing.assert_allclose(tensor[0].numpy(), sitk.GetArrayFromImage(image).transpose(2, 1, 0), atol=1e-6)
    assert_same_geometry(volumes.metatensor_to_image(tensor), image)


def test_resample_to_reference_undoes_a_flip_exactly(label_array: np.ndarray):
    reference = oblique_image(np.zeros(label_array.shape, dtype=np.int16))
    labels_image = sitk.GetImageFromArray(label_array)
    labels_image.CopyInformation(reference)
    flipped = sitk.Flip(labels_image, [False, True, False])  # same voxels, other index order
    assert not volumes.same_geometry(flipped, reference)
    back = volumes.resample_to_reference(flipped, reference)
    assert_same_geometry(back, reference, tol=0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label_array)


def test_read_image_errors_say_what_is_wrong(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        volumes.read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty folder"):
        volumes.read_image(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="without a DICOM series"):
        volumes.read_image(tmp_path / "notes")
    (tmp_path / "zero.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="empty file"):
        volumes.read_image(tmp_path / "zero.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not a volume" * 50)
    with pytest.raises(UserError, match="cannot read .*garbage.nii.gz.*corrupt"):
        volumes.read_image(tmp_path / "garbage.nii.gz")
    flat = sitk.GetImageFromArray(np.zeros((8, 9), dtype=np.int16))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(UserError, match="2-D image, not a 3-D volume"):
        volumes.read_image(tmp_path / "flat.nrrd")
    single = sitk.GetImageFromArray(np.zeros((1, 8, 9), dtype=np.int16))
    sitk.WriteImage(single, str(tmp_path / "single.nii.gz"))
    with pytest.raises(UserError, match="single 2-D slice"):
        volumes.read_image(tmp_path / "single.nii.gz")
    series4d = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), dtype=np.int16), isVector=False)
    sitk.WriteImage(series4d, str(tmp_path / "t.nii.gz"))
    with pytest.raises(UserError, match="is 4-D"):
        volumes.read_image(tmp_path / "t.nii.gz")
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(UserError, match="3 components per voxel"):
        volumes.read_image(tmp_path / "rgb.mha")


def test_write_labelmap_rejects_bad_labels(tmp_path: Path):
    reference = oblique_image(np.zeros((4, 5, 6), dtype=np.int16))
    with pytest.raises(UserError, match=r"shape \(6, 5, 4\) does not match .* \(4, 5, 6\)"):
        volumes.write_labelmap(np.zeros((6, 5, 4), np.uint8), reference, tmp_path / "a.nii.gz")
    with pytest.raises(UserError, match="whole numbers"):
        volumes.write_labelmap(np.full((4, 5, 6), 0.5), reference, tmp_path / "a.nii.gz")
    with pytest.raises(UserError, match=">= 0"):
        volumes.write_labelmap(np.full((4, 5, 6), -1), reference, tmp_path / "a.nii.gz")
    with pytest.raises(UserError, match="must end in one of"):
        volumes.write_labelmap(np.zeros((4, 5, 6), np.uint8), reference, tmp_path / "a.png")
    other = oblique_image(np.zeros((4, 5, 6), dtype=np.uint8))
    other.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(UserError, match="not on the reference grid"):
        volumes.write_labelmap(other, reference, tmp_path / "a.nii.gz")
    assert not list(tmp_path.iterdir()), "a refused write must leave nothing behind"
    # Large label values switch to 16 bits.
    big = np.zeros((4, 5, 6), dtype=np.int32)
    big[0, 0, 0] = 300
    assert volumes.read_image(volumes.write_labelmap(big, reference, tmp_path / "b.nrrd")).GetPixelID() == sitk.sitkUInt16


def test_btcv_schema_and_totalsegmentator_map():
    assert [label.value for label in labels.BTCV_LABELS] == list(range(1, 14))
    assert labels.BTCV_NAMES[1] == "spleen" and labels.BTCV_NAMES[6] == "liver" and labels.BTCV_NAMES[8] == "aorta"
    assert len(set(labels.BTCV_NAMES.values())) == 13
    for label in labels.BTCV_LABELS:
        assert len(label.color) == 3 and all(0 <= c <= 255 for c in label.color)
        assert label.type[1].isdigit()
    assert labels.TOTALSEG_TO_BTCV == {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11,
                                       8: 12, 9: 13}
    totalseg = np.array([[0, 1, 5, 15, 52, 63, 64, 7, 8, 9, 117, 2, 3, 4, 6]])
    np.testing.assert_array_equal(labels.totalseg_to_btcv(totalseg),
                                  [[0, 1, 6, 5, 8, 9, 10, 11, 12, 13, 0, 2, 3, 4, 7]])
    entries = labels.btcv_label_dicts([6, 1])
    assert [e["value"] for e in entries] == [1, 6]
    assert entries[0]["terminology"]["type"] == ["SCT", "78961009", "Spleen"]


def test_a_folder_without_dicom_is_an_empty_answer_without_itk_noise(tmp_path, capfd):
    import SimpleITK as sitk

    from logonet.data import volumes

    (tmp_path / "notes.txt").write_text("not DICOM")
    assert volumes.dicom_series(tmp_path) == []
    assert "No Series were found" not in capfd.readouterr().err
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # ITK's own setting is put back
