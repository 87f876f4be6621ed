"""Dataset folders: discovery of the common layouts and a validation that reports every problem at once.

Layouts (checked in this order):

- ``msd``: Medical Segmentation Decathlon, ``dataset.json`` with a ``training`` list of
  ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` and ``labels`` ``{"0": "background", ...}``.
- ``nnunet``: nnU-Net v2, ``imagesTr/<case>_0000<ending>`` + ``labelsTr/<case><ending>``, ``dataset.json``
  ``labels`` ``{"background": 0, "liver": 1, ...}`` and ``file_ending``.
- ``pairs``: ``images/`` + ``labels/`` matched by name (``_0000`` and ``_seg``/``_label``/``_mask`` suffixes
  ignored); names from a root ``dataset.json``, else from the first label map's sidecar/header.
- ``unlabeled``: every volume below the folder, DICOM series folders included (``labels*`` folders and
  ``.seg.nrrd`` files are skipped), for self-supervised pre-training.

``discover`` only looks at names; ``validate`` reads every file and raises one :class:`DatasetError` listing
every problem (it never writes anything).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from . import volumes
from .labels import parse_label_names

LAYOUTS = ("msd", "nnunet", "pairs", "unlabeled")
_LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")
_LABEL_DIR_NAMES = {"labels", "labelstr", "labelsts", "labelsva", "segmentations", "masks"}


class DatasetError(UserError):
    """A dataset folder has problems; ``problems`` lists each one as a sentence."""

    def __init__(self, root: Path, problems: List[str]) -> None:
        self.root = Path(root)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in dataset folder {self.root}:\n{lines}")


@dataclass
class DatasetIndex:
    """What :func:`discover` found. ``cases``: ``[{"id", "image", "label"}]`` (absolute paths; label may be None)."""

    root: Path
    layout: str
    cases: List[Dict[str, Optional[str]]]
    label_names: Dict[int, str] = field(default_factory=dict)  # foreground value -> name (0 excluded)
    test_images: List[str] = field(default_factory=list)  # imagesTs / MSD "test": unlabeled extras
    problems: List[str] = field(default_factory=list)  # naming problems seen during discovery

    def labeled(self) -> List[Dict[str, str]]:
        """Cases with a label path (for fine-tuning)."""
        return [dict(c) for c in self.cases if c.get("label")]  # type: ignore[misc]

    def images(self) -> List[str]:
        """Every image path, labelled or not (for self-supervised pre-training)."""
        return [str(c["image"]) for c in self.cases] + list(self.test_images)

    def summary(self) -> Dict[str, Any]:
        """Small JSON-ready description (goes into ``model.json`` ``training.data``)."""
        return {"root": str(self.root), "layout": self.layout, "cases": len(self.cases),
                "labeled": len(self.labeled()), "labels": {str(k): v for k, v in sorted(self.label_names.items())}}


# ------------------------------------------------------------------------------------------ discovery
def discover(folder: volumes.PathLike, layout: Optional[str] = None) -> DatasetIndex:
    """Find the cases of a dataset folder (layout auto-detected unless given). Reads only names and JSON."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise UserError(f"dataset folder {root} does not exist; check the path.")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a dataset folder; give the folder that holds the volumes.")
    root = root.resolve()
    if layout is None:
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise UserError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return {"msd": _discover_msd, "nnunet": _discover_nnunet, "pairs": _discover_pairs,
            "unlabeled": _discover_unlabeled}[layout](root)


def detect_layout(root: Path) -> str:
    """``msd`` | ``nnunet`` | ``pairs`` | ``unlabeled`` from the folder's structure."""
    meta = _read_dataset_json(root) if (root / "dataset.json").is_file() else None
    if meta is not None and isinstance(meta.get("training"), list):
        return "msd"
    if (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "pairs"
    return "unlabeled"


def _read_dataset_json(root: Path) -> Dict[str, Any]:
    path = root / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix it or remove it.") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


#: ``dataset.json`` "logonet.generator" values of the project's synthetic data (``logonet synth``, ``logonet phantom``).
SYNTHETIC_GENERATORS = ("logonet synth", "logonet phantom")


def logonet_info(folder: volumes.PathLike) -> Dict[str, Any]:
    """The ``"logonet"`` section of ``folder``'s dataset.json (generator, seed, sources, cases), or {} when there
    is no dataset.json or no such section. A dataset.json that is not a JSON object raises ``UserError``."""
    root = Path(folder)
    if not (root / "dataset.json").is_file():
        return {}
    info = _read_dataset_json(root).get("logonet")
    return info if isinstance(info, dict) else {}


def is_synthetic(folder: volumes.PathLike) -> bool:
    """True when ``folder``'s dataset.json says one of the project's generators wrote it (not real CT)."""
    return logonet_info(folder).get("generator") in SYNTHETIC_GENERATORS


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not os.path.isabs(rel) else Path(rel)


def _discover_msd(root: Path) -> DatasetIndex:
    meta = _read_dataset_json(root)
    names = parse_label_names(meta.get("labels"), root / "dataset.json")
    cases: List[Dict[str, Optional[str]]] = []
    problems: List[str] = []
    for i, entry in enumerate(meta.get("training", [])):
        if not isinstance(entry, Mapping) or "image" not in entry:
            problems.append(f"dataset.json training entry {i} has no 'image' path: {entry!r}")
            continue
        image = _resolve(root, str(entry["image"]))
        label = _resolve(root, str(entry["label"])) if entry.get("label") else None
        cases.append({"id": volumes.strip_volume_suffix(image), "image": str(image),
                      "label": str(label) if label is not None else None})
    tests = [str(_resolve(root, t if isinstance(t, str) else t.get("image", ""))) for t in meta.get("test", [])]
    return DatasetIndex(root, "msd", cases, names, tests, problems)


def _volumes_in(folder: Path) -> List[Path]:
    """Volume files and DICOM series folders directly inside ``folder`` (sorted, hidden files skipped)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden files, including macOS "._x.nii.gz" resource forks shipped with MSD
        if volumes.is_volume_file(entry) and not entry.name.endswith(volumes.SIDECAR_SUFFIX):
            found.append(entry)
        elif entry.is_dir() and _has_dicom(entry):
            found.append(entry)
    return found


def _has_dicom(folder: Path, probe: int = 20) -> bool:
    """True when one of the first ``probe`` files directly in ``folder`` is a DICOM file."""
    checked = 0
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            if entry.suffix.lower() == ".dcm" or volumes.is_dicom_file(entry):
                return True
            checked += 1
            if checked >= probe:
                break
    return False


def _discover_nnunet(root: Path) -> DatasetIndex:
    meta = _read_dataset_json(root) if (root / "dataset.json").is_file() else {}
    problems: List[str] = []
    if not (root / "dataset.json").is_file():
        problems.append("dataset.json is missing (nnU-Net v2 needs it for labels and file_ending)")
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    if isinstance(channels, Mapping) and len(channels) > 1:
        raise UserError(f"{root / 'dataset.json'} declares {len(channels)} input channels; LoGoNet takes one "
                        "(CT): keep only channel _0000.")
    names = parse_label_names(meta.get("labels"), root / "dataset.json")
    ending = str(meta.get("file_ending", "")) or None

    def case_id(path: Path) -> Optional[str]:
        stem = volumes.strip_volume_suffix(path)
        return stem[:-5] if stem.endswith("_0000") else None

    cases: List[Dict[str, Optional[str]]] = []
    labels_dir = root / "labelsTr"
    label_files = {volumes.strip_volume_suffix(p): p for p in _volumes_in(labels_dir)}
    used = set()
    for image in _volumes_in(root / "imagesTr"):
        cid = case_id(image)
        if cid is None:
            if volumes.strip_volume_suffix(image)[-5:-4] == "_" and volumes.strip_volume_suffix(image)[-4:].isdigit():
                continue  # another channel (_0001...): only _0000 is used
            problems.append(f"imagesTr/{image.name} does not follow nnU-Net naming <case>_0000{ending or '.nii.gz'}")
            continue
        label = label_files.get(cid)
        if label is None and ending:
            label = labels_dir / f"{cid}{ending}"  # expected path; validate reports it missing
        used.add(cid)
        cases.append({"id": cid, "image": str(image), "label": str(label) if label is not None else None})
    for cid, path in label_files.items():
        if cid not in used:
            problems.append(f"label labelsTr/{path.name} has no image (expected imagesTr/{cid}_0000{ending or '.nii.gz'})")
    tests = [str(p) for p in _volumes_in(root / "imagesTs")]
    return DatasetIndex(root, "nnunet", cases, names, tests, problems)


def _match_key(path: Path, suffixes: Iterable[str]) -> str:
    stem = volumes.strip_volume_suffix(path)
    for suffix in suffixes:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _discover_pairs(root: Path) -> DatasetIndex:
    problems: List[str] = []
    labels = {}
    for path in _volumes_in(root / "labels"):
        labels.setdefault(_match_key(path, _LABEL_SUFFIXES), path)
    cases: List[Dict[str, Optional[str]]] = []
    used = set()
    for image in _volumes_in(root / "images"):
        key = _match_key(image, ("_0000",))
        label = labels.get(key)
        used.add(key)
        cases.append({"id": key, "image": str(image), "label": str(label) if label is not None else None})
    for key, path in labels.items():
        if key not in used:
            problems.append(f"label labels/{path.name} has no image in images/ with the same name")
    names: Dict[int, str] = {}
    if (root / "dataset.json").is_file():
        names = parse_label_names(_read_dataset_json(root).get("labels"), root / "dataset.json")
    else:
        for case in cases:
            if case["label"] and Path(case["label"]).is_file():
                try:
                    names = {k: v for k, v in volumes.read_label_names(case["label"]).items() if k != 0}
                except UserError:
                    names = {}
                break
    return DatasetIndex(root, "pairs", cases, names, [], problems)


def _discover_unlabeled(root: Path) -> DatasetIndex:
    cases: List[Dict[str, Optional[str]]] = []

    def case_id(path: Path) -> str:
        rel = path.relative_to(root)
        parts = rel.parts[:-1] + (volumes.strip_volume_suffix(path),) if rel.parts else (root.name,)
        return "__".join(parts)

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Skip label and hidden folders; sorted for a stable order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _LABEL_DIR_NAMES)
        if _has_dicom(here):  # a DICOM series folder is one image
            cases.append({"id": case_id(here), "image": str(here), "label": None})
        for name in sorted(filenames):
            if name.startswith(".") or not volumes.volume_suffix(name) or name.lower().endswith(".seg.nrrd"):
                continue
            cases.append({"id": case_id(here / name), "image": str(here / name), "label": None})
    return DatasetIndex(root, "unlabeled", cases, {}, [], [])


# ------------------------------------------------------------------------------------------ validation
def validate(dataset: Any, require_labels: Optional[bool] = None,
             expected_labels: Optional[Iterable[int]] = None, tol: float = 1e-3) -> DatasetIndex:
    """Read every file of a dataset and raise one :class:`DatasetError` listing every problem. Writes nothing.

    dataset: a folder or a :class:`DatasetIndex`. require_labels: default True when any case names a label.
    expected_labels: allowed foreground values (default: the dataset's label names, if it declares any).
    Checks: empty folder, naming problems, unreadable/2-D files, image without label, geometry mismatch
    (beyond ``tol`` mm), non-integer and unexpected label values. Returns the index when all is well.
    """
    index = dataset if isinstance(dataset, DatasetIndex) else discover(dataset)
    if require_labels is None:
        # A dataset that names no label at all (unlabeled layout, MSD images-only) is for pre-training.
        require_labels = any(case.get("label") for case in index.cases)
    allowed = set(int(v) for v in expected_labels) if expected_labels is not None else set(index.label_names)
    problems: List[str] = list(index.problems)
    if not index.cases:
        what = "labelled cases" if require_labels else "volumes (NIfTI, NRRD, MHA/MHD files or DICOM series)"
        problems.append(f"the folder is empty: no {what} found in {index.root} (layout '{index.layout}')")
    for case in index.cases:
        problems.extend(_case_problems(index, case, require_labels, allowed, tol))
    if problems:
        raise DatasetError(index.root, problems)
    return index


def _rel(index: DatasetIndex, path: Any) -> str:
    try:
        return str(Path(path).relative_to(index.root))
    except ValueError:
        return str(path)


def _case_problems(index: DatasetIndex, case: Mapping[str, Any], require_labels: bool, allowed: set,
                   tol: float) -> List[str]:
    problems: List[str] = []
    image_path, label_path = case["image"], case.get("label")
    image = None
    if not Path(image_path).exists():
        problems.append(f"case {case['id']}: image {_rel(index, image_path)} does not exist")
    else:
        try:
            image = volumes.read_image(image_path)
        except UserError as error:
            problems.append(f"case {case['id']}: unreadable image: {error}")
    if not require_labels:
        return problems
    if not label_path or not Path(label_path).exists():
        where = f" (expected {_rel(index, label_path)})" if label_path else ""
        problems.append(f"case {case['id']}: image {_rel(index, image_path)} has no label{where}")
        return problems
    try:
        label = volumes.read_image(label_path)
    except UserError as error:
        problems.append(f"case {case['id']}: unreadable label: {error}")
        return problems
    if image is not None:
        diffs = volumes.geometry_differences(image, label, tol)
        if diffs:
            problems.append(f"case {case['id']}: geometry mismatch between image and label "
                            f"{_rel(index, label_path)}: " + "; ".join(diffs) +
                            " (resample the label onto the image grid)")
    problems.extend(_label_value_problems(case["id"], _rel(index, label_path), label, allowed))
    return problems


def _label_value_problems(case_id: str, name: str, label: sitk.Image, allowed: set) -> List[str]:
    array = sitk.GetArrayViewFromImage(label)
    if not np.issubdtype(array.dtype, np.integer):
        finite = np.isfinite(array)
        if not finite.all() or not np.array_equal(array, np.round(array)):
            bad = array[~finite] if not finite.all() else array[array != np.round(array)]
            return [f"case {case_id}: label {name} has non-integer values (e.g. {float(bad.flat[0]):g}); "
                    "a label map must hold whole numbers 0, 1, 2, ..."]
    values = set(int(v) for v in np.unique(array))
    unexpected = sorted(v for v in values if v < 0 or (allowed and v != 0 and v not in allowed))
    if unexpected:
        declared = ", ".join(str(v) for v in sorted(allowed)) if allowed else "non-negative values"
        return [f"case {case_id}: label {name} has unexpected values {unexpected} (the dataset declares "
                f"0 and {declared})"]
    return []


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def write_dataset_json(folder: Any, labels: Mapping[int, str], training: Optional[List[Mapping[str, str]]] = None, *,
                       name: Optional[str] = None, description: Optional[str] = None,
                       extra: Optional[Mapping[str, Any]] = None,
                       existing: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``folder/dataset.json`` atomically; the one writer of that file (phantom, synth, demo, Slicer's
    "Add to training set").

    ``labels`` maps foreground values to names (background is added). ``training`` lists MSD entries
    (``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``); None counts ``labelsTr`` instead (an
    nnU-Net folder). A new file has MSD's keys (name, description, tensorImageSize, modality, labels, numTraining,
    numTest, training, test); ``existing`` (the folder's current dataset.json) is updated instead, keeping its
    other keys and its label form (MSD ``{"1": "liver"}`` or nnU-Net ``{"liver": 1}``). ``extra`` keys (e.g.
    ``{"logonet": {...}}``) are set last. Torch-free, like the rest of this module's readers.
    """
    from ..atomic import write_json_atomic

    folder = Path(folder)
    values = sorted((int(v), str(n)) for v, n in labels.items() if int(v) != 0)
    if existing is None:
        meta: Dict[str, Any] = {"name": name or folder.name, "description": description or "",
                                "tensorImageSize": "3D", "modality": {"0": "CT"}}
        nnunet_form = False
    else:
        meta = dict(existing)
        meta.setdefault("name", name or folder.name)
        meta.setdefault("description", description or "")
        nnunet_form = not all(str(key).isdigit() for key in meta.get("labels") or {"0": ""})
    if nnunet_form:
        meta["labels"] = {"background": 0, **{n: v for v, n in values}}
    else:
        meta["labels"] = {"0": "background", **{str(v): n for v, n in values}}
    if training is not None:
        meta["numTraining"] = len(training)
        if existing is None:
            meta["numTest"] = 0
        meta["training"] = [dict(entry) for entry in training]
        meta.setdefault("test", [])
    else:
        label_dir = folder / "labelsTr"
        meta["numTraining"] = len([p for p in label_dir.iterdir() if volumes.is_volume_file(p)]) \
            if label_dir.is_dir() else 0
    meta.update(extra or {})
    return write_json_atomic(meta, folder / "dataset.json")
