"""MONAI pipelines: crop size, value range, image/label alignment, the way back to the input grid, caching."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from logonet.data import datasets, volumes
from logonet.data.transforms import (PreprocessConfig, cached_dataset, infer_transforms, labels_to_input_grid,
                                     preprocess_for_inference, train_transforms, val_transforms)
from logonet.errors import UserError

LIVER, SPLEEN, GALLBLADDER, AORTA = 6, 1, 4, 8
PHANTOM_SPACING = (1.5, 1.5, 2.0)


@pytest.fixture(scope="module")
def cases(phantom_dataset: Path):
    return datasets.discover(phantom_dataset).labeled()


def organ_means(image: torch.Tensor, label: torch.Tensor) -> dict:
    img, lab = image[0].numpy(), label[0].numpy()
    return {int(v): float(img[lab == v].mean()) for v in np.unique(lab) if v and (lab == v).sum() >= 20}


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(roi_size=(64, 64, 32), num_samples=2, cache_dir="/tmp/x")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["spacing"] == [1.5, 1.5, 2.0] and data["intensity_window"] == [-175.0, 250.0]
    assert data["orientation"] == "RAS" and data["roi_size"] == [64, 64, 32]
    assert PreprocessConfig.from_dict(data) == cfg
    # model.json from a newer version may carry more keys; the four core keys alone are enough.
    partial = PreprocessConfig.from_dict({"orientation": "RAS", "spacing": [1, 1, 1], "intensity_window": [-100, 2000],
                                          "roi_size": [96, 96, 96], "future_key": 1})
    assert partial.spacing == (1.0, 1.0, 1.0) and partial.flip_prob == 0.2 and partial.rot90_prob == 0.2
    assert PreprocessConfig.preset("msd") == partial
    with pytest.raises(UserError, match="intensity_window must be"):
        PreprocessConfig(intensity_window=(250, -175))
    with pytest.raises(UserError, match="spacing must be 3 numbers"):
        PreprocessConfig.from_dict({"spacing": [1, 2]})
    with pytest.raises(UserError, match="flip_prob must be a probability"):
        PreprocessConfig(flip_prob=2)


@pytest.mark.parametrize("roi", [(32, 32, 32), (64, 64, 32)])  # 64 > the 48^3 phantom: padded
def test_training_crops_have_roi_size_unit_range_and_aligned_labels(cases, roi):
    cfg = PreprocessConfig(spacing=PHANTOM_SPACING, roi_size=roi, num_samples=3, flip_prob=1.0, rot90_prob=1.0,
                           intensity_prob=0.0, augment="paper")
    torch.manual_seed(0)
    pipeline = train_transforms(cfg)
    pipeline.set_random_state(seed=0)
    crops = pipeline(dict(cases[0]))
    assert len(crops) == 3
    liver_seen = False
    for crop in crops:
        image, label = crop["image"], crop["label"]
        assert tuple(image.shape) == (1,) + roi and tuple(label.shape) == (1,) + roi
        assert image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert set(np.unique(label.numpy())) <= set(range(14))
        means = organ_means(image, label)
        # Flipped/rotated image and label must move together: each organ keeps its own intensity.
        if LIVER in means:
            liver_seen = True
            assert 0.55 < means[LIVER] < 0.8  # liver ~110 HU -> (110 + 175) / 425
            if AORTA in means:
                assert means[AORTA] > means[LIVER] + 0.05
            if GALLBLADDER in means:
                assert means[GALLBLADDER] < means[LIVER] - 0.1
    assert liver_seen


def test_class_balanced_crops_centre_small_organs_as_often_as_large_ones(cases):
    """crop_by="classes": each of the 14 classes is the centre of about one crop in 14, the adrenal glands
    (14 voxels each at this size) included; the foreground/background default almost never centres on them."""
    values = list(range(1, 14))
    counts = {}
    for mode in ("foreground", "classes"):
        cfg = PreprocessConfig(spacing=PHANTOM_SPACING, roi_size=(8, 8, 8), num_samples=140, crop_by=mode,
                               flip_prob=0.0, rot90_prob=0.0, intensity_prob=0.0)
        pipeline = train_transforms(cfg, label_values=values)
        pipeline.set_random_state(seed=0)
        crops = pipeline(dict(cases[0]))
        counts[mode] = np.bincount([int(c["label"][0, 4, 4, 4]) for c in crops], minlength=14)
    assert counts["classes"].min() >= 3  # ~10 expected; a crop at the border is shifted off its centre
    assert counts["classes"][12] + counts["classes"][13] >= 10 > 5 > counts["foreground"][12] + counts["foreground"][13]
    with pytest.raises(UserError, match="crop_by must be one of"):
        PreprocessConfig(crop_by="organs")
    with pytest.raises(UserError, match="label values"):
        train_transforms(PreprocessConfig(crop_by="classes"))


def test_intensity_augmentation_still_in_unit_range(cases):
    cfg = PreprocessConfig(spacing=PHANTOM_SPACING, roi_size=(32, 32, 32), num_samples=2, intensity_prob=1.0,
                           intensity_scale=0.5, intensity_shift=0.5, augment="paper")
    for crop in train_transforms(cfg)(dict(cases[1])):
        assert float(crop["image"].min()) >= 0.0 and float(crop["image"].max()) <= 1.0


def _random_steps(cfg: PreprocessConfig) -> list:
    return [type(t).__name__ for t in train_transforms(cfg, label_values=list(range(1, 14))).transforms
            if type(t).__name__.startswith("Rand")]


def test_default_augmentation_is_nnunet_like_without_mirroring():
    """Default: rotation/scaling, noise, blur, brightness, HU shift, gamma, low resolution; never a flip (a
    mirrored right kidney would be labelled right but lie on the left) nor rot90. "paper" and "none" remain."""
    assert PreprocessConfig().augment == "nnunet"
    default = _random_steps(PreprocessConfig(crop_by="classes"))
    assert default == ["RandCropByLabelClassesd", "RandAffined", "RandGaussianNoised", "RandGaussianSmoothd",
                       "RandScaleIntensityd", "RandShiftIntensityd", "RandAdjustContrastd",
                       "RandSimulateLowResolutiond"]
    assert "RandFlipd" in _random_steps(PreprocessConfig(crop_by="classes", augment="paper"))
    assert _random_steps(PreprocessConfig(crop_by="classes", augment="none")) == ["RandCropByLabelClassesd"]
    with pytest.raises(UserError, match="augment must be one of"):
        PreprocessConfig(augment="heavy")


def test_default_augmentation_changes_crops_but_keeps_labels_aligned_and_range(cases):
    """Over many draws the nnU-Net-like crops differ from the plain ones (intensity and geometry), stay in
    [0, 1], keep channel-index labels, and each organ keeps its relative brightness (image and label move
    together)."""
    plain_cfg = PreprocessConfig(spacing=PHANTOM_SPACING, roi_size=(32, 32, 32), num_samples=8, augment="none")
    aug_cfg = PreprocessConfig(spacing=PHANTOM_SPACING, roi_size=(32, 32, 32), num_samples=8)
    plain, augmented = train_transforms(plain_cfg), train_transforms(aug_cfg)
    plain.set_random_state(seed=3)
    augmented.set_random_state(seed=3)  # same crop centres: the difference is the augmentation
    changed = 0
    for a, b in zip(plain(dict(cases[0])), augmented(dict(cases[0]))):
        image, label = b["image"], b["label"]
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert set(np.unique(label.numpy())) <= set(range(14))
        changed += int(not torch.equal(a["image"], image))
        means = organ_means(image, label)
        if LIVER in means and GALLBLADDER in means:
            assert means[GALLBLADDER] < means[LIVER]
    assert changed >= 4


def test_known_organ_lands_where_it_should(cases):
    """The liver's world position after RAS reorientation equals its position in the raw phantom file."""
    cfg = PreprocessConfig(spacing=PHANTOM_SPACING)
    data = val_transforms(cfg)(dict(cases[0]))
    image, label = data["image"], data["label"]
    assert image.shape == label.shape and float(image.min()) >= 0 and float(image.max()) <= 1
    affine = label.affine.numpy()
    assert np.allclose(np.diag(affine)[:3], PHANTOM_SPACING)  # RAS: positive axes

    def centroid_ras(value):
        idx = np.argwhere(label[0].numpy() == value).mean(axis=0)
        return (affine @ np.append(idx, 1.0))[:3]

    raw = volumes.read_image(cases[0]["label"])
    raw_array = sitk.GetArrayFromImage(raw)
    for value in (LIVER, SPLEEN, AORTA):
        zyx = np.argwhere(raw_array == value).mean(axis=0)
        lps = np.array(raw.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))
        expected_ras = lps * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(centroid_ras(value), expected_ras, atol=0.5)
    # Anatomy: liver on the patient's right (+x in RAS), spleen on the left.
    assert centroid_ras(LIVER)[0] > 5 > 0 > -5 > centroid_ras(SPLEEN)[0]  # body centred on x = 0


def test_prediction_maps_back_onto_an_oblique_input_grid_exactly(cases, tmp_path: Path):
    raw_image = volumes.read_image(cases[0]["image"])
    raw_label = volumes.read_image(cases[0]["label"])
    # An input stored in an unusual orientation (axes permuted and flipped, same physical voxels).
    image = sitk.Flip(sitk.PermuteAxes(raw_image, [2, 0, 1]), [True, False, False])
    truth = sitk.Flip(sitk.PermuteAxes(raw_label, [2, 0, 1]), [True, False, False])
    cfg = PreprocessConfig(spacing=PHANTOM_SPACING)
    x = preprocess_for_inference(image, cfg)
    assert x.shape[0] == 1 and x.dtype == torch.float32
    # A perfect network: one-hot scores from the label put through the same geometric pipeline.
    processed = val_transforms(cfg, keys=("image", "label"))(
        {"image": volumes.write_image(image, tmp_path / "img.nii.gz"), "label": volumes.write_image(truth, tmp_path / "lab.nii.gz")})
    assert processed["label"].shape == x.shape
    np.testing.assert_allclose(processed["label"].affine.numpy(), x.affine.numpy(), atol=1e-6)
    scores = torch.nn.functional.one_hot(processed["label"][0].as_tensor().long(), 14).permute(3, 0, 1, 2).float()[None]
    scores = type(x)(scores, affine=x.affine)  # MetaTensor (1, C, X, Y, Z) as a sliding-window output
    back = labels_to_input_grid(scores, image)
    assert volumes.same_geometry(back, image, tol=0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(truth))


def test_prediction_at_other_spacing_maps_back_closely(cases):
    image, truth = volumes.read_image(cases[1]["image"]), volumes.read_image(cases[1]["label"])
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.5))
    out = val_transforms(cfg)(dict(cases[1]))
    back = labels_to_input_grid(out["label"], image)  # (1, X, Y, Z) labels work too
    assert volumes.same_geometry(back, image, tol=0)
    a, b = sitk.GetArrayFromImage(back) == LIVER, sitk.GetArrayFromImage(truth) == LIVER
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9


def test_infer_transforms_on_a_path_match_preprocess_for_inference(cases):
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0))
    from_path = infer_transforms(cfg)({"image": cases[2]["image"]})["image"]
    from_image = preprocess_for_inference(volumes.read_image(cases[2]["image"]), cfg)
    assert from_path.shape == from_image.shape
    np.testing.assert_allclose(from_path.numpy(), from_image.numpy(), atol=1e-5)
    np.testing.assert_allclose(from_path.affine.numpy(), from_image.affine.numpy(), atol=1e-9)


def test_persistent_cache_skips_preprocessing_on_the_second_epoch(cases, tmp_path: Path, monkeypatch):
    cfg = PreprocessConfig(spacing=PHANTOM_SPACING, roi_size=(32, 32, 32), num_samples=1)
    items = cases[:2]
    ds = cached_dataset(items, train_transforms(cfg), tmp_path / "cache")
    first = [ds[i][0]["image"].shape for i in range(len(ds))]
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 2

    def no_reading(*args, **kwargs):
        raise AssertionError("volume read again although it is cached")

    monkeypatch.setattr(volumes, "read_image", no_reading)
    second = [cached_dataset(items, train_transforms(cfg), tmp_path / "cache")[i][0]["image"].shape
              for i in range(len(ds))]
    assert first == second
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.pt")) == cached
    # Other settings must not reuse those files.
    other = cached_dataset(items, train_transforms(PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi_size=(32, 32, 32))),
                           tmp_path / "cache")
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the transform's error
        other[0]
    assert "read again although it is cached" in str(caught.value.__cause__)


def test_antialias_sigma_follows_the_downsampling_factor():
    from logonet.data.transforms import antialias_sigma

    assert antialias_sigma((1.0, 1.0, 2.0), (3.0, 3.0, 3.0)) == pytest.approx((1.0, 1.0, 0.25))
    assert antialias_sigma((3.0, 3.0, 3.0), (3.0, 3.0, 3.0)) == (0.0, 0.0, 0.0)
    assert antialias_sigma((5.0, 0.5, 3.0), (3.0, 3.0, 3.0)) == pytest.approx((0.0, 2.5, 0.0))  # upsampling: none


def noise_scan(spacing, size=(60, 60, 30), seed=0) -> sitk.Image:
    """A water cylinder in air with 40 HU white noise per voxel, as a fine-grid CT has."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]]
    body = (x - size[0] / 2) ** 2 + (y - size[1] / 2) ** 2 < (0.4 * size[0]) ** 2
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 40.0, body.shape)
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing(spacing)
    return image


def test_antialiasing_takes_a_fine_scans_noise_down_and_leaves_a_native_one_alone():
    fine = noise_scan((1.0, 1.0, 2.0))
    # No foreground crop: the low-pass softens the body's edge, so the crop could differ by a voxel.
    on = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_foreground=False)
    off = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_foreground=False, antialias=False)
    smooth, raw = preprocess_for_inference(fine, on), preprocess_for_inference(fine, off)
    assert smooth.shape == raw.shape
    np.testing.assert_allclose(smooth.affine.numpy(), raw.affine.numpy(), atol=1e-9)  # same grid
    centre = (0, slice(6, 14), slice(6, 14), slice(3, 7))  # inside the cylinder, away from its edge
    # 40 HU / 425 HU window = 0.094 per voxel; interpolation alone keeps most of it, the low-pass about a third.
    assert float(raw[centre].std()) > 0.06
    assert float(smooth[centre].std()) < 0.5 * float(raw[centre].std())
    assert float(smooth[centre].mean()) == pytest.approx(float(raw[centre].mean()), abs=0.01)  # HU kept
    native = noise_scan((3.0, 3.0, 3.0), size=(20, 20, 10))
    np.testing.assert_array_equal(preprocess_for_inference(native, on).numpy(),
                                  preprocess_for_inference(native, off).numpy())


def test_antialias_is_an_inference_field_of_the_card():
    cfg = PreprocessConfig(antialias=False)
    assert cfg.card_dict()["antialias"] is False
    assert PreprocessConfig.from_dict(cfg.card_dict()).antialias is False
    assert PreprocessConfig.from_dict({"spacing": [3, 3, 3]}).antialias is True  # older cards: on
    with pytest.raises(UserError, match="antialias must be true or false"):
        PreprocessConfig(antialias="yes")


def test_antialiasing_leaves_the_callers_tensor_alone():
    from logonet.data.transforms import AntiAliasd

    image = volumes.image_to_metatensor(noise_scan((1.0, 1.0, 2.0), size=(12, 12, 6)), add_channel=True,
                                        dtype=np.float32)
    before = image.clone()
    out = AntiAliasd(keys="image", pixdim=(3.0, 3.0, 3.0))({"image": image})["image"]
    np.testing.assert_array_equal(image.numpy(), before.numpy())
    assert float(out.std()) < float(image.std())
    np.testing.assert_allclose(out.affine.numpy(), image.affine.numpy())


def test_thin_slab_keeps_one_contiguous_axial_slab_of_the_drawn_thickness():
    """--slab-prob: a crop keeps one run of whole axial slices 30-60 mm thick (10-20 at 3 mm), image and label
    alike; everything else is 0 in both (the window's low end, as inference pads a thin series; background).
    Deterministic by seed; off by default."""
    from logonet.data.transforms import augmentations, thin_slab

    assert PreprocessConfig().slab_prob == 0.0
    assert not any(type(t).__name__ == "RandCoarseDropoutd" for t in augmentations(PreprocessConfig()))
    cfg = PreprocessConfig(spacing=(3.0, 3.0, 3.0), slab_prob=1.0)
    assert type(augmentations(cfg)[-1]).__name__ == "RandCoarseDropoutd"
    image = torch.rand(1, 40, 36, 64) * 0.9 + 0.1  # no zero before the transform
    label = torch.randint(1, 5, (1, 40, 36, 64)).float()
    thicknesses = set()
    for seed in range(12):
        slab = thin_slab(cfg)
        slab.set_random_state(seed)
        out = slab({"image": image.clone(), "label": label.clone()})
        kept = np.flatnonzero((np.asarray(out["image"])[0] != 0).any(axis=(0, 1)))
        assert kept.size and np.array_equal(kept, np.arange(kept[0], kept[-1] + 1))  # contiguous z run
        thicknesses.add(kept.size)
        assert 10 <= kept.size <= 20
        inside = np.zeros(64, dtype=bool)
        inside[kept] = True
        assert np.array_equal(np.asarray(out["image"])[..., inside], np.asarray(image)[..., inside])
        assert np.array_equal(np.asarray(out["label"])[..., inside], np.asarray(label)[..., inside])
        assert not np.asarray(out["image"])[..., ~inside].any() and not np.asarray(out["label"])[..., ~inside].any()
        again = thin_slab(cfg)
        again.set_random_state(seed)
        assert np.array_equal(np.asarray(again({"image": image.clone(), "label": label.clone()})["image"]),
                              np.asarray(out["image"]))
    assert len(thicknesses) > 3  # the thickness is drawn, not fixed
    with pytest.raises(UserError, match="slab_prob"):
        PreprocessConfig(slab_prob=1.5)
    with pytest.raises(UserError, match="slab_mm"):
        PreprocessConfig(slab_mm=(60.0, 30.0))
