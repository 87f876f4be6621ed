"""Volumes in and out: NIfTI, NRRD (incl. Slicer ``.seg.nrrd`` label maps), MHA/MHD and DICOM series.

Everything goes through SimpleITK, so geometry (spacing, origin, direction; LPS world coordinates) is
kept exactly. Bridges to MONAI:

- :class:`SimpleITKReader` is a MONAI ``ImageReader`` so ``LoadImaged(reader=SimpleITKReader())`` works
  without the ``itk`` package (arrays in MONAI's (x, y, z) order, ``affine`` in RAS).
- :func:`image_to_metatensor` / :func:`metatensor_to_image` convert without geometry loss.
- :func:`resample_to_reference` puts a label map back onto an input's grid (nearest neighbour).

Label maps are written by :func:`write_labelmap` with a reference image's exact geometry; label names
travel in the file header where the format allows it and always in a sidecar ``<path>.labels.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write
from ..errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

#: File name endings read as volumes (longest first so ``.seg.nrrd`` wins over ``.nrrd``).
VOLUME_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd")
#: Key under which label names (JSON) are stored in NRRD/MHA headers.
HEADER_LABELS_KEY = "logonet_labels"
SIDECAR_SUFFIX = ".labels.json"
#: Geometry tolerance (mm / direction cosines) for "same grid" checks.
GEOMETRY_TOL = 1e-4

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------- paths
def volume_suffix(path: PathLike) -> str:
    """The volume suffix of ``path`` (e.g. ``".nii.gz"``), or ``""`` if it is not a volume file name."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_volume_suffix(path: PathLike) -> str:
    """File name without its volume suffix: ``case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def is_volume_file(path: PathLike) -> bool:
    """True for an existing file whose name ends in a volume suffix (not a sidecar or hidden temp file)."""
    path = Path(path)
    return path.is_file() and bool(volume_suffix(path)) and not path.name.startswith(".")


def is_dicom_file(path: PathLike) -> bool:
    """Cheap DICOM sniffing: the ``DICM`` magic at byte 128 (Part 10 files)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series(folder: PathLike) -> List[Tuple[str, List[str]]]:
    """DICOM series directly inside ``folder`` as ``[(series_uid, sorted file names), ...]``, largest first."""
    folder = str(folder)
    found = []
    # ITK prints "No Series were found" to stderr for any folder without DICOM; here that is an answer, not news.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    for uid in uids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        if files:
            found.append((uid, files))
    found.sort(key=lambda item: -len(item[1]))
    return found


# ----------------------------------------------------------------------------------------------- reading
def _check_volume(image: sitk.Image, path: PathLike) -> sitk.Image:
    """Accept 3-D scalar volumes only (squeezing a trailing length-1 4th axis)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        layers = " or a segmentation with overlapping layers (export it as a label map)" \
            if str(path).lower().endswith(".seg.nrrd") else ""
        raise UserError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a color or vector image"
            f"{layers}); give a single-channel CT volume."
        )
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise UserError(
                f"{path} is 4-D (size {size}): a time series, multi-channel image or a segmentation with "
                "overlapping layers. Give one 3-D volume (export overlapping segments as a label map)."
            )
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise UserError(f"{path} is a {image.GetDimension()}-D image, not a 3-D volume; give a 3-D CT volume "
                        "(or, for DICOM, the folder that holds the whole series).")
    if min(image.GetSize()) < 2:
        raise UserError(f"{path} is a single 2-D slice (size {image.GetSize()}), not a 3-D volume; give the whole "
                        "volume (for DICOM, the folder that holds every slice of the series).")
    return image


def _dicom_tag(reader: Any, key: str, index: Optional[int] = None) -> str:
    """A DICOM tag as text ('' when absent) from a file reader or (with ``index``) a series reader."""
    try:
        if index is None:
            return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
        return reader.GetMetaData(index, key).strip() if reader.HasMetaDataKey(index, key) else ""
    except RuntimeError:
        return ""


def describe_dicom_series(series: Sequence[Tuple[str, List[str]]]) -> List[str]:
    """One line per series: UID, modality, description, slice size and count (read from its first file)."""
    lines = []
    for uid, files in series:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        size, what = "", ""
        try:
            reader.ReadImageInformation()
            size = "x".join(str(v) for v in reader.GetSize()[:2])
            what = " ".join(t for t in (_dicom_tag(reader, "0008|0060"), _dicom_tag(reader, "0008|103e")) if t)
        except RuntimeError:
            pass
        lines.append(f"{uid} ({what + ', ' if what else ''}{size + ' x ' if size else ''}{len(files)} slices)")
    return lines


def _unlisted_dicom_files(folder: Path, series: Sequence[Tuple[str, List[str]]]) -> List[str]:
    """Files that look like DICOM slices (``DICM`` magic or a .dcm name) but belong to no readable series:
    GDCM drops such a corrupt slice silently, which would shift every slice after it."""
    listed = {os.path.realpath(f) for _, files in series for f in files}
    bad = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR" or not entry.is_file():
            continue
        if os.path.realpath(entry) in listed:
            continue
        if entry.suffix.lower() in (".dcm", ".ima") or is_dicom_file(entry):
            bad.append(entry.name)
    return bad


def _check_slice_positions(reader: Any, files: Sequence[str], image: sitk.Image, folder: Path) -> None:
    """Refuse a series whose slices are not evenly spaced along the slice normal (a missing or duplicated
    slice): ITK would average the spacing and place every organ at the wrong height."""
    if len(files) < 3:
        return
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = direction[:, 2]
    heights = []
    for index in range(len(files)):
        text = _dicom_tag(reader, "0020|0032", index)
        try:
            position = [float(v) for v in text.split("\\")]
        except ValueError:
            return  # no usable positions: nothing to compare
        if len(position) != 3:
            return
        heights.append(float(np.dot(position, normal)))
    steps = np.diff(heights)
    step = float(np.median(np.abs(steps)))
    if step <= 0:
        raise UserError(f"{folder}: DICOM slices share one position (duplicated slices); keep one copy of each")
    for i, gap in enumerate(np.abs(steps)):
        if abs(gap - step) > 0.2 * step:
            a, b = Path(files[i]).name, Path(files[i + 1]).name
            kind = "slice(s) missing" if gap > step else "an extra or duplicated slice"
            raise UserError(f"{folder}: {kind} between {a} and {b} (step {gap:.3g} mm where the series steps "
                            f"{step:.3g} mm); give the complete series")


def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> sitk.Image:
    """Read one DICOM series from ``folder``.

    A folder with several series is refused unless ``series_uid`` names one (guessing silently segmented the
    wrong scan); a corrupt slice (DICOM file GDCM cannot parse) or a gap in the slice positions is refused
    with the file named, instead of ITK dropping it and averaging the spacing.
    """
    folder = Path(folder)
    series = dicom_series(folder)
    if not series:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if not entries:
            raise UserError(f"{folder} is an empty folder; give a volume file (.nii.gz, .nrrd, .mha) or a folder of "
                            "DICOM slices.")
        raise UserError(f"{folder} is a folder without a DICOM series ({len(entries)} entries, none of them DICOM "
                        "slices); give a volume file (.nii.gz, .nrrd, .mha) or the folder of one DICOM series.")
    if series_uid is not None:
        matches = [files for uid, files in series if uid == series_uid]
        if not matches:
            raise UserError(f"{folder} has no DICOM series {series_uid}; it has: "
                            + "; ".join(describe_dicom_series(series)))
        files = matches[0]
    elif len(series) > 1:
        raise UserError(f"{folder} holds {len(series)} DICOM series: " + "; ".join(describe_dicom_series(series))
                        + ". Choose one with --series UID.")
    else:
        files = series[0][1]
    bad = _unlisted_dicom_files(folder, series)
    if bad:
        raise UserError(f"{folder}: corrupt or unreadable DICOM slice(s) {', '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}; replace or remove them (a dropped slice shifts the anatomy)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise UserError(f"cannot read the DICOM series in {folder}: {_first_line(error)}") from error
    _check_slice_positions(reader, files, image, folder)
    return _check_values(_check_volume(image, folder), folder)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK puts the useful sentence last, after source locations.
    return lines[-1] if lines else type(error).__name__


def read_image(path: PathLike, series_uid: Optional[str] = None) -> sitk.Image:
    """Read a 3-D volume: a NIfTI/NRRD/MHA/MHD file or a folder holding a DICOM series.

    Returns a scalar 3-D ``SimpleITK.Image`` with its geometry (spacing, origin, direction in LPS).
    Raises ``UserError`` for missing paths, names that are not UTF-8, empty folders, unreadable, truncated or
    corrupt files, 2-D or 4-D images, NaN/infinite voxels, and DICOM folders with several series (unless
    ``series_uid`` picks one) or with corrupt/missing slices.
    """
    from ..atomic import check_name_encodable

    check_name_encodable(path, "input")  # ITK aborts in C++ on such a name
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path.")
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if series_uid is not None:
        raise UserError(f"--series picks a series of a DICOM folder; {path} is a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is an empty file (0 bytes); it is not a volume.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        kind = "a volume file" if volume_suffix(path) else "a volume SimpleITK can read"
        raise UserError(
            f"cannot read {path}: it is not {kind} or it is corrupt ({_first_line(error)}). "
            f"Supported: {', '.join(VOLUME_SUFFIXES)} files and DICOM series folders."
        ) from error
    _check_complete(path)
    return _check_values(_check_volume(image, path), path)


def _check_complete(path: Path) -> None:
    """A NIfTI must hold every byte its header promises, and a gzip must decode to its end with a good
    checksum: ITK's NIfTI reader fills a truncated file with zeros without a word (the NRRD and MetaImage
    readers already refuse)."""
    import gzip
    import zlib

    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    import nibabel as nib

    have = path.stat().st_size
    if name.endswith(".gz"):
        have = 0
        try:
            with gzip.open(str(path), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    have += len(block)
        except (EOFError, OSError, zlib.error) as error:
            raise UserError(f"{path} is truncated or corrupt: its gzip stream does not decode to the end "
                            f"({error}); the file was not written completely, get a complete copy") from error
    try:
        proxy = nib.load(str(path)).dataobj  # the on-disk layout (the image's header copy drops the offset)
        need = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a broken header
        raise UserError(f"cannot read the NIfTI header of {path} ({error}); the file is corrupt") from error
    if have < need:
        raise UserError(f"{path} is truncated: its header promises {need} bytes, the file holds {have}; "
                        "get a complete copy")


def _check_values(image: sitk.Image, path: PathLike) -> sitk.Image:
    """Refuse NaN or infinite voxels: every model and metric would turn them into garbage silently."""
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise UserError(f"{path} has {bad} NaN or infinite voxel(s); fix or replace the volume")
    return image


# ----------------------------------------------------------------------------------------------- geometry
def geometry(image: sitk.Image) -> Dict[str, Tuple[float, ...]]:
    """Size, spacing, origin and direction of an image as plain tuples."""
    return {"size": tuple(image.GetSize()), "spacing": tuple(image.GetSpacing()),
            "origin": tuple(image.GetOrigin()), "direction": tuple(image.GetDirection())}


def geometry_differences(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOL) -> List[str]:
    """Human-readable list of how the grids of ``a`` and ``b`` differ (empty when they match)."""
    ga, gb = geometry(a), geometry(b)
    problems = []
    if ga["size"] != gb["size"]:
        problems.append(f"size {ga['size']} vs {gb['size']}")
    for key in ("spacing", "origin", "direction"):
        if len(ga[key]) != len(gb[key]) or not np.allclose(ga[key], gb[key], rtol=0, atol=tol):
            fmt = lambda v: "(" + ", ".join(f"{x:.6g}" for x in v) + ")"  # noqa: E731
            problems.append(f"{key} {fmt(ga[key])} vs {fmt(gb[key])}")
    return problems


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOL) -> bool:
    """True when both images have the same size, spacing, origin and direction (within ``tol``)."""
    return not geometry_differences(a, b, tol)


def lps_affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> LPS world affine of a 3-D image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> RAS world affine (MONAI/NIfTI convention)."""
    return _LPS_TO_RAS @ lps_affine(image)


def set_geometry_from_affine(image: sitk.Image, affine: np.ndarray, ras: bool = True) -> sitk.Image:
    """Set spacing, direction and origin of ``image`` from a 4x4 affine (RAS unless ``ras=False``)."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = _LPS_TO_RAS @ affine if ras else affine  # the flip is its own inverse
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise UserError(f"degenerate affine (zero spacing): {affine.tolist()}")
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (columns / spacing).ravel()])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    return image


# ----------------------------------------------------------------------------------------------- MONAI
def image_to_metatensor(image: sitk.Image, add_channel: bool = True, dtype: Any = None):
    """SimpleITK image -> MONAI ``MetaTensor`` of shape (1, X, Y, Z) (or (X, Y, Z)), ``affine`` in RAS."""
    import torch
    from monai.data import MetaTensor

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> MONAI's (x, y, z)
    if dtype is not None:
        array = array.astype(dtype)
    if add_channel:
        array = array[None]
    meta = {"spacing": np.asarray(image.GetSpacing()), "original_affine": ras_affine(image),
            "spatial_shape": np.asarray(image.GetSize()), "space": "RAS",
            "original_channel_dim": 0 if add_channel else float("nan")}
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array)),
                      affine=torch.as_tensor(ras_affine(image), dtype=torch.float64), meta=meta)


def metatensor_to_image(tensor: Any, affine: Optional[np.ndarray] = None, pixel_type: Optional[int] = None
                        ) -> sitk.Image:
    """MONAI (Meta)Tensor/array of shape (X, Y, Z) or (1, X, Y, Z) -> SimpleITK image in LPS.

    ``affine`` (RAS) defaults to ``tensor.affine``; ``pixel_type`` (e.g. ``sitk.sitkUInt8``) casts the result.
    Its ``ValueError``s are a calling module's bug (a wrong shape from code, never from a user's file), so they
    keep their traceback; every mistake a user can make in this module raises :class:`UserError`.
    """
    if affine is None:
        affine = getattr(tensor, "affine", None)
        if affine is None:
            raise ValueError("metatensor_to_image needs a MetaTensor or an explicit RAS affine")
    if hasattr(affine, "detach"):
        affine = affine.detach().cpu().numpy()
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {array.shape}; argmax the classes first")
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (X, Y, Z) or (1, X, Y, Z) array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.ndim == 3:  # batched affine (1, 4, 4)
        affine = affine[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    set_geometry_from_affine(image, affine, ras=True)
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    return image


def resample_to_reference(label_image: sitk.Image, reference_image: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resample of a label map onto ``reference_image``'s exact grid (outside -> 0)."""
    out = sitk.Resample(label_image, reference_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        label_image.GetPixelID())
    out.CopyInformation(reference_image)  # bit-exact geometry, not just within float round-off
    return out


def _make_reader_class() -> type:
    """Build :class:`SimpleITKReader` on first use, so that importing this module does not import MONAI (slow)."""
    from monai.data import ImageReader

    class SimpleITKReader(ImageReader):
        """MONAI ``ImageReader`` backed by SimpleITK (so ``LoadImaged`` needs no ``itk`` package).

        Arrays come in MONAI's (x, y, z) order with ``affine``/``original_affine`` in RAS (like
        ``ITKReader(affine_lps_to_ras=True)``). A folder path is read as a DICOM series. A list of paths is
        stacked as channels (first axis).
        """

        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            self.kwargs = kwargs

        def verify_suffix(self, filename: Union[Sequence[PathLike], PathLike]) -> bool:
            names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
            return all(Path(n).is_dir() or bool(volume_suffix(n)) for n in names)

        def read(self, data: Union[Sequence[PathLike], PathLike], **kwargs: Any):
            if isinstance(data, (str, os.PathLike)):
                return read_image(data)
            return [read_image(name) for name in data]

        def get_data(self, img: Any) -> Tuple[np.ndarray, Dict[str, Any]]:
            images = img if isinstance(img, (list, tuple)) else [img]
            arrays = [sitk.GetArrayFromImage(image).transpose(2, 1, 0) for image in images]
            first = images[0]
            meta: Dict[str, Any] = {
                "spacing": np.asarray(first.GetSpacing()),
                "original_affine": ras_affine(first),
                "affine": ras_affine(first),
                "spatial_shape": np.asarray(first.GetSize()),
                "space": "RAS",
            }
            if len(arrays) == 1:
                meta["original_channel_dim"] = float("nan")  # "no_channel": EnsureChannelFirstd adds one
                return arrays[0], meta
            meta["original_channel_dim"] = 0
            return np.stack(arrays, axis=0), meta

    return SimpleITKReader


def lazy_module_attrs(module_name: str, factories: Mapping[str, Callable[[], type]]) -> Callable[[str], Any]:
    """A PEP 562 module ``__getattr__`` that builds classes on first use (to keep imports free of MONAI).

    Each class gets ``module_name`` and its attribute name as ``__module__``/``__qualname__`` so it pickles
    (DataLoader workers, PersistentDataset).
    """
    cache: Dict[str, type] = {}

    def __getattr__(name: str) -> Any:
        if name not in factories:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        if name not in cache:
            cls = factories[name]()
            cls.__module__, cls.__qualname__ = module_name, name
            cache[name] = cls
        return cache[name]

    return __getattr__


#: ``io.SimpleITKReader`` is built lazily.
__getattr__ = lazy_module_attrs(__name__, {"SimpleITKReader": _make_reader_class})


# ----------------------------------------------------------------------------------------------- writing
def write_image(image: sitk.Image, path: PathLike, compress: bool = True, verify: bool = True) -> Path:
    """Write any SimpleITK image atomically and verified; creates parent folders.

    The file is written under its final name inside a temporary folder next to ``path``, flushed to disk,
    read back and compared voxel for voxel (``verify``), and only then moved into place with ``os.replace``
    (data files before the header, so ``.mhd`` + ``.zraw`` pairs work). SimpleITK's NIfTI/NRRD writers do not
    report a full disk; the read-back does, so a truncated file never replaces a good one.
    """
    from ..atomic import fsync_dir, fsync_file, os_reason, temp_prefix

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=str(path.parent)))
    keep = " (any previous file there is unchanged)"
    try:
        try:
            sitk.WriteImage(image, str(tmp_dir / path.name), compress)
            produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)  # header last
            for item in produced:
                fsync_file(item)
        except RuntimeError as error:
            raise UserError(f"cannot write {path}: {_first_line(error)}{keep}") from error
        except OSError as error:
            raise UserError(f"cannot write {path}: {os_reason(error)}{keep}") from error
        if verify:
            problem = _read_back_problem(image, tmp_dir / path.name)
            if problem:
                free = shutil.disk_usage(str(path.parent)).free
                hint = "; the disk is full" if free < (1 << 20) else "; is the disk full?"
                raise UserError(f"writing {path} failed: the written file {problem}{hint}{keep}")
        for item in produced:
            os.replace(item, path.parent / item.name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _read_back_problem(image: sitk.Image, written: Path) -> str:
    """Why ``written`` is not exactly ``image`` ('' when it is): unreadable, incomplete, other voxels or grid."""
    try:
        back = sitk.ReadImage(str(written))
        _check_complete(written)
    except (RuntimeError, UserError) as error:
        return f"does not read back ({_first_line(error)})"
    if back.GetSize() != image.GetSize() or back.GetNumberOfComponentsPerPixel() != image.GetNumberOfComponentsPerPixel():
        return f"reads back with size {back.GetSize()} instead of {image.GetSize()}"
    a, b = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(back)
    if not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc"):
        return "reads back with other voxel values"
    if image.GetDimension() == 3 and geometry_differences(image, back, tol=1e-3):
        return "reads back on another grid (" + "; ".join(geometry_differences(image, back, tol=1e-3)) + ")"
    return ""


LabelSpec = Union[Mapping[int, str], Sequence[Mapping[str, Any]], None]


def normalize_label_spec(label_names: LabelSpec, present: Sequence[int] = ()) -> List[Dict[str, Any]]:
    """Turn ``{value: name}`` or ``model.json``-style ``[{"value", "name", "color"?}]`` into a sorted list.

    Values in ``present`` without a name get ``"label_<value>"``; BTCV colors are used where none is given.
    """
    from .labels import BTCV_COLORS

    entries: Dict[int, Dict[str, Any]] = {}
    if label_names is None:
        pass
    elif isinstance(label_names, Mapping):
        for value, name in label_names.items():
            entries[int(value)] = {"value": int(value), "name": str(name)}
    else:
        for item in label_names:
            entry = {"value": int(item["value"]), "name": str(item["name"])}
            if item.get("color") is not None:
                entry["color"] = [int(c) for c in item["color"]]
            if item.get("terminology") is not None:
                entry["terminology"] = item["terminology"]
            entries[entry["value"]] = entry
    entries.pop(0, None)  # 0 is always background
    for value in present:
        if int(value) != 0:
            entries.setdefault(int(value), {"value": int(value), "name": f"label_{int(value)}"})
    for value, entry in entries.items():
        entry.setdefault("color", list(BTCV_COLORS.get(value, _fallback_color(value))))
    return [entries[v] for v in sorted(entries)]


def _fallback_color(value: int) -> Tuple[int, int, int]:
    """A deterministic, reasonably distinct color for label values outside the BTCV schema."""
    rng = np.random.default_rng(value)
    return tuple(int(c) for c in rng.integers(40, 256, size=3))  # type: ignore[return-value]


def _label_array(labels: Union[np.ndarray, sitk.Image], reference: sitk.Image) -> np.ndarray:
    """Validate labels against the reference grid and return a non-negative integer (z, y, x) array."""
    if isinstance(labels, sitk.Image):
        if labels.GetDimension() != 3 or labels.GetSize() != reference.GetSize():
            raise UserError(f"label image size {labels.GetSize()} does not match the reference size "
                             f"{reference.GetSize()}; use resample_to_reference() first")
        diffs = geometry_differences(labels, reference)
        if diffs:
            raise UserError("label image is not on the reference grid (" + "; ".join(diffs) + "); "
                             "use resample_to_reference() first")
        array = sitk.GetArrayFromImage(labels)
    else:
        array = np.asarray(labels)
        expected = tuple(reversed(reference.GetSize()))
        if array.shape != expected:
            raise UserError(f"label array shape {array.shape} does not match the reference, which needs "
                             f"(z, y, x) = {expected}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise UserError("label values must be whole numbers (got fractional or NaN values)")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise UserError(f"label values must be >= 0 (found {int(array.min())})")
    top = int(array.max()) if array.size else 0
    if top > 65535:
        raise UserError(f"label value {top} is too large (max 65535)")
    return array.astype(np.uint8 if top < 256 else np.uint16, copy=False)


def write_labelmap(labels: Union[np.ndarray, sitk.Image], reference: sitk.Image, path: PathLike,
                   label_names: LabelSpec = None) -> Path:
    """Write a label map with ``reference``'s exact geometry (atomic).

    labels: integer array in SimpleITK (z, y, x) order with the reference's shape, or a SimpleITK image on
    the reference's grid. label_names: ``{value: name}`` or ``model.json`` ``labels`` entries.
    Names go into the header (NRRD/MHA: ``logonet_labels`` JSON; ``.seg.nrrd``: Slicer segment fields;
    NIfTI: the 80-character ``descrip`` when they fit) and always into ``<path>.labels.json``.
    Returns the written path.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not suffix:
        raise UserError(f"cannot write a label map to {path}: the name must end in one of {', '.join(VOLUME_SUFFIXES)}")
    array = _label_array(labels, reference)
    present = [int(v) for v in np.unique(array)]
    entries = normalize_label_spec(label_names, present)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    compact = json.dumps({str(e["value"]): e["name"] for e in entries}, separators=(",", ":"))
    if suffix in (".nii", ".nii.gz"):
        # ITK writes ITK_FileNotes into the NIfTI descrip field (80 bytes incl. terminator).
        notes = ";".join(f"{e['value']}={e['name']}" for e in entries)
        image.SetMetaData("ITK_FileNotes", notes if len(notes) <= 79 else f"labels: see {path.name}{SIDECAR_SUFFIX}")
    else:
        image.SetMetaData(HEADER_LABELS_KEY, compact)
    if suffix == ".seg.nrrd":
        _add_slicer_segment_fields(image, entries, array)
    # Sidecar staged first and replaced only after the label map is written and verified: a failure
    # anywhere leaves both previous files as they were.
    with atomic_write(sidecar_path(path)) as side_tmp:
        side_tmp.write_text(json.dumps({"labels": entries}, indent=2) + "\n", encoding="utf-8")
        write_image(image, path)
    return path


def sidecar_path(path: PathLike) -> Path:
    """``<path>.labels.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _add_slicer_segment_fields(image: sitk.Image, entries: List[Dict[str, Any]], array: np.ndarray) -> None:
    """Slicer segmentation (.seg.nrrd) header: one segment per label value, all in layer 0."""
    size = image.GetSize()
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    for index, entry in enumerate(entries):
        prefix = f"Segment{index}_"
        color = " ".join(f"{c / 255.0:.6f}" for c in entry["color"])
        image.SetMetaData(prefix + "ID", f"Segment_{entry['value']}")
        image.SetMetaData(prefix + "Name", entry["name"])
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", color)
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(entry["value"]))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", extent)
        image.SetMetaData(prefix + "Tags", "|")


def read_label_names(path: PathLike) -> Dict[int, str]:
    """Label names that travel with a label map: sidecar JSON, else header (logonet or Slicer fields), else {}."""
    path = Path(path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
            return {int(e["value"]): str(e["name"]) for e in data["labels"]}
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{side} is not a valid label sidecar ({error}); fix or delete it") from error
    if path.is_dir():
        return {}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise UserError(f"cannot read the header of {path}: {_first_line(error)}") from error
    keys = set(reader.GetMetaDataKeys())
    if HEADER_LABELS_KEY in keys:
        return {int(k): v for k, v in json.loads(reader.GetMetaData(HEADER_LABELS_KEY)).items()}
    names: Dict[int, str] = {}
    index = 0
    while f"Segment{index}_LabelValue" in keys:
        names[int(reader.GetMetaData(f"Segment{index}_LabelValue"))] = reader.GetMetaData(f"Segment{index}_Name")
        index += 1
    if not names and "descrip" in keys:
        for part in reader.GetMetaData("descrip").split(";"):
            value, sep, name = part.partition("=")
            if sep and value.strip().isdigit():
                names[int(value)] = name
    return names
