"""MONAI transform pipelines that follow the paper's fine-tuning recipe (its implementation details), all driven by one config.

Dict keys are ``"image"`` and ``"label"``. Typical use::

    cfg = PreprocessConfig()                         # BTCV recipe; PreprocessConfig.preset("msd") for MSD
    train_ds = cached_dataset(cases, train_transforms(cfg), cfg.cache_dir)   # cases: [{"image", "label"}]
    val_ds = cached_dataset(cases, val_transforms(cfg), cfg.cache_dir)

Inference (map the prediction back onto the input's exact grid)::

    original = volumes.read_image(path)                   # SimpleITK image, the grid to write on
    x = preprocess_for_inference(original, cfg)      # MetaTensor (1, X, Y, Z), RAS, target spacing, [0, 1]
    logits = sliding_window_inference(x[None], cfg.roi_size, 4, net, overlap=0.5)   # (1, C, X, Y, Z)
    labels = labels_to_input_grid(logits[0], original)    # SimpleITK uint8 image on original's grid
    volumes.write_labelmap(labels, original, out_path, names)

``labels_to_input_grid`` takes the argmax if given class scores, converts with the MetaTensor's affine
(which MONAI keeps up to date through orientation, resampling and foreground cropping) and resamples with
nearest neighbour onto the original grid; voxels outside the processed region become background.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from . import volumes

KEYS = ("image", "label")
#: How training crops are centred. "foreground" (MONAI/nnU-Net default): half on labelled voxels, half anywhere
#: in the body. "classes": each crop's centre is drawn from one class chosen uniformly (background included),
#: so a 200-voxel adrenal gland is the centre as often as the liver.
CROP_MODES = ("foreground", "classes")
#: Training augmentation profiles. "nnunet" (default): nnU-Net's spatial and intensity augmentation without
#: mirroring, since left and right organs are different classes here. "paper": the paper's flips per axis, rot90
#: and intensity scale/shift. "none": crops only.
AUGMENT_MODES = ("nnunet", "paper", "none")


#: The PreprocessConfig fields that inference repeats (a model card's ``preprocessing``).
INFERENCE_FIELDS = ("orientation", "spacing", "intensity_window", "roi_size", "crop_foreground", "antialias")


@dataclass
class PreprocessConfig:
    """Preprocessing and augmentation settings (defaults = the paper's BTCV recipe).

    spacing is in mm along the axes of ``orientation`` (RAS: x, y, z); intensity_window is the HU range
    mapped linearly to [0, 1] with clipping; roi_size is the crop (and sliding-window) size.
    """

    orientation: str = "RAS"
    spacing: Tuple[float, float, float] = (1.5, 1.5, 2.0)
    intensity_window: Tuple[float, float] = (-175.0, 250.0)
    roi_size: Tuple[int, int, int] = (96, 96, 96)
    crop_foreground: bool = True  # crop to the body (voxels above the window's low end)
    antialias: bool = True  # Gaussian low-pass before downsampling a finer scan to ``spacing`` (:func:`antialias_sigma`)
    num_samples: int = 4  # random crops per volume and iteration
    crop_by: str = "foreground"  # "foreground": pos/neg crops; "classes": centres drawn equally per class
    pos: float = 1.0  # RandCropByPosNegLabeld: crops centred on foreground ...
    neg: float = 1.0  # ... vs on background
    flip_prob: float = 0.2  # per axis
    rot90_prob: float = 0.2
    intensity_scale: float = 0.1  # RandScaleIntensityd factors
    intensity_shift: float = 0.1  # RandShiftIntensityd offsets
    intensity_prob: float = 0.1
    augment: str = "nnunet"  # AUGMENT_MODES; the *_prob fields above belong to "paper"
    slab_prob: float = 0.0  # "nnunet": share of crops cut to a thin axial slab (a 20-slice series' field of view) ...
    slab_mm: Tuple[float, float] = (30.0, 60.0)  # ... this thick, the rest image 0 (the window's low end) and background
    cache_dir: Optional[str] = None  # PersistentDataset folder; None = no cache

    def __post_init__(self) -> None:
        self.spacing = _float_tuple(self.spacing, 3, "spacing")
        self.intensity_window = _float_tuple(self.intensity_window, 2, "intensity_window")
        self.roi_size = tuple(int(v) for v in _float_tuple(self.roi_size, 3, "roi_size"))  # type: ignore[assignment]
        if any(s <= 0 for s in self.spacing):
            raise UserError(f"preprocessing spacing must be positive, got {self.spacing}")
        if self.intensity_window[0] >= self.intensity_window[1]:
            raise UserError(f"intensity_window must be (low, high) with low < high, got {self.intensity_window}")
        if any(r < 1 for r in self.roi_size):
            raise UserError(f"roi_size must be positive, got {self.roi_size}")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.crop_by not in CROP_MODES:
            raise UserError(f"crop_by must be one of {list(CROP_MODES)}, got {self.crop_by!r}")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise UserError(f"pos/neg crop ratio must be non-negative and not both 0, got {self.pos}/{self.neg}")
        self.slab_mm = _float_tuple(self.slab_mm, 2, "slab_mm")
        if not 0 < self.slab_mm[0] <= self.slab_mm[1]:
            raise UserError(f"slab_mm must be (thinnest, thickest) with 0 < thinnest <= thickest, got {self.slab_mm}")
        for name in ("flip_prob", "rot90_prob", "intensity_prob", "slab_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise UserError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.augment not in AUGMENT_MODES:
            raise UserError(f"augment must be one of {list(AUGMENT_MODES)}, got {self.augment!r}")
        if not isinstance(self.antialias, bool):
            raise UserError(f"antialias must be true or false, got {self.antialias!r}")
        if len(self.orientation) != 3:
            raise UserError(f"orientation must be three axis codes such as 'RAS', got {self.orientation!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PreprocessConfig":
        """``"btcv"`` (1.5x1.5x2 mm, HU -175..250), ``"msd"`` (1 mm, HU -100..2000), ``"ssl"`` (HU -1000..1000)."""
        presets: Dict[str, Dict[str, Any]] = {
            "btcv": {},
            "msd": {"spacing": (1.0, 1.0, 1.0), "intensity_window": (-100.0, 2000.0)},
            "ssl": {"intensity_window": (-1000.0, 1000.0)},
        }
        if name.lower() not in presets:
            raise UserError(f"unknown preprocessing preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name.lower()], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        """Every field as a JSON-ready dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def card_dict(self) -> Dict[str, Any]:
        """What inference must repeat, for ``model.json`` ``"preprocessing"``: no runtime field (``cache_dir``)
        and no augmentation (that is how the model was trained: :meth:`augmentation_dict`)."""
        return {k: v for k, v in self.to_dict().items() if k in INFERENCE_FIELDS}

    def augmentation_dict(self) -> Dict[str, Any]:
        """The training crops and augmentations, for ``model.json`` ``"training"."augmentation"``."""
        return {k: v for k, v in self.to_dict().items() if k not in INFERENCE_FIELDS and k != "cache_dir"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessConfig":
        """Inverse of :meth:`to_dict`. Missing keys take defaults; unknown keys (newer versions) are ignored."""
        if not isinstance(data, Mapping):
            raise UserError(f"preprocessing settings must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as error:
            raise UserError(f"invalid preprocessing settings {dict(data)}: {error}") from error


def _float_tuple(value: Any, n: int, name: str) -> Tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = [value] * n
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(out) != n:
        raise UserError(f"{name} must be {n} numbers, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------ loading
def _make_load_class() -> type:
    from monai.transforms import MapTransform

    class LoadVolumed(MapTransform):
        """Read each key's path with :func:`volumes.read_image` (SimpleITK) into a MetaTensor (1, X, Y, Z) float32
        with its RAS affine. Unlike ``LoadImaged`` it never falls back to other readers, and bad files raise
        the clear ``UserError`` of :func:`volumes.read_image`."""

        def __init__(self, keys: Any, allow_missing_keys: bool = False) -> None:
            super().__init__(keys, allow_missing_keys)

        def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
            d = dict(data)
            for key in self.key_iterator(d):
                tensor = volumes.image_to_metatensor(volumes.read_image(d[key]), add_channel=True, dtype=np.float32)
                tensor.meta["filename_or_obj"] = str(d[key])
                d[key] = tensor
            return d

    return LoadVolumed


def antialias_sigma(source_spacing: Sequence[float], target_spacing: Sequence[float]) -> Tuple[float, ...]:
    """Gaussian sigma (in source voxels, per axis) to apply before resampling from ``source_spacing`` to the
    coarser ``target_spacing``: ``(factor - 1) / 2`` for a downsampling factor > 1, else 0 (scikit-image's
    ``resize(anti_aliasing=True)`` rule). Without it a 1 mm scan taken to 3 mm keeps its full per-voxel noise
    (linear interpolation samples, it does not average), which a model trained on 3 mm images never saw."""
    return tuple(max(0.0, (float(t) / float(s) - 1.0) / 2.0) for s, t in zip(source_spacing, target_spacing))


def _make_antialias_class() -> type:
    from monai.transforms import MapTransform

    class AntiAliasd(MapTransform):
        """Low-pass each key's image (a MetaTensor (C, X, Y, Z)) by :func:`antialias_sigma` before ``Spacingd``
        takes it to ``pixdim``. MONAI's ``Spacing`` resamples without anti-aliasing and its ``Resize`` (which has
        it) works on shapes, not spacings. The filter is SciPy's separable ``gaussian_filter``, on one copy: MONAI's
        ``GaussianSmooth`` took 10x the time and 6x the memory on a 512x512x300 scan (21 s, 7 GB). Images already
        at or coarser than ``pixdim`` pass through unchanged (training at 3 mm on 3 mm scans is untouched)."""

        def __init__(self, keys: Any, pixdim: Sequence[float], allow_missing_keys: bool = False) -> None:
            super().__init__(keys, allow_missing_keys)
            self.pixdim = tuple(float(v) for v in pixdim)

        def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
            from scipy import ndimage

            d = dict(data)
            for key in self.key_iterator(d):
                image = d[key]
                sigma = antialias_sigma([float(v) for v in image.pixdim], self.pixdim)
                if max(sigma) < 0.05:  # below that the kernel is a single tap: nothing to filter
                    continue
                image = image.detach().cpu().clone()  # the caller's tensor stays as it was
                array = image.numpy()  # shares memory with the clone
                for channel in array:
                    ndimage.gaussian_filter(channel, sigma=sigma, truncate=3.0, output=channel)
                d[key] = image
            return d

    return AntiAliasd


#: ``transforms.LoadVolumed`` and ``transforms.AntiAliasd`` are built lazily (MONAI is imported on first use).
__getattr__ = volumes.lazy_module_attrs(__name__, {"LoadVolumed": _make_load_class,
                                                   "AntiAliasd": _make_antialias_class})


# ------------------------------------------------------------------------------------------ pipelines
def _deterministic(cfg: PreprocessConfig, keys: Sequence[str], load: bool, pad: bool,
                   label_values: Optional[Sequence[int]] = None) -> List[Any]:
    """Load -> orientation (-> anti-aliasing) -> spacing -> HU window -> foreground crop (-> pad to roi) (-> label
    values to channels 0..K). Cached by PersistentDataset, which stops at the first random transform."""
    from monai import transforms as mt

    has_label = "label" in keys
    steps: List[Any] = []
    if load:
        steps.append(__getattr__("LoadVolumed")(keys=list(keys)))  # SimpleITK, no reader fallback
    else:
        steps.append(mt.EnsureChannelFirstd(keys=list(keys), channel_dim="no_channel", strict_check=False))
    steps += [
        mt.Orientationd(keys=list(keys), axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if cfg.antialias:
        steps.append(__getattr__("AntiAliasd")(keys="image", pixdim=cfg.spacing))
    steps += [
        mt.Spacingd(keys=list(keys), pixdim=cfg.spacing,
                    mode=("bilinear", "nearest") if has_label else "bilinear"),
        mt.ScaleIntensityRanged(keys="image", a_min=cfg.intensity_window[0], a_max=cfg.intensity_window[1],
                                b_min=0.0, b_max=1.0, clip=True),
    ]
    if cfg.crop_foreground:
        # Air (below the window) is 0 after scaling: crop to the body bounding box.
        steps.append(mt.CropForegroundd(keys=list(keys), source_key="image", allow_smaller=True))
    if pad:
        # Small volumes: pad so every random crop is exactly roi_size.
        steps.append(mt.SpatialPadd(keys=list(keys), spatial_size=cfg.roi_size))
    if has_label and label_values is not None:
        channels = channel_values(label_values)
        indices = list(range(len(channels)))
        if channels != indices:
            steps.append(mt.MapLabelValued(keys="label", orig_labels=channels, target_labels=indices))
    return steps


def channel_values(label_values: Sequence[int]) -> List[int]:
    """Label values in channel order: background 0, then the foreground ``label_values`` sorted. Datasets may
    use any values (BTCV without the esophagus skips 5); the network's channel c predicts ``values[c]``."""
    foreground = sorted({int(v) for v in label_values if int(v) != 0})
    return [0] + foreground


def train_transforms(cfg: PreprocessConfig, keys: Sequence[str] = KEYS,
                     label_values: Optional[Sequence[int]] = None) -> Any:
    """Training pipeline: deterministic part, label-guided ``num_samples`` crops of ``roi_size`` (``cfg.crop_by``),
    the augmentations of ``cfg.augment`` (:func:`augmentations`), then a clip to [0, 1].

    label_values: the dataset's foreground values; given, labels become channel indices 0..K
    (:func:`channel_values`) before cropping. ``crop_by="classes"`` needs them (it must know K).

    Output per item: a list of ``num_samples`` dicts, ``image`` (1, *roi_size) float32 in [0, 1] and ``label``
    (1, *roi_size) float32 (channel indices when ``label_values`` is given, else the file's values).
    """
    from monai import transforms as mt

    keys = list(keys)
    steps = _deterministic(cfg, keys, load=True, pad=True, label_values=label_values)
    if "label" in keys and cfg.crop_by == "classes":
        if label_values is None:
            raise UserError("class-balanced crops need the dataset's label values (train_transforms(label_values=...))")
        steps.append(mt.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=cfg.roi_size,
                                                num_classes=len(channel_values(label_values)),
                                                num_samples=cfg.num_samples, image_key="image", image_threshold=0,
                                                allow_smaller=False, warn=False))
    elif "label" in keys:
        steps.append(mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=cfg.roi_size,
                                               pos=cfg.pos, neg=cfg.neg, num_samples=cfg.num_samples,
                                               image_key="image", image_threshold=0, allow_smaller=False))
    else:  # unlabeled (SSL): plain random crops
        steps.append(mt.RandSpatialCropSamplesd(keys=keys, roi_size=cfg.roi_size, num_samples=cfg.num_samples,
                                                random_size=False))
    steps += augmentations(cfg, keys)
    steps += [
        # Intensity augmentations may leave [0, 1]; the network's input contract is [0, 1].
        mt.ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        mt.EnsureTyped(keys=keys, track_meta=False),
    ]
    return mt.Compose(steps)


def augmentations(cfg: PreprocessConfig, keys: Sequence[str] = KEYS) -> List[Any]:
    """The random augmentations of ``cfg.augment``, applied to each crop (image in [0, 1] after the window).

    "nnunet": rotation (+-15 deg axial, +-8 deg otherwise) and scaling 0.8-1.25 (p 0.25), Gaussian noise (p 0.15),
    blur (p 0.2), brightness (p 0.15), HU shift of up to +-0.1 of the window (p 0.15, contrast phases), gamma
    0.7-1.5 (p 0.3) and simulated low resolution (p 0.25): nnU-Net's defaults, minus mirroring. Then, with
    ``cfg.slab_prob``, a thin axial field of view (:func:`thin_slab`).
    """
    from monai import transforms as mt

    keys = list(keys)
    has_label = "label" in keys
    if cfg.augment == "none":
        return []
    if cfg.augment == "paper":
        return [mt.RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)] + [
            mt.RandRotate90d(keys=keys, prob=cfg.rot90_prob, max_k=3),
            mt.RandScaleIntensityd(keys="image", factors=cfg.intensity_scale, prob=cfg.intensity_prob),
            mt.RandShiftIntensityd(keys="image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob)]
    small, axial = np.deg2rad(8.0), np.deg2rad(15.0)
    return [
        mt.RandAffined(keys=keys, prob=0.25, rotate_range=(small, small, axial), scale_range=(0.2, 0.2, 0.2),
                       mode=("bilinear", "nearest") if has_label else "bilinear", padding_mode="zeros"),
        mt.RandGaussianNoised(keys="image", prob=0.15, mean=0.0, std=0.03, sample_std=True),
        mt.RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        mt.RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.15),
        mt.RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        mt.RandSimulateLowResolutiond(keys=keys if not has_label else "image", prob=0.25, zoom_range=(0.5, 1.0)),
    ] + ([thin_slab(cfg, keys)] if cfg.slab_prob > 0 else [])


def thin_slab(cfg: PreprocessConfig, keys: Sequence[str] = KEYS) -> Any:
    """With ``cfg.slab_prob``, keep one axial slab ``cfg.slab_mm`` thick (at ``cfg.spacing``'s z) of a crop and
    set the rest to 0: image 0 is the window's low end, which is what inference pads a thin series with, and
    label 0 is background. A model that sees only whole-body crops loses the spleen when the same scan comes
    as a 40 mm slab (``scripts/slab_check.py``). MONAI's RandCoarseDropoutd with one kept hole, full in-plane."""
    from monai import transforms as mt

    thinnest, thickest = (max(1, int(round(mm / cfg.spacing[2]))) for mm in cfg.slab_mm)
    return mt.RandCoarseDropoutd(keys=list(keys), holes=1, spatial_size=(-1, -1, thinnest),
                                 max_spatial_size=(-1, -1, thickest), dropout_holes=False, fill_value=0.0,
                                 prob=cfg.slab_prob)


def val_transforms(cfg: PreprocessConfig, keys: Sequence[str] = KEYS,
                   label_values: Optional[Sequence[int]] = None) -> Any:
    """Validation pipeline: the deterministic part only (whole volume, for sliding-window inference); labels
    become channel indices when ``label_values`` is given (see :func:`train_transforms`)."""
    from monai import transforms as mt

    return mt.Compose(_deterministic(cfg, list(keys), load=True, pad=False, label_values=label_values))


def infer_transforms(cfg: PreprocessConfig, load: bool = True) -> Any:
    """Inference pipeline for ``{"image": path}`` (or, with ``load=False``, ``{"image": MetaTensor (X, Y, Z)}``).

    The output ``image`` is a MetaTensor (1, X, Y, Z) whose ``affine`` maps back to the world; see
    :func:`labels_to_input_grid`.
    """
    from monai import transforms as mt

    return mt.Compose(_deterministic(cfg, ["image"], load=load, pad=False))


def preprocess_for_inference(image: sitk.Image, cfg: PreprocessConfig) -> Any:
    """SimpleITK image (already read) -> network-ready MetaTensor (1, X, Y, Z) with an up-to-date RAS affine."""
    tensor = volumes.image_to_metatensor(image, add_channel=False, dtype=np.float32)
    return infer_transforms(cfg, load=False)({"image": tensor})["image"]


def labels_to_input_grid(prediction: Any, original_image: sitk.Image, affine: Optional[Any] = None) -> sitk.Image:
    """Network output on the processed grid -> uint8/uint16 label image on ``original_image``'s exact grid.

    prediction: MetaTensor/array (C, X, Y, Z) class scores (argmax taken over C when C > 1), (1, X, Y, Z) or
    (X, Y, Z) labels; a leading batch axis of 1 is dropped. ``affine`` (RAS, 4x4) defaults to the
    MetaTensor's. Resampling is nearest neighbour; outside the processed region is background (0).
    """
    if affine is None:
        affine = getattr(prediction, "affine", None)
    if affine is None:
        raise ValueError("labels_to_input_grid needs a MetaTensor prediction or an explicit RAS affine")
    array = prediction.detach().cpu().numpy() if hasattr(prediction, "detach") else np.asarray(prediction)
    affine = affine.detach().cpu().numpy() if hasattr(affine, "detach") else np.asarray(affine)
    if array.ndim == 5:
        if array.shape[0] != 1:
            raise ValueError(f"labels_to_input_grid handles one case at a time, got batch shape {array.shape}")
        array = array[0]
        affine = affine[0] if affine.ndim == 3 else affine
    if array.ndim == 4:
        array = array.argmax(axis=0) if array.shape[0] > 1 else array[0]
    if array.ndim != 3:
        raise ValueError(f"expected (C, X, Y, Z) scores or (X, Y, Z) labels, got shape {array.shape}")
    array = np.rint(array).astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
    label_image = volumes.metatensor_to_image(array, affine=affine)
    return volumes.resample_to_reference(label_image, original_image)


# ------------------------------------------------------------------------------------------ caching
def _item_hash(item: Any) -> bytes:
    """Cache key of a data item: its content plus size/mtime of every file it names (edits invalidate)."""
    from monai.data.utils import pickle_hashing

    stamp: Dict[str, Any] = {}
    if isinstance(item, Mapping):
        for key, value in sorted(item.items()):
            stamp[key] = value
            if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
                st = os.stat(value)
                stamp[key + "#stat"] = (st.st_size, st.st_mtime_ns)
    else:
        stamp["item"] = item
    return pickle_hashing(stamp)


def _transform_hash(transform: Any) -> bytes:
    """Cache key part for the transform chain: its configuration, so changed settings never hit stale files."""
    from monai.data.utils import pickle_hashing

    return pickle_hashing(repr(_describe(transform)))


def _describe(obj: Any) -> Any:
    """Stable description of a Compose (class names and public scalar settings, not object ids)."""
    if isinstance(obj, (list, tuple)):
        return [_describe(t) for t in obj]
    if hasattr(obj, "transforms"):
        return [_describe(t) for t in obj.transforms]
    if not hasattr(obj, "__dict__"):
        return repr(obj)
    fields = {}
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_") or key in ("R", "rng"):
            continue
        if isinstance(value, np.ndarray):
            fields[key] = value.tolist()
        elif isinstance(value, (int, float, str, bool, tuple, list, type(None))):
            fields[key] = value
        elif hasattr(value, "__dict__"):
            fields[key] = _describe(value) if len(repr(value)) < 10_000 else type(value).__name__
    return (type(obj).__name__, fields)


def cached_dataset(items: Sequence[Mapping[str, Any]], transform: Any, cache_dir: Optional[os.PathLike] = None):
    """A MONAI dataset that caches the deterministic part of ``transform`` on disk (``PersistentDataset``).

    With ``cache_dir=None`` a plain ``monai.data.Dataset``. Cache files are keyed by item paths (and their
    size/mtime) and by the transform settings, written atomically by MONAI and read with ``weights_only``.
    """
    from monai.data import Dataset, PersistentDataset

    items = [dict(item) for item in items]
    if cache_dir is None:
        return Dataset(items, transform=transform)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return PersistentDataset(items, transform=transform, cache_dir=str(cache_dir), hash_func=_item_hash,
                             hash_transform=_transform_hash)
