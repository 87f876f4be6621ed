"""Synthetic labelled CTs from real label maps: ``logonet synth SOURCE OUT --cases N --seed S``.

Domain randomisation in the manner of SynthSeg (Billot et al., 2023), adapted to CT's physical HU scale. A
source case is a real CT with a TotalSegmentator label map (117 structures: organs, bones, muscles, vessels,
bowel), or an MR with a TotalSegmentator ``total_mr`` map (``sample-mr``: another patient's anatomy; its ids are
mapped to CT ids and its air/fat/soft tissue split is made on MR intensities, :func:`mr_as_ct_source`). Each
synthetic case:

1. deforms CT and label map together (MONAI ``Rand3DElasticd``: rotation, scaling, elastic field) and, if
   asked (``--organ-resize-prob``), grows or shrinks single organs about their centres: one patient's map has one
   spleen size, patients have many (:data:`ORGAN_SCALE`);
2. splits the unlabelled voxels by the real HU into air, fat and soft tissue, so every voxel has a tissue;
3. draws a contrast phase (native, arterial, portal-venous, delayed) and, per tissue, a mean HU from that
   phase's realistic range (:data:`TISSUES`) and a texture weight: the new image is the drawn mean plus a
   random share of the real scan's own texture around that tissue's median, plus per-tissue noise; if asked
   (``--vessel-prob``), the liver gets a random network of veins at the phase's vein HU (:func:`organ_veins`);
4. degrades it with MONAI's random transforms (blur, bias field, noise, simulated low resolution);
5. sometimes keeps only a thin axial slab (a partial field of view, like a 20-slice series), air elsewhere;
6. writes the HU image (int16) and the BTCV label map on the source's exact grid (MSD layout).

Only the per-organ resizing (in step 1), the MR-to-CT source mapping and the label-to-HU synthesis (steps 2, 3 and
5, the veins of step 3 included) are written here: no library resizes single labelled organs or draws CT tissue intensities from label maps. Case ``i`` of seed ``s`` is the same whatever ``--cases`` is.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .datasets import write_dataset_json
from ..errors import UserError
from . import volumes
from .labels import BTCV_NAMES, remap_labels, totalseg_to_btcv

PHASES: Tuple[str, ...] = ("native", "arterial", "portal", "delayed")


@dataclass(frozen=True)
class Tissue:
    """A tissue: the TotalSegmentator ids it covers and a mean-HU range per contrast phase."""

    name: str
    ids: Tuple[int, ...]
    hu: Mapping[str, Tuple[float, float]]  # phase -> (low, high) of the drawn mean


def _same(low: float, high: float) -> Dict[str, Tuple[float, float]]:
    return {phase: (low, high) for phase in PHASES}


def _phases(native, arterial, portal, delayed) -> Dict[str, Tuple[float, float]]:
    return dict(zip(PHASES, (native, arterial, portal, delayed)))


#: Mean-HU ranges from CT literature (unenhanced organ HU; enhancement curves of multiphase abdominal CT),
#: widened to cover scanners and contrast timing. TotalSegmentator v2 ("total") ids.
TISSUES: Tuple[Tissue, ...] = (
    Tissue("liver", (5,), _phases((40, 70), (55, 90), (85, 140), (70, 105))),
    Tissue("spleen", (1,), _phases((35, 55), (85, 160), (95, 145), (80, 115))),
    Tissue("kidney", (2, 3), _phases((25, 45), (120, 230), (130, 220), (110, 200))),
    Tissue("kidney cyst", (23, 24), _same(-5, 20)),
    Tissue("pancreas", (7,), _phases((30, 55), (85, 150), (75, 125), (60, 95))),
    Tissue("adrenal", (8, 9), _phases((10, 45), (50, 110), (50, 100), (40, 80))),
    Tissue("gallbladder", (4,), _same(-5, 30)),
    Tissue("stomach", (6,), _phases((10, 45), (20, 80), (30, 90), (30, 80))),
    Tissue("bowel", (18, 19, 20), _phases((10, 45), (20, 80), (30, 95), (30, 85))),
    Tissue("esophagus", (15,), _phases((30, 50), (40, 80), (50, 90), (40, 80))),
    Tissue("artery", (52, 54, 55, 56, 57, 58, 65, 66), _phases((30, 55), (200, 450), (130, 230), (90, 150))),
    Tissue("systemic vein", (59, 60, 62, 63, 67, 68), _phases((30, 55), (50, 120), (110, 180), (90, 140))),
    Tissue("portal vein", (64,), _phases((30, 55), (60, 140), (130, 220), (100, 150))),
    Tissue("heart", (51, 53, 61), _phases((35, 55), (150, 380), (120, 200), (90, 140))),
    Tissue("lung", (10, 11, 12, 13, 14), _same(-900, -750)),
    Tissue("airway", (16,), _same(-1000, -900)),
    Tissue("thyroid", (17,), _phases((70, 120), (120, 220), (110, 190), (100, 150))),
    Tissue("bladder", (21,), _same(-5, 25)),
    Tissue("prostate", (22,), _phases((30, 50), (50, 90), (55, 100), (50, 85))),
    Tissue("bone", tuple(range(25, 51)) + tuple(range(69, 79)) + (91,) + tuple(range(92, 117)), _same(150, 500)),
    Tissue("cartilage", (117,), _same(80, 220)),
    Tissue("spinal cord", (79,), _same(20, 45)),
    Tissue("muscle", tuple(range(80, 90)), _phases((35, 60), (45, 75), (50, 80), (45, 75))),
    Tissue("brain", (90,), _same(25, 45)),
    # Unlabelled voxels, split by the real scan's HU (see BACKGROUND_SPLIT).
    Tissue("air", (), _same(-1024, -960)),
    Tissue("fat", (), _same(-130, -70)),
    Tissue("soft tissue", (), _phases((10, 50), (20, 70), (25, 80), (20, 70))),
)
#: Per-organ linear scale range (TotalSegmentator id -> (low, high), drawn log-uniformly), from the spread of
#: adult organ sizes: spleen volume varies about threefold between healthy adults and more with splenomegaly;
#: liver and kidneys less. The BTCV organs and the vessels the model must find.
ORGAN_SCALE: Dict[int, Tuple[float, float]] = {
    1: (0.8, 1.5),  # spleen
    5: (0.85, 1.25),  # liver
    2: (0.85, 1.2), 3: (0.85, 1.2),  # kidneys
    4: (0.7, 1.5),  # gallbladder
    6: (0.8, 1.4),  # stomach (filling)
    7: (0.8, 1.3),  # pancreas
    52: (0.85, 1.3), 63: (0.75, 1.5), 64: (0.8, 1.4),  # aorta, inferior vena cava, portal/splenic vein
}
#: Vessels are resized in-plane only: a wider vessel is not a longer one.
IN_PLANE_ONLY = frozenset({52, 63, 64})
#: What a growing organ may take over: unlabelled tissue and bowel (ids 18-20), never another organ or bone.
DISPLACEABLE = (0, 18, 19, 20)
#: Organs whose label holds the veins that run through them, and those veins' tissues: TotalSegmentator's liver
#: (id 5) includes the hepatic and intrahepatic portal veins. A contrast CT shows them bright inside the liver; a
#: native source CT does not, and a model trained on it takes enhanced hepatic veins for the IVC (see
#: :func:`organ_veins`).
VESSEL_ORGANS: Dict[int, Tuple[str, ...]] = {5: ("systemic vein", "portal vein")}
#: HU given to the band a shrinking organ leaves: fat, as around real organs.
VACATED_HU = -100.0
#: Real HU thresholds that split unlabelled voxels: below the first is air, below the second fat, else soft tissue.
BACKGROUND_SPLIT: Tuple[float, float] = (-400.0, -30.0)
_TISSUE_INDEX = {t.name: i for i, t in enumerate(TISSUES)}
#: Texture deviations kept from the real scan are clipped to this many HU (keeps gas and cortical bone).
TEXTURE_CLIP = 600.0


@dataclass
class SynthSettings:
    """Randomisation ranges (defaults tuned for 3 mm abdominal source maps)."""

    rotate_deg: float = 12.0  # max rotation about each axis
    scale: float = 0.15  # scaling drawn in [1 - s, 1 + s] per axis
    elastic_magnitude: Tuple[float, float] = (0.0, 6.0)  # Rand3DElasticd, voxels
    elastic_sigma: Tuple[float, float] = (6.0, 10.0)
    texture: Tuple[float, float] = (0.0, 1.0)  # share of the real scan's texture kept
    tissue_noise: Tuple[float, float] = (3.0, 20.0)  # per-tissue voxel noise sd, HU
    slab_prob: float = 0.35  # keep only a thin axial slab ...
    slab_mm: Tuple[float, float] = (30.0, 90.0)  # ... of this thickness
    blur_prob: float = 0.5
    bias_prob: float = 0.3
    noise_prob: float = 0.5
    lowres_prob: float = 0.3
    organ_resize_prob: float = 0.0  # per organ of ORGAN_SCALE: 0 keeps the cases of earlier seeds unchanged
    vessel_prob: float = 0.0  # per case, veins drawn inside VESSEL_ORGANS: 0 keeps earlier seeds' cases unchanged
    vessel_mm: Tuple[float, float] = (5.0, 12.0)  # their diameter (hepatic vein branches to trunks)
    vessel_spread_mm: Tuple[float, float] = (15.0, 30.0)  # correlation length of the fields that lay them out


# ------------------------------------------------------------------------------------------ sources
#: ``logonet synth`` SOURCE names that mean the sample (:func:`source_cases`).
SAMPLE_SOURCES = ("sample", "sample-mr")
#: TotalSegmentator "total_mr" id -> "total" (CT) id, by structure name (TotalSegmentator's map_to_binary.py).
#: MR has one "vertebrae" class (taken as L1: the tissue, bone, is what matters) and whole lungs (taken as lower
#: lobes); intervertebral discs (20) have no CT class and become unlabelled soft tissue.
TOTAL_MR_TO_TOTAL: Dict[int, int] = {
    1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 11, 11: 14, 12: 15, 13: 18, 14: 19, 15: 20, 16: 21,
    17: 22, 18: 25, 19: 31, 20: 0, 21: 79, 22: 51, 23: 52, 24: 63, 25: 64, 26: 65, 27: 66, 28: 67, 29: 68,
    30: 69, 31: 70, 32: 71, 33: 72, 34: 73, 35: 74, 36: 75, 37: 76, 38: 77, 39: 78, 40: 80, 41: 81, 42: 82,
    43: 83, 44: 84, 45: 85, 46: 86, 47: 87, 48: 88, 49: 89, 50: 90,
}
#: Pseudo-HU of an MR source's unlabelled voxels, inside each BACKGROUND_SPLIT class: air, fat, soft tissue.
MR_BACKGROUND_HU: Tuple[float, float, float] = (-1000.0, -100.0, 40.0)
#: MR intensity deviation -> HU deviation: the texture an MR source lends its synthetic CTs (deviations are
#: clipped so that no unlabelled voxel changes class).
MR_TEXTURE_SCALE = 0.5


def mr_as_ct_source(mr: np.ndarray, labels_mr: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """An MR image and its TotalSegmentator ``total_mr`` map -> (pseudo-HU, ``total`` ids), for synthesis.

    SynthSeg's point is that a label map, not the image, carries the anatomy: an MR patient is one more anatomy.
    synthesise() needs per voxel a tissue (labels, and air/fat/soft tissue for unlabelled voxels) and a texture
    (the deviation from the tissue's median). Air is the dark outside of the body (Otsu on the whole image, holes
    filled per slice); unlabelled body voxels are fat where brighter than an Otsu split of their intensities (fat
    is bright on the T1/T2-weighted abdominal MR TotalSegmentator handles), else soft tissue; labelled voxels get
    their MR deviation from the structure's median x :data:`MR_TEXTURE_SCALE`. Arrays are (z, y, x).
    """
    from scipy import ndimage

    if mr.shape != labels_mr.shape:
        raise UserError(f"the MR image {mr.shape} and its label map {labels_mr.shape} differ in shape")
    unknown = sorted(set(np.unique(labels_mr).tolist()) - {0} - set(TOTAL_MR_TO_TOTAL))
    if unknown:
        raise UserError(f"label values {unknown[:10]} are not TotalSegmentator total_mr ids (1-50)")
    labels = remap_labels(labels_mr, TOTAL_MR_TO_TOTAL).astype(np.int16)
    image = mr.astype(np.float32)
    body = image > _otsu(image.ravel())
    body = np.stack([ndimage.binary_fill_holes(plane) for plane in body]) | (labels_mr > 0)
    air, fat, soft = MR_BACKGROUND_HU
    pseudo = np.full(image.shape, air, dtype=np.float32)
    unlabelled = body & (labels == 0)
    if unlabelled.any():
        split = _otsu(image[unlabelled])
        for mask, base in ((unlabelled & (image > split), fat), (unlabelled & (image <= split), soft)):
            if mask.any():
                deviation = MR_TEXTURE_SCALE * (image[mask] - np.median(image[mask]))
                pseudo[mask] = base + np.clip(deviation, -25.0, 25.0)  # stays inside its BACKGROUND_SPLIT class
    for value in np.unique(labels[labels > 0]):
        mask = labels == value
        pseudo[mask] = soft + MR_TEXTURE_SCALE * (image[mask] - np.median(image[mask]))
    return pseudo, labels


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a set of intensities (SimpleITK's filter on them as a 1-row image)."""
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(np.asarray(values, dtype=np.float32)[None]))
    return float(otsu.GetThreshold())


def source_cases(source: volumes.PathLike) -> List[Dict[str, str]]:
    """``[{"id", "image", "label"}]`` from a labelled dataset folder whose labels are TotalSegmentator ids, or
    from ``"sample"``: the sample's training CT, or ``"sample-mr"``: the sample's MR slab of another patient with
    its ``total_mr`` map (``"kind": "total_mr"``, see :func:`mr_as_ct_source`). Never the DICOM series or the
    aorta_report scan, which are kept for testing."""
    if str(source) in SAMPLE_SOURCES:
        from .sample import fetch_sample

        paths = fetch_sample()
        if str(source) == "sample-mr":
            return [{"id": "example_mr", "image": paths["mr"], "label": paths["mr_labels_totalseg_mr"],
                     "kind": "total_mr"}]
        return [{"id": "example_ct", "image": paths["ct"], "label": paths["ct_labels_totalseg"]}]
    from . import datasets

    cases = datasets.validate(source, require_labels=True).labeled()  # ids are checked by _load_source
    if not cases:
        raise UserError(f"{source} has no image + label pairs to synthesise from")
    return [{"id": str(c["id"]), "image": str(c["image"]), "label": str(c["label"])} for c in cases]


def _load_source(case: Mapping[str, str]) -> Tuple[sitk.Image, np.ndarray, np.ndarray]:
    image = volumes.read_image(case["image"])
    label = volumes.read_image(case["label"])
    if not volumes.same_geometry(image, label):
        raise UserError(f"{case['id']}: the label map is not on the image's grid "
                        f"({'; '.join(volumes.geometry_differences(image, label))})")
    labels = sitk.GetArrayFromImage(label)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise UserError(f"{case['id']}: {case['label']} is not a label map of non-negative integers")
    if case.get("kind") == "total_mr":
        try:
            hu, ct_labels = mr_as_ct_source(sitk.GetArrayFromImage(image), labels)
        except UserError as error:
            raise UserError(f"{case['id']}: {error}") from None
        return image, hu, ct_labels
    if not np.isin(np.unique(labels), [0] + [i for t in TISSUES for i in t.ids]).all():
        unknown = sorted(set(np.unique(labels).tolist()) - {0} - {i for t in TISSUES for i in t.ids})
        raise UserError(f"{case['id']}: label values {unknown[:10]} are not TotalSegmentator ids; synth needs a "
                        "TotalSegmentator 'total' label map (ids 1-117)")
    return image, sitk.GetArrayFromImage(image).astype(np.float32), labels.astype(np.int16)


# ------------------------------------------------------------------------------------------ one case
def _tissue_map(labels: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Tissue index per voxel: labelled structures by id, unlabelled ones by the real HU."""
    lut = np.full(int(max(labels.max(), 117)) + 1, -1, dtype=np.int16)
    for index, tissue in enumerate(TISSUES):
        for i in tissue.ids:
            lut[i] = index
    tissue = lut[labels]
    background = tissue < 0
    air, fat = BACKGROUND_SPLIT
    tissue[background & (hu < air)] = _TISSUE_INDEX["air"]
    tissue[background & (hu >= air) & (hu < fat)] = _TISSUE_INDEX["fat"]
    tissue[background & (hu >= fat)] = _TISSUE_INDEX["soft tissue"]
    return tissue


def draw_intensities(rng: np.random.Generator) -> Dict[str, Any]:
    """The per-case draw: phase, and per tissue a mean HU (inside the phase's range) and a noise sd."""
    phase = PHASES[int(rng.integers(len(PHASES)))]
    means = [float(rng.uniform(*t.hu[phase])) for t in TISSUES]
    return {"phase": phase, "means": means}


def _synthesise_hu(tissue: np.ndarray, hu: np.ndarray, draw: Mapping[str, Any], texture: float,
                   noise_sd: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Drawn tissue means + ``texture`` x the real scan's deviation from each tissue's median + voxel noise."""
    out = np.empty(hu.shape, dtype=np.float32)
    for index, mean in enumerate(draw["means"]):
        mask = tissue == index
        if not mask.any():
            continue
        real = hu[mask]
        deviation = np.clip(real - np.median(real), -TEXTURE_CLIP, TEXTURE_CLIP)
        out[mask] = mean + texture * deviation + rng.normal(0.0, noise_sd[index], size=real.shape)
    return out


def _spatial(settings: SynthSettings, seed: int):
    from monai import transforms as mt

    rad = np.deg2rad(settings.rotate_deg)
    t = mt.Rand3DElasticd(keys=["image", "label"], sigma_range=settings.elastic_sigma,
                          magnitude_range=settings.elastic_magnitude, prob=1.0,
                          rotate_range=(rad, rad, rad), scale_range=(settings.scale,) * 3,
                          mode=("bilinear", "nearest"), padding_mode="border")
    t.set_random_state(seed=seed)
    return t


def resize_organs(labels: np.ndarray, hu: np.ndarray, probability: float, rng: np.random.Generator
                  ) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
    """Grow or shrink each organ of :data:`ORGAN_SCALE` (with ``probability``) about its centre; (labels, hu,
    {id: scale}). A grown organ takes over only :data:`DISPLACEABLE` voxels, at its own median real HU (so the
    synthesis gives it the organ's texture-free mean); a shrunk one leaves fat behind. Arrays are (z, y, x)."""
    from scipy import ndimage

    labels, hu = labels.copy(), hu.copy()
    scales: Dict[str, float] = {}
    for organ in rng.permutation(sorted(ORGAN_SCALE)).tolist():
        if rng.uniform() >= probability:
            continue
        low, high = ORGAN_SCALE[organ]
        zoom = np.exp(rng.uniform(np.log(low), np.log(high))) * rng.uniform(0.9, 1.1, size=3)  # mildly anisotropic
        mask = labels == organ
        if not mask.any():
            continue
        if organ in IN_PLANE_ONLY:
            zoom[0] = 1.0
        where = np.argwhere(mask)
        first, last = where.min(axis=0), where.max(axis=0)
        centre = (first + last) / 2.0
        reach = (last - first) / 2.0 * max(1.0, float(zoom.max())) + 2
        lo = np.maximum(0, np.floor(centre - reach)).astype(int)
        hi = np.minimum(labels.shape, np.ceil(centre + reach) + 1).astype(int)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        inside = mask[box]
        local = centre - lo  # output voxel x samples the organ at local + (x - local) / zoom
        scaled = ndimage.affine_transform(inside.astype(np.float32), 1.0 / zoom, offset=local - local / zoom,
                                          order=1) > 0.5
        box_labels, box_hu = labels[box], hu[box]  # views: writes land in labels and hu
        grown = scaled & ~inside & np.isin(box_labels, DISPLACEABLE)
        vacated = inside & ~scaled
        box_hu[grown] = float(np.median(hu[mask]))
        box_labels[grown] = organ
        box_labels[vacated] = 0
        box_hu[vacated] = VACATED_HU
        scales[str(organ)] = round(float(np.prod(zoom)) ** (1 / 3), 3)
    return labels, hu, scales


def organ_veins(organ: np.ndarray, spacing_zyx: Sequence[float], diameter_mm: float, spread_mm: float,
                rng: np.random.Generator) -> np.ndarray:
    """A random network of tubes of about ``diameter_mm`` inside the boolean mask ``organ`` (z, y, x).

    A tube is where two independent smooth random fields (Gaussian-filtered white noise, correlation length
    ``spread_mm``, unit sd) are both near zero: the intersection of two level-set bands is a set of curves. A
    band ``|f| < w`` is about ``2 w / |grad f|`` thick and ``|grad f|`` is about ``1.2 / sigma`` for such a field,
    so ``w = 0.6 * diameter / spread`` gives the diameter. Only the organ's bounding box is filled."""
    from scipy import ndimage

    where = np.argwhere(organ)
    if where.size == 0:
        return np.zeros(organ.shape, dtype=bool)
    box = tuple(slice(a, b + 1) for a, b in zip(where.min(axis=0), where.max(axis=0)))
    shape = organ[box].shape
    sigma = [spread_mm / float(s) for s in spacing_zyx]
    half_width = 0.6 * diameter_mm / spread_mm
    near_zero = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
        near_zero.append(np.abs(field) < half_width * max(float(field.std()), 1e-12))
    tubes = np.zeros(organ.shape, dtype=bool)
    tubes[box] = near_zero[0] & near_zero[1] & organ[box]
    return tubes


def _draw_veins(synthetic: np.ndarray, labels: np.ndarray, spacing_zyx: Sequence[float], draw: Mapping[str, Any],
                noise_sd: Sequence[float], settings: SynthSettings, rng: np.random.Generator) -> Dict[str, float]:
    """With ``settings.vessel_prob``, give each :data:`VESSEL_ORGANS` organ its veins (:func:`organ_veins`, one
    network per vein tissue) at that vein's drawn mean HU and noise, in place; labels stay the organ's.
    Returns {organ id: share of its voxels that became vein}."""
    shares: Dict[str, float] = {}
    if rng.uniform() >= settings.vessel_prob:
        return shares
    for organ, veins in VESSEL_ORGANS.items():
        mask = labels == organ
        if not mask.any():
            continue
        covered = np.zeros(mask.shape, dtype=bool)
        for vein in veins:
            index = _TISSUE_INDEX[vein]
            tubes = organ_veins(mask, spacing_zyx, rng.uniform(*settings.vessel_mm),
                                rng.uniform(*settings.vessel_spread_mm), rng)
            synthetic[tubes] = draw["means"][index] + rng.normal(0.0, noise_sd[index], size=int(tubes.sum()))
            covered |= tubes
        shares[str(organ)] = round(float(covered.sum()) / float(mask.sum()), 4)
    return shares


def _degradations(settings: SynthSettings, seed: int):
    """MONAI's random image degradations, applied in HU (+1024 so the bias field multiplies positive values)."""
    from monai import transforms as mt

    steps = mt.Compose([
        mt.RandGaussianSmoothd(keys="image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0),
                               prob=settings.blur_prob),
        # CT shading (cupping, beam hardening) is tens of HU: a field of +-5% around 1 on HU + 1024.
        mt.RandBiasFieldd(keys="image", degree=3, coeff_range=(-0.01, 0.01), prob=settings.bias_prob),
        mt.RandGaussianNoised(keys="image", mean=0.0, std=20.0, prob=settings.noise_prob, sample_std=True),
        mt.RandSimulateLowResolutiond(keys="image", zoom_range=(0.5, 1.0), prob=settings.lowres_prob),
    ])
    steps.set_random_state(seed=seed)
    return steps


def _slab(labels: np.ndarray, spacing_z: float, settings: SynthSettings, rng: np.random.Generator
          ) -> Optional[Tuple[int, int]]:
    """(first, stop) axial slices of a thin slab that cuts through labelled organs, or None (whole volume).
    Arrays are (z, y, x): axis 0 is the slice axis of the source file."""
    if rng.uniform() >= settings.slab_prob:
        return None
    organ_slices = np.flatnonzero((totalseg_to_btcv(labels) > 0).any(axis=(1, 2)))
    if organ_slices.size == 0:
        return None
    thickness = max(2, int(round(rng.uniform(*settings.slab_mm) / spacing_z)))
    centre = int(rng.choice(organ_slices))
    first = int(np.clip(centre - thickness // 2, 0, max(0, labels.shape[0] - thickness)))
    return first, min(labels.shape[0], first + thickness)


def synthesise(image: sitk.Image, hu: np.ndarray, labels: np.ndarray, seed: int, index: int,
               settings: Optional[SynthSettings] = None) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """One synthetic case from one source: (HU int16 array, BTCV label array, description), both arrays on
    the source grid in SimpleITK (z, y, x) order. Deterministic in (seed, index)."""
    import torch

    settings = settings or SynthSettings()
    rng = np.random.default_rng([seed, index])
    monai_seed = int(rng.integers(2 ** 31 - 1))
    moved = _spatial(settings, monai_seed)({"image": torch.from_numpy(hu[None].copy()),
                                            "label": torch.from_numpy(labels[None].astype(np.float32))})
    hu_moved = np.asarray(moved["image"][0], dtype=np.float32)
    labels_moved = np.rint(np.asarray(moved["label"][0])).astype(np.int16)
    scales: Dict[str, float] = {}
    if settings.organ_resize_prob > 0:  # its own stream: the other draws of (seed, index) stay as they were
        labels_moved, hu_moved, scales = resize_organs(labels_moved, hu_moved, settings.organ_resize_prob,
                                                       np.random.default_rng([seed, index, 1]))

    tissue = _tissue_map(labels_moved, hu_moved)
    draw = draw_intensities(rng)
    texture = float(rng.uniform(*settings.texture))
    noise_sd = rng.uniform(*settings.tissue_noise, size=len(TISSUES))
    synthetic = _synthesise_hu(tissue, hu_moved, draw, texture, noise_sd, rng)
    veins: Dict[str, float] = {}
    if settings.vessel_prob > 0:  # its own stream, as for organ resizing
        veins = _draw_veins(synthetic, labels_moved, image.GetSpacing()[::-1], draw, noise_sd, settings,
                            np.random.default_rng([seed, index, 2]))
    degraded = _degradations(settings, monai_seed + 1)({"image": torch.from_numpy(synthetic[None] + 1024.0)})
    synthetic = np.asarray(degraded["image"][0], dtype=np.float32) - 1024.0

    btcv = totalseg_to_btcv(np.clip(labels_moved, 0, None))
    slab = _slab(labels_moved, image.GetSpacing()[2], settings, rng)
    if slab is not None:
        outside = np.ones(btcv.shape[0], dtype=bool)
        outside[slab[0]:slab[1]] = False
        synthetic[outside] = TISSUES[_TISSUE_INDEX["air"]].hu["native"][0]
        btcv[outside] = 0
    described = {"phase": draw["phase"], "texture": round(texture, 3), "slab": list(slab) if slab else None,
                 "mean_hu": {t.name: round(m, 1) for t, m in zip(TISSUES, draw["means"])}}
    if scales:
        described["organ_scale"] = scales  # TotalSegmentator id -> geometric mean linear scale
    if veins:
        described["vein_share"] = veins  # TotalSegmentator id -> share of the organ drawn as vein
    return np.clip(np.rint(synthetic), -1024, 3071).astype(np.int16), btcv, described


# ------------------------------------------------------------------------------------------ dataset
def write_synth_dataset(source: volumes.PathLike, out: volumes.PathLike, cases: int, seed: int = 0,
                        settings: Optional[SynthSettings] = None, progress: Any = None) -> Path:
    """Write ``cases`` synthetic cases to ``out`` (MSD: ``imagesTr/``, ``labelsTr/``, ``dataset.json`` with
    each case's phase and drawn mean HU under ``"logonet"``). Sources are used in turn."""
    out = Path(out)
    if cases < 1:
        raise UserError(f"--cases must be at least 1, got {cases}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the synthetic dataset.")
    if out.is_dir() and any(out.iterdir()) and not (out / "dataset.json").is_file():
        raise UserError(f"{out} is not empty and is not a dataset folder; choose a new or empty folder.")
    sources = source_cases(source)
    loaded: Dict[int, Tuple[sitk.Image, np.ndarray, np.ndarray]] = {}
    training, described = [], []
    indices = range(cases)
    for i in (progress.iterate(indices, total=cases, desc="synth") if progress is not None else indices):
        k = i % len(sources)
        if k not in loaded:
            loaded[k] = _load_source(sources[k])
        image, hu, labels = loaded[k]
        array, btcv, info = synthesise(image, hu, labels, seed, i, settings)
        name = f"synth_{i:03d}"
        synthetic = sitk.GetImageFromArray(array)
        synthetic.CopyInformation(image)
        volumes.write_image(synthetic, out / "imagesTr" / f"{name}.nii.gz")
        volumes.write_labelmap(btcv, image, out / "labelsTr" / f"{name}.nii.gz", BTCV_NAMES)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        described.append({"case": name, "source": sources[k]["id"], **info})
    present = sorted({int(v) for k in loaded for v in np.unique(totalseg_to_btcv(loaded[k][2])) if v})
    write_dataset_json(out, {v: BTCV_NAMES[v] for v in present}, training, name="LoGoNetSynth",
                       description="Synthetic CTs from real TotalSegmentator label maps (logonet synth); BTCV label "
                                   "values",
                       extra={"logonet": {"generator": "logonet synth", "seed": seed,
                                          "sources": [s["id"] for s in sources], "cases": described}})
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="labelled dataset folder whose label maps hold TotalSegmentator ids, 'sample' "
                             "(the sample's training CT and its TotalSegmentator map) or 'sample-mr' (the sample's "
                             "MR slab of another patient and its TotalSegmentator total_mr map: its anatomy, "
                             "synthesised as CT)")
    parser.add_argument("out", metavar="OUT", help="output folder (MSD layout: imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--cases", type=int, default=40, help="number of synthetic cases (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="case i of seed s is the same whatever --cases is")
    parser.add_argument("--slab-prob", type=float, default=SynthSettings.slab_prob,
                        help="share of cases cut to a thin axial slab (partial field of view)")
    parser.add_argument("--organ-resize-prob", type=float, default=SynthSettings.organ_resize_prob,
                        help="chance per organ (spleen, liver, kidneys, stomach, pancreas, vessels...) of being grown "
                             "or shrunk about its centre, for organ sizes other than the source patient's "
                             "(default 0: earlier seeds' cases unchanged)")
    parser.add_argument("--vessel-prob", type=float, default=SynthSettings.vessel_prob,
                        help="share of cases whose liver gets a random network of veins at the contrast phase's "
                             "hepatic and portal vein HU, still labelled liver (default 0: earlier seeds' cases "
                             "unchanged)")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def run(args: argparse.Namespace) -> int:
    from ..events import reporter_for

    for flag, value in (("--slab-prob", args.slab_prob), ("--organ-resize-prob", args.organ_resize_prob),
                        ("--vessel-prob", args.vessel_prob)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} must be in [0, 1], got {value}")
    reporter = reporter_for(args.progress)
    start = time.perf_counter()
    out = write_synth_dataset(args.source, args.out, args.cases, seed=args.seed,
                              settings=SynthSettings(slab_prob=args.slab_prob,
                                                     organ_resize_prob=args.organ_resize_prob,
                                                     vessel_prob=args.vessel_prob),
                              progress=reporter)
    seconds = time.perf_counter() - start
    reporter.emit("done", outputs=[str(out)], seconds=round(seconds, 2))
    if reporter.mode != "jsonl":
        print(f"wrote {args.cases} synthetic cases to {out} in {seconds:.1f} s")
    return 0
