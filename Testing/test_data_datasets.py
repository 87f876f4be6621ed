"""Dataset folders: the four layouts are discovered; validation reports every problem at once and writes nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from logonet.data import datasets, volumes
from logonet.errors import UserError


def volume(shape=(6, 8, 10), spacing=(1.0, 1.0, 2.0), value=None, dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(-200, 200, size=shape).astype(dtype) if value is None else np.full(shape, value, dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def labelmap(image: sitk.Image, values=(0, 1, 2), dtype=np.uint8) -> sitk.Image:
    shape = tuple(reversed(image.GetSize()))
    array = np.zeros(shape, dtype=dtype)
    for i, v in enumerate(values):
        array[i % shape[0]] = v
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def write(image: sitk.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def snapshot(root: Path) -> Dict[str, Tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_msd_layout_from_phantoms(phantom_dataset: Path):
    index = datasets.discover(phantom_dataset)
    assert index.layout == "msd"
    assert [c["id"] for c in index.cases] == [f"phantom_{i:03d}" for i in range(4)]
    assert all(Path(c["image"]).is_file() and Path(c["label"]).is_file() for c in index.cases)
    assert index.label_names[6] == "liver" and len(index.label_names) == 13
    assert datasets.validate(index) is index
    assert index.summary()["labeled"] == 4


def test_msd_unlabeled_images(phantom_unlabeled: Path):
    index = datasets.validate(phantom_unlabeled)  # labels not required: dataset.json has none
    assert index.layout == "msd" and len(index.images()) == 4 and not index.labeled()
    with pytest.raises(datasets.DatasetError, match="has no label"):
        datasets.validate(phantom_unlabeled, require_labels=True)


def test_nnunet_v2_layout(tmp_path: Path):
    root = tmp_path / "Dataset001_Tiny"
    for case in ("abd_001", "abd_002"):
        image = volume()
        write(image, root / "imagesTr" / f"{case}_0000.nii.gz")
        write(labelmap(image), root / "labelsTr" / f"{case}.nii.gz")
    write(volume(), root / "imagesTs" / "abd_101_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    index = datasets.discover(root)
    assert index.layout == "nnunet"
    assert [c["id"] for c in index.cases] == ["abd_001", "abd_002"]
    assert index.cases[0]["label"].endswith("labelsTr/abd_001.nii.gz")
    assert index.label_names == {1: "liver", 2: "spleen"}
    assert len(index.test_images) == 1
    datasets.validate(index)


def test_images_labels_pairs_layout(tmp_path: Path):
    root = tmp_path / "pairs"
    for case in ("ct_a", "ct_b"):
        image = volume()
        write(image, root / "images" / f"{case}.nii.gz")
        volumes.write_labelmap(labelmap(image), image, root / "labels" / f"{case}_seg.nrrd", {1: "liver", 2: "spleen"})
    index = datasets.discover(root)
    assert index.layout == "pairs"
    assert [(c["id"], Path(c["label"]).name) for c in index.cases] == [("ct_a", "ct_a_seg.nrrd"),
                                                                       ("ct_b", "ct_b_seg.nrrd")]
    assert index.label_names == {1: "liver", 2: "spleen"}  # from the label maps' sidecar
    datasets.validate(index)


def test_unlabeled_folder_finds_every_volume_and_dicom_series(tmp_path: Path, sample_ct):
    root = tmp_path / "scans"
    write(volume(), root / "a.nii.gz")
    write(volume(), root / "site2" / "b.mha")
    write(volume(), root / "site2" / "deep" / "c.nrrd")
    write(volume(), root / "labels" / "ignored.nii.gz")  # label folders are not images
    (root / "notes.txt").write_text("not a volume")
    dicom = root / "patient1" / "ct"
    dicom.mkdir(parents=True)
    for name in sorted(os.listdir(sample_ct["dicom"]))[:4]:
        (dicom / name).write_bytes((Path(sample_ct["dicom"]) / name).read_bytes())
    index = datasets.discover(root)
    assert index.layout == "unlabeled"
    assert sorted(c["id"] for c in index.cases) == ["a", "patient1__ct", "site2__b", "site2__deep__c"]
    series = [c for c in index.cases if c["id"] == "patient1__ct"][0]
    assert series["image"] == str(dicom.resolve())
    datasets.validate(index)
    assert volumes.read_image(series["image"]).GetSize() == (512, 512, 4)


def test_validation_lists_every_problem_and_writes_nothing(tmp_path: Path):
    root = tmp_path / "bad"
    good = volume()
    write(good, root / "images" / "ok.nii.gz")
    write(labelmap(good), root / "labels" / "ok.nii.gz")
    write(volume(), root / "images" / "nolabel.nii.gz")  # image without label
    shifted = volume()
    write(shifted, root / "images" / "shifted.nii.gz")
    moved = labelmap(shifted)
    moved.SetOrigin((0.0, 0.0, 5.0))
    write(moved, root / "labels" / "shifted.nii.gz")  # geometry mismatch
    frac = volume()
    write(frac, root / "images" / "fractional.nii.gz")
    write(labelmap(frac, values=(0.0, 1.0, 0.5), dtype=np.float32), root / "labels" / "fractional.nii.gz")
    odd = volume()
    write(odd, root / "images" / "odd.nii.gz")
    write(labelmap(odd, values=(0, 1, 42)), root / "labels" / "odd.nii.gz")  # 42 is not declared
    (root / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")  # unreadable
    write(labelmap(good), root / "labels" / "broken.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"}}))
    before = snapshot(root)

    with pytest.raises(datasets.DatasetError) as caught:
        datasets.validate(root)
    problems = caught.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "case nolabel: image images/nolabel.nii.gz has no label" in text
    assert "case shifted: geometry mismatch between image and label labels/shifted.nii.gz: origin" in text
    assert "case fractional: label labels/fractional.nii.gz has non-integer values (e.g. 0.5)" in text
    assert "case odd: label labels/odd.nii.gz has unexpected values [42] (the dataset declares 0 and 1, 2)" in text
    assert "case broken: unreadable image: cannot read" in text
    assert str(caught.value).startswith(f"5 problem(s) in dataset folder {root.resolve()}")
    assert isinstance(caught.value, UserError)
    assert snapshot(root) == before, "validation must not write anything"


def test_empty_folder_is_one_clear_problem(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetError, match="the folder is empty: no volumes"):
        datasets.validate(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(UserError, match="does not exist"):
        datasets.discover(tmp_path / "nowhere")


def test_nnunet_naming_and_orphan_labels_are_reported(tmp_path: Path):
    root = tmp_path / "nn"
    image = volume()
    write(image, root / "imagesTr" / "case1.nii.gz")  # no _0000 channel suffix
    write(labelmap(image), root / "labelsTr" / "case2.nii.gz")  # label without image
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}))
    with pytest.raises(datasets.DatasetError) as caught:
        datasets.validate(root)
    text = "\n".join(caught.value.problems)
    assert "imagesTr/case1.nii.gz does not follow nnU-Net naming <case>_0000.nii.gz" in text
    assert "label labelsTr/case2.nii.gz has no image" in text
    assert "the folder is empty" in text


def test_write_dataset_json_new_msd_folder_is_read_back_by_discover(tmp_path):
    """The one dataset.json writer: a new MSD file with background added, the cases listed and counted, the extra
    keys last; discover() finds the same cases and names."""
    image = volume()
    for case in ("a", "b"):
        write(image, tmp_path / "imagesTr" / f"{case}.nii.gz")
        write(labelmap(image, (0, 1, 6)), tmp_path / "labelsTr" / f"{case}.nii.gz")
    entries = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("a", "b")]
    path = datasets.write_dataset_json(tmp_path, {6: "liver", 1: "spleen"}, entries, name="t", description="d",
                                       extra={"logonet": {"generator": "test"}})
    meta = json.loads(path.read_text())
    assert list(meta) == ["name", "description", "tensorImageSize", "modality", "labels", "numTraining", "numTest",
                          "training", "test", "logonet"]
    assert meta["labels"] == {"0": "background", "1": "spleen", "6": "liver"} and meta["numTraining"] == 2
    index = datasets.discover(tmp_path)
    assert index.layout == "msd" and [c["id"] for c in index.labeled()] == ["a", "b"]
    assert index.label_names == {1: "spleen", 6: "liver"}


def test_write_dataset_json_updates_an_existing_file_in_its_own_label_form(tmp_path):
    """An existing nnU-Net dataset.json keeps its keys and its {name: value} label form; without a training list
    the cases are counted in labelsTr."""
    image = volume()
    write(image, tmp_path / "imagesTr" / "a_0000.nii.gz")
    write(labelmap(image, (0, 2)), tmp_path / "labelsTr" / "a.nii.gz")
    existing = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 2}, "file_ending": ".nii.gz",
                "numTraining": 0}
    path = datasets.write_dataset_json(tmp_path, {2: "kidney", 3: "tumour"}, existing=existing)
    meta = json.loads(path.read_text())
    assert meta["labels"] == {"background": 0, "kidney": 2, "tumour": 3}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz" and meta["name"] == tmp_path.name
    assert "training" not in meta
