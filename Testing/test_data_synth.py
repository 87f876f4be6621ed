"""logonet synth: synthetic labelled CTs from a real TotalSegmentator map (deterministic, source geometry, HU
inside the drawn phase ranges, organs present, thin slabs) on a small crop of the sample's training CT."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

from logonet.cli import main
from logonet.data import datasets, volumes
from logonet.data.labels import totalseg_to_btcv
from logonet.data.synth import PHASES, TISSUES, SynthSettings, organ_veins, synthesise, write_synth_dataset
from logonet.errors import UserError

#: No degradations, no texture, little noise: the drawn means must be read back from the image.
PLAIN = SynthSettings(texture=(0.0, 0.0), tissue_noise=(1.0, 1.0), blur_prob=0.0, bias_prob=0.0, noise_prob=0.0,
                      lowres_prob=0.0, slab_prob=0.0, elastic_magnitude=(0.0, 0.0), rotate_deg=0.0, scale=0.0)


@pytest.fixture(scope="module")
def source(sample_ct: Dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pairs dataset with one case: an 80x50x30 crop of the sample CT through liver, spleen and kidneys."""
    root = tmp_path_factory.mktemp("synth_source")
    ct, seg = volumes.read_image(sample_ct["ct"]), volumes.read_image(sample_ct["ct_labels_totalseg"])
    box = [slice(10, 90), slice(20, 70), slice(75, 105)]  # x, y, z (SimpleITK index order)
    crop_ct, crop_seg = ct[box[0], box[1], box[2]], seg[box[0], box[1], box[2]]
    assert {1, 5}.issubset(set(np.unique(sitk.GetArrayFromImage(crop_seg))))  # spleen, liver
    volumes.write_image(crop_ct, root / "images" / "case0.nii.gz")
    volumes.write_image(crop_seg, root / "labels" / "case0.nii.gz")
    return root


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_same_seed_same_case_other_seed_other_case(source: Path, tmp_path: Path):
    a = write_synth_dataset(source, tmp_path / "a", cases=2, seed=5)
    b = write_synth_dataset(source, tmp_path / "b", cases=3, seed=5)  # case i does not depend on --cases
    c = write_synth_dataset(source, tmp_path / "c", cases=2, seed=6)
    for i in range(2):
        name = f"synth_{i:03d}.nii.gz"
        np.testing.assert_array_equal(_read(a / "imagesTr" / name), _read(b / "imagesTr" / name))
        np.testing.assert_array_equal(_read(a / "labelsTr" / name), _read(b / "labelsTr" / name))
        assert np.abs(_read(a / "imagesTr" / name).astype(float) - _read(c / "imagesTr" / name)).mean() > 5
    assert np.abs(_read(a / "imagesTr" / "synth_000.nii.gz").astype(float)
                  - _read(a / "imagesTr" / "synth_001.nii.gz")).mean() > 5


def test_geometry_equals_the_source_map_and_organs_are_present(source: Path, tmp_path: Path):
    out = write_synth_dataset(source, tmp_path / "s", cases=3, seed=0,
                              settings=SynthSettings(slab_prob=0.0))
    src = volumes.read_image(source / "labels" / "case0.nii.gz")
    organs = set(np.unique(totalseg_to_btcv(sitk.GetArrayFromImage(src)))) - {0}
    for i in range(3):
        image = volumes.read_image(out / "imagesTr" / f"synth_{i:03d}.nii.gz")
        label = volumes.read_image(out / "labelsTr" / f"synth_{i:03d}.nii.gz")
        assert volumes.same_geometry(image, src) and volumes.same_geometry(label, src)
        assert image.GetPixelID() == sitk.sitkInt16
        present = set(np.unique(sitk.GetArrayFromImage(label))) - {0}
        assert present == organs  # deformation moves organs, it never drops one
    meta = json.loads((out / "dataset.json").read_text())
    assert set(int(v) for v in meta["labels"]) == organs | {0}
    assert datasets.validate(out).layout == "msd"


def test_tissue_intensities_are_the_drawn_means_inside_the_phase_ranges(sample_ct, source: Path):
    ct, seg = volumes.read_image(source / "images" / "case0.nii.gz"), volumes.read_image(source / "labels" / "case0.nii.gz")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayFromImage(seg).astype(np.int16)
    phases = set()
    for index in range(6):
        array, btcv, info = synthesise(ct, hu, labels, seed=1, index=index, settings=PLAIN)
        phases.add(info["phase"])
        assert info["phase"] in PHASES
        for tissue in TISSUES:
            low, high = tissue.hu[info["phase"]]
            assert low <= info["mean_hu"][tissue.name] <= high, tissue.name
        for organ, tissue in ((6, "liver"), (1, "spleen")):
            assert abs(np.median(array[btcv == organ]) - info["mean_hu"][tissue]) < 3
    assert len(phases) >= 2  # contrast phases vary between cases


def test_default_synthesis_keeps_hu_plausible_and_texture(source: Path, tmp_path: Path):
    out = write_synth_dataset(source, tmp_path / "d", cases=4, seed=2)
    meta = json.loads((out / "dataset.json").read_text())["logonet"]["cases"]
    for i, info in enumerate(meta):
        image = _read(out / "imagesTr" / f"synth_{i:03d}.nii.gz").astype(float)
        labels = _read(out / "labelsTr" / f"synth_{i:03d}.nii.gz")
        liver = image[labels == 6]
        if liver.size == 0:  # a slab that missed the liver
            continue
        low, high = [t for t in TISSUES if t.name == "liver"][0].hu[info["phase"]]
        assert low - 60 < np.median(liver) < high + 60
        assert image.min() >= -1024 and image.max() <= 3071


def test_slab_keeps_a_thin_axial_band_and_air_elsewhere(source: Path):
    ct, seg = volumes.read_image(source / "images" / "case0.nii.gz"), volumes.read_image(source / "labels" / "case0.nii.gz")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayFromImage(seg).astype(np.int16)
    settings = SynthSettings(slab_prob=1.0, slab_mm=(30.0, 30.0))
    array, btcv, info = synthesise(ct, hu, labels, seed=0, index=0, settings=settings)
    first, stop = info["slab"]
    assert stop - first == 10  # 30 mm at 3 mm
    outside = np.ones(array.shape[0], dtype=bool)
    outside[first:stop] = False
    assert (array[outside] <= -960).all() and (btcv[outside] == 0).all()
    assert (btcv[first:stop] > 0).any() and (array[first:stop] > -100).mean() > 0.2


def test_bad_sources_are_refused_with_a_reason(source: Path, tmp_path: Path):
    btcv_only = tmp_path / "btcv"
    image = volumes.read_image(source / "images" / "case0.nii.gz")
    volumes.write_image(image, btcv_only / "images" / "a.nii.gz")
    volumes.write_image(sitk.Cast(image > 5000, sitk.sitkUInt8) + 200, btcv_only / "labels" / "a.nii.gz")
    with pytest.raises(UserError, match="not TotalSegmentator ids"):
        write_synth_dataset(btcv_only, tmp_path / "o1", cases=1)
    with pytest.raises(UserError, match="at least 1"):
        write_synth_dataset(source, tmp_path / "o2", cases=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        write_synth_dataset(source, tmp_path / "busy", cases=1)


def test_cli_writes_a_dataset_that_finetune_reads(source: Path, tmp_path: Path, capsys):
    from logonet.train.finetune import discover_folders

    out = tmp_path / "cli"
    assert main(["synth", str(source), str(out), "--cases", "2", "--seed", "3", "--progress", "none"]) == 0
    assert "wrote 2 synthetic cases" in capsys.readouterr().out
    other = write_synth_dataset(source, tmp_path / "other", cases=1, seed=4)
    cases, names, weights = discover_folders([str(out), str(other)], [3, 1])  # e.g. real scans x3 + synthetic
    assert [c["id"] for c in cases] == ["cli/synth_000", "cli/synth_001", "other/synth_000"]
    assert names[6] == "liver" and weights == [3, 3, 1]
    with pytest.raises(UserError, match="one per DATA folder"):
        discover_folders([str(out), str(other)], [3, 1, 1])
    assert main(["synth", str(source), str(tmp_path / "x"), "--slab-prob", "2"]) == 2
    assert main(["synth", str(source), str(tmp_path / "x"), "--vessel-prob", "-0.1"]) == 2
    assert "--vessel-prob must be in [0, 1]" in capsys.readouterr().err


def test_organ_resizing_changes_sizes_only_into_displaceable_tissue(source: Path):
    from logonet.data.synth import DISPLACEABLE, ORGAN_SCALE, VACATED_HU, resize_organs

    ct, seg = volumes.read_image(source / "images" / "case0.nii.gz"), volumes.read_image(source / "labels" / "case0.nii.gz")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayFromImage(seg).astype(np.int16)
    ratios, drawn = [], []
    for k in range(6):
        resized, new_hu, scales = resize_organs(labels, hu, 1.0, np.random.default_rng(k))
        assert resized.shape == labels.shape and new_hu.shape == hu.shape
        changed = resized != labels
        # only organs and displaceable tissue change (an organ may grow into the band another one vacated);
        # bone, muscle and the rest keep their labels
        assert np.isin(labels[changed], DISPLACEABLE + tuple(ORGAN_SCALE)).all()
        assert np.isin(labels[changed & (resized == 0)], list(ORGAN_SCALE)).all()
        np.testing.assert_array_equal(new_hu[changed & (resized == 0)], VACATED_HU)
        assert (new_hu[~changed] == hu[~changed]).all()  # untouched voxels keep their real HU
        spleen = str(1)
        ratio = (resized == 1).sum() / (labels == 1).sum()
        if scales[spleen] > 1.1:
            assert ratio > 1.05
        elif scales[spleen] < 0.9:
            assert ratio < 0.9
        ratios.append(ratio)
        drawn.append(scales[spleen])
    assert max(ratios) / min(ratios) > 1.1  # sizes really vary between draws ...
    assert np.corrcoef(drawn, ratios)[0, 1] > 0.8  # ... as drawn
    same = resize_organs(labels, hu, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(same[0], resize_organs(labels, hu, 1.0, np.random.default_rng(0))[0])
    untouched = resize_organs(labels, hu, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(untouched[0], labels) and np.testing.assert_array_equal(untouched[1], hu)


def test_resizing_keeps_every_other_draw_of_a_seed(source: Path, tmp_path: Path):
    """--organ-resize-prob draws from its own stream: phase, means and slab of case i stay those of seed s."""
    plain = write_synth_dataset(source, tmp_path / "p", cases=2, seed=7)
    resized = write_synth_dataset(source, tmp_path / "r", cases=2, seed=7,
                                  settings=SynthSettings(organ_resize_prob=1.0))
    a = json.loads((plain / "dataset.json").read_text())["logonet"]["cases"]
    b = json.loads((resized / "dataset.json").read_text())["logonet"]["cases"]
    for before, after in zip(a, b):
        assert "organ_scale" not in before and after["organ_scale"]
        assert {k: after[k] for k in before} == before
    assert (_read(plain / "labelsTr" / "synth_000.nii.gz") != _read(resized / "labelsTr" / "synth_000.nii.gz")).any()


# ------------------------------------------------------------------------------ veins inside the liver
def test_organ_veins_are_tubes_of_the_asked_diameter_inside_the_organ():
    organ = np.zeros((40, 60, 60), dtype=bool)
    organ[5:35, 5:55, 5:55] = True
    spacing = (3.0, 1.5, 1.5)  # z, y, x mm
    thin = organ_veins(organ, spacing, 4.0, 15.0, np.random.default_rng(0))
    thick = organ_veins(organ, spacing, 10.0, 15.0, np.random.default_rng(0))
    assert not (thin & ~organ).any() and not (thick & ~organ).any()
    assert 0.005 < thin.sum() / organ.sum() < thick.sum() / organ.sum() < 0.25
    # tubes, not blobs: no voxel lies deeper than about a radius inside a vein (distance in mm)
    from scipy import ndimage
    depth = ndimage.distance_transform_edt(thick, sampling=spacing)
    assert 2.0 < np.percentile(depth[thick], 99) < 10.0
    np.testing.assert_array_equal(thin, organ_veins(organ, spacing, 4.0, 15.0, np.random.default_rng(0)))
    assert not organ_veins(np.zeros_like(organ), spacing, 4.0, 15.0, np.random.default_rng(0)).any()


def test_veins_change_only_the_liver_image_at_the_drawn_vein_hu(source: Path):
    ct, seg = volumes.read_image(source / "images" / "case0.nii.gz"), volumes.read_image(source / "labels" / "case0.nii.gz")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayFromImage(seg).astype(np.int16)
    plain_array, plain_btcv, plain_info = synthesise(ct, hu, labels, seed=3, index=0, settings=PLAIN)
    settings = dataclasses.replace(PLAIN, vessel_prob=1.0)
    array, btcv, info = synthesise(ct, hu, labels, seed=3, index=0, settings=settings)
    np.testing.assert_array_equal(btcv, plain_btcv)  # still labelled liver
    changed = array != plain_array
    assert changed.any() and not (changed & (btcv != 6)).any()
    assert 0.01 < info["vein_share"]["5"] < 0.3
    assert {k: info[k] for k in plain_info} == plain_info  # its own random stream
    veins = info["mean_hu"]["systemic vein"], info["mean_hu"]["portal vein"]
    values = array[changed].astype(float)
    assert np.all((values > min(veins) - 6) & (values < max(veins) + 6))  # PLAIN: noise sd 1 HU
    np.testing.assert_array_equal(array, synthesise(ct, hu, labels, seed=3, index=0, settings=settings)[0])


# ------------------------------------------------------------------------------ an MR patient as a source
def mr_slab(shape=(6, 40, 50)):
    """A T1-like MR slab: air outside an elliptic body, bright subcutaneous fat, darker muscle-like interior
    with a gas-dark hole, a spleen (total_mr 1), a vertebra (19) and a disc (20)."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    r = ((x - 25) / 22.0) ** 2 + ((y - 20) / 17.0) ** 2
    mr = np.where(r < 1, 400.0, 5.0)  # fat inside the body, air outside
    mr[r < 0.6] = 80.0  # interior soft tissue
    mr[(r < 0.6) & ((x - 15) ** 2 + (y - 20) ** 2 < 4)] = 5.0  # dark, inside the body: not air
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:, 15:25, 30:38] = 1
    mr[:, 15:25, 30:38] = np.linspace(100, 140, 8)[None, None, :]  # a gradient: texture to carry over
    labels[:3, 28:32, 22:28], labels[3:, 28:32, 22:28] = 19, 20
    return mr.astype(np.float32), labels


def test_mr_source_becomes_ct_ids_and_pseudo_hu_in_the_right_classes():
    from logonet.data.synth import BACKGROUND_SPLIT, MR_TEXTURE_SCALE, mr_as_ct_source

    mr, labels_mr = mr_slab()
    hu, labels = mr_as_ct_source(mr, labels_mr)
    assert hu.shape == labels.shape == mr.shape
    assert (labels[labels_mr == 1] == 1).all() and (labels[labels_mr == 19] == 31).all()  # spleen, vertebra (bone)
    assert (labels[labels_mr == 20] == 0).all()  # a disc has no CT class: unlabelled soft tissue
    air, fat = BACKGROUND_SPLIT
    assert (hu[:, 0, 0] < air).all()  # outside the body
    assert (hu[:, 20, 5] >= air).all() and (hu[:, 20, 5] < fat).all()  # the bright rim: fat
    interior = (labels == 0) & (mr == 80.0)
    assert (hu[interior] >= fat).all()  # darker unlabelled body voxels: soft tissue ...
    assert (hu[:, 20, 15] >= fat).all()  # ... dark ones inside the body too (no air pockets from MR voids)
    spleen = hu[labels == 1]
    assert np.median(spleen) == pytest.approx(40.0)
    assert spleen.max() - spleen.min() == pytest.approx(MR_TEXTURE_SCALE * 40.0, rel=1e-4)  # texture kept, scaled
    with pytest.raises(UserError, match=r"\[77\] are not TotalSegmentator total_mr ids"):
        mr_as_ct_source(mr, np.where(labels_mr == 1, 77, labels_mr).astype(np.uint8))


def test_sample_mr_source_gives_synthetic_cts_on_its_grid_with_its_organs(sample_ct, tmp_path: Path):
    out = write_synth_dataset("sample-mr", tmp_path / "mr", cases=2, seed=3)
    again = write_synth_dataset("sample-mr", tmp_path / "mr2", cases=1, seed=3)
    source = volumes.read_image(sample_ct["mr"])
    for i in range(2):
        image = volumes.read_image(out / "imagesTr" / f"synth_{i:03d}.nii.gz")
        labels = sitk.GetArrayFromImage(volumes.read_image(out / "labelsTr" / f"synth_{i:03d}.nii.gz"))
        assert volumes.same_geometry(image, source, tol=1e-6)
        assert {1, 6, 8, 9} <= set(np.unique(labels).tolist())  # spleen, liver, aorta, IVC
        hu = sitk.GetArrayFromImage(image)
        assert hu.min() >= -1024 and np.median(hu[labels == 6]) > 20  # a liver of CT, not of MR intensities
    np.testing.assert_array_equal(_read(out / "imagesTr" / "synth_000.nii.gz"),
                                  _read(again / "imagesTr" / "synth_000.nii.gz"))
    meta = json.loads((out / "dataset.json").read_text())["logonet"]
    assert meta["sources"] == ["example_mr"]
