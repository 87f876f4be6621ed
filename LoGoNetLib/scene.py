"""Moving data between the MRML scene and files: the Slicer side of the file-based exchange with ``logonet``.

Only storage nodes and module logics are used (no ``slicer.util.loadVolume``/``saveNode``, which need the
application's IO manager), so everything here runs headless on ``slicer-core`` as well as in Slicer.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import slicer
import vtk

from logonet.data.labels import parse_label_names  # MSD {"1": "liver"} and nnU-Net {"liver": 1}

from .errors import LoGoNetError, from_core

#: The attribute that marks a color table made from a model card (reused per model instead of piling up).
COLOR_TABLE_ATTRIBUTE = "LoGoNet.ModelLabels"
#: Set on segmentation nodes written by LoGoNetSegment: the model used.
MODEL_ATTRIBUTE = "LoGoNet.Model"
DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


def segmentations_logic():
    """The Segmentations module logic (one accessor, so headless tests can shim ``slicer.modules``)."""
    return slicer.modules.segmentations.logic()


def _scene(node=None):
    return node.GetScene() if node is not None and node.GetScene() is not None else slicer.mrmlScene


# ------------------------------------------------------------------------------------------------ files
def write_volume(volume_node, path) -> Path:
    """Write a volume with its exact geometry (uncompressed, so the worker reads it fast)."""
    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(volume_node):
        raise LoGoNetError(f"could not write {volume_node.GetName()} to {path}")
    return path


def load_volume(path, name: Optional[str] = None):
    """Load a scalar volume file into the scene through the Volumes logic (works headless and in Slicer)."""
    if not os.path.isfile(str(path)):
        raise LoGoNetError(f"{path} does not exist")
    logic = slicer.modules.volumes.logic()
    node = logic.AddArchetypeVolume(str(path), name or Path(str(path)).name.split(".")[0], 0, vtk.vtkStringArray())
    if node is None:
        raise LoGoNetError(f"{path} could not be read as a volume")
    return node


def read_labelmap(path):
    """Read a label file into a ``vtkMRMLLabelMapVolumeNode`` that is *not* in the scene."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not os.path.isfile(str(path)) or not storage.ReadData(node) or node.GetImageData() is None:
        raise LoGoNetError(f"the segmentation result {path} could not be read")
    return node


def same_geometry(node_a, node_b, tolerance: float = 1e-4) -> bool:
    """True when two volumes have the same voxel grid (dimensions and IJK-to-RAS)."""
    if node_a.GetImageData().GetDimensions() != node_b.GetImageData().GetDimensions():
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node_a.GetIJKToRASMatrix(ma)
    node_b.GetIJKToRASMatrix(mb)
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) <= tolerance for r in range(4) for c in range(4))


# ------------------------------------------------------------------------------------------------ labels
def terminology_string(terminology: Optional[Mapping]) -> Optional[str]:
    """A model card's DICOM code triplets as Slicer's serialized terminology entry (None when absent)."""
    if not isinstance(terminology, Mapping) or not terminology.get("category") or not terminology.get("type"):
        return None

    def code(key):
        value = terminology.get(key) or ["", "", ""]
        return "^".join(str(part) for part in list(value)[:3])

    return "~".join([DICOM_CONTEXT, code("category"), code("type"), code("type_modifier"),
                     ANATOMY_CONTEXT, code("region"), code("region_modifier")])


def color_table_for_labels(labels: Sequence[Mapping], name: str, scene=None, reuse: bool = True):
    """A user color table whose entry ``value`` is the label's name and color: the key to stable label values.

    With ``reuse``, an existing table made for the same labels is returned instead of adding one per run.
    """
    scene = scene or slicer.mrmlScene
    signature = json.dumps([[int(l["value"]), str(l["name"]), list(l.get("color") or [])] for l in labels])
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") if reuse else 0):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(COLOR_TABLE_ATTRIBUTE) == signature:
            return node
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetHideFromEditors(True)
    table.SetNumberOfColors(max(int(l["value"]) for l in labels) + 1)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for label in labels:
        r, g, b = [c / 255.0 for c in (label.get("color") or [128, 128, 128])]
        table.SetColor(int(label["value"]), str(label["name"]), r, g, b, 1.0)
    table.SetName(scene.GenerateUniqueName(f"{name} labels"))
    table.SetAttribute(COLOR_TABLE_ATTRIBUTE, signature)
    scene.AddNode(table)
    return table


def labels_from_color_table(table) -> List[Dict]:
    """The labels (value, name, 0-255 color) a color table defines, background and unnamed entries skipped."""
    labels = []
    for value in range(1, table.GetNumberOfColors()):
        name = table.GetColorName(value)
        if not name or name == "(none)":
            continue
        rgba = [0.0] * 4
        table.GetColor(value, rgba)
        labels.append({"value": value, "name": name, "color": [int(round(c * 255)) for c in rgba[:3]]})
    return labels


def conversion_color_table(segmentation_node):
    """The color table a segmentation converts labelmaps with (the model's), or None.

    ``GetLabelmapConversionColorTableNode()`` exists in Slicer 5.8 and later; the ``...NodeID()`` getter only
    from 5.10 (Testing/test_slicer_api58.py checks every call against the 5.8 sources)."""
    return segmentation_node.GetLabelmapConversionColorTableNode()


def set_segment_terminology(segment, entry: Optional[str]) -> None:
    if not entry:
        return
    if hasattr(segment, "SetTerminology"):  # Slicer >= 5.10
        segment.SetTerminology(entry)
    else:  # pragma: no cover - Slicer 5.8
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def import_labelmap(label_node, segmentation_node, labels: Sequence[Mapping], color_table,
                    add_empty: bool = True) -> List[str]:
    """Fill ``segmentation_node`` from a labelmap: one segment per model label, named/colored per the model card.

    Segments keep the label value as their label value; labels the model did not find become empty segments
    (so an annotator can paint a missed organ with the right name and export keeps its value).
    Returns the segment ids in label order, which is also the order of the segments in the segmentation.
    """
    scene = _scene(segmentation_node)
    temp = None
    if label_node.GetScene() is None:
        temp = label_node
        temp.SetName(scene.GenerateUniqueName("LoGoNet result"))
        scene.AddNode(temp)
    try:
        label_node.CreateDefaultDisplayNodes()
        label_node.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        if not segmentations_logic().ImportLabelmapToSegmentationNode(label_node, segmentation_node):
            raise LoGoNetError("the segmentation result could not be imported into the scene")
    finally:
        if temp is not None:
            display = temp.GetDisplayNode()
            scene.RemoveNode(temp)
            if display is not None and display.GetScene() is not None:
                scene.RemoveNode(display)
    segmentation_node.SetLabelmapConversionColorTableNodeID(color_table.GetID())
    ids = []
    for label in labels:
        name = str(label["name"])
        color = tuple(c / 255.0 for c in (label.get("color") or [128, 128, 128]))
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if not segment_id:
            if not add_empty:
                continue
            segment_id = segmentation.AddEmptySegment("", name, color)
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(name)
        segment.SetColor(*color)
        segment.SetLabelValue(int(label["value"]))
        set_segment_terminology(segment, terminology_string(label.get("terminology")))
        ids.append(segment_id)
    for index, segment_id in enumerate(ids):  # the card's order, also for organs the model did not find
        segmentation.SetSegmentIndex(segment_id, index)
    return ids


def set_reference_geometry(segmentation_node, volume_node) -> None:
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                         volume_node.GetID())
    if volume_node.GetParentTransformNode() is not None:
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())


def place_in_study(node, reference_node) -> int:
    """Put ``node`` under the same subject-hierarchy parent (study) as ``reference_node``; returns its item."""
    scene = _scene(reference_node)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ref_item = sh.GetItemByDataNode(reference_node)
    if not ref_item:
        ref_item = sh.CreateItem(sh.GetSceneItemID(), reference_node)
    parent = sh.GetItemParent(ref_item)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)
    return item


# ------------------------------------------------------------------------------------------------ measures
def voxel_volume_ml(volume_node) -> float:
    sx, sy, sz = volume_node.GetSpacing()
    return abs(sx * sy * sz) / 1000.0


def label_volumes_ml(label_array: np.ndarray, labels: Sequence[Mapping], voxel_ml: float) -> List[Tuple[str, int, float]]:
    """``(name, value, mL)`` per model label, from one pass over the label array."""
    counts = np.bincount(label_array.ravel().astype(np.int64, copy=False),
                         minlength=max(int(l["value"]) for l in labels) + 1)
    return [(str(l["name"]), int(l["value"]), float(counts[int(l["value"])]) * voxel_ml) for l in labels]


# ------------------------------------------------------------------------------------------------ export
def export_labelmap_node(segmentation_node, reference_volume, color_table=None, labels: Optional[Sequence[Mapping]] = None):
    """Export every segment to a new labelmap node with *stable* values (the color table's, not segment order).

    The color table is the model's (stored on the segmentation) unless given; ``labels`` builds one instead.
    Segments whose name is not in the table get the next free values. The caller owns (and removes) the node.
    """
    scene = _scene(segmentation_node)
    if color_table is None and labels is not None:
        color_table = color_table_for_labels(labels, "export", scene)
    if color_table is None:
        color_table = conversion_color_table(segmentation_node)
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                         scene.GenerateUniqueName(f"{segmentation_node.GetName()} labels"))
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    ok = segmentations_logic().ExportSegmentsToLabelmapNode(
        segmentation_node, ids, label_node, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        color_table)
    if not ok:
        remove_nodes([label_node])
        raise LoGoNetError("the segments could not be exported to a labelmap")
    return label_node


def export_labelmap_file(segmentation_node, reference_volume, path, color_table=None,
                         labels: Optional[Sequence[Mapping]] = None) -> Path:
    """Write the segmentation as a NIfTI/NRRD labelmap on the reference volume's grid with stable values."""
    path = Path(path)
    if not re.search(r"\.(nii|nii\.gz|nrrd|nhdr|mha|mhd)$", path.name, re.IGNORECASE):
        raise LoGoNetError(f"{path.name}: choose a .nii.gz, .nii, .nrrd or .mha file name")
    label_node = export_labelmap_node(segmentation_node, reference_volume, color_table, labels)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(label_node):
            raise LoGoNetError(f"could not write {path}")
    finally:
        remove_nodes([label_node])
    return path


def remove_nodes(nodes) -> None:
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        scene = node.GetScene()
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
        scene.RemoveNode(node)
        for extra in displays + [storage]:
            if extra is not None and extra.GetScene() is not None:
                scene.RemoveNode(extra)


# ------------------------------------------------------------------------------------------------ training set
def _safe_case_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "case"


def add_to_training_set(volume_node, segmentation_node, dataset_dir, case_id: Optional[str] = None,
                        labels: Optional[Sequence[Mapping]] = None, overwrite: bool = False) -> Dict[str, Path]:
    """Write the volume and its (corrected) segmentation as an nnU-Net pair: ``imagesTr/<case>_0000.nii.gz``,
    ``labelsTr/<case>.nii.gz`` and ``dataset.json``.

    Label values are stable across cases: an existing ``dataset.json`` decides the values of the names it
    knows, then ``labels`` (the model card's); a new segment name gets the next free value and is added to
    ``dataset.json``.
    """
    dataset_dir = Path(dataset_dir)
    images, label_dir = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    meta_path = dataset_dir / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError) as error:
        raise LoGoNetError(f"{meta_path} cannot be read as JSON ({error}); fix it or choose another folder") from error
    with from_core():
        known = parse_label_names(meta.get("labels"), meta_path)
    name_to_value: Dict[str, int] = {name: value for value, name in known.items()}
    colors: Dict[str, List[int]] = {}
    for label in labels or []:
        name, value = str(label["name"]), int(label["value"])
        if name not in name_to_value:  # the model's value, unless the dataset already gave it to another name
            name_to_value[name] = value if value not in name_to_value.values() else max(name_to_value.values()) + 1
        colors[name] = list(label.get("color") or [128, 128, 128])
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        name = segment.GetName()
        colors.setdefault(name, [int(round(c * 255)) for c in segment.GetColor()])
        if name not in name_to_value:  # a segment the model does not know (e.g. added by the annotator)
            name_to_value[name] = max(set(name_to_value.values()) | {0}) + 1
    if not name_to_value:
        raise LoGoNetError("the segmentation has no segments to add to the training set")
    ordered = sorted(name_to_value.items(), key=lambda item: item[1])
    table_labels = [{"value": v, "name": n, "color": colors.get(n, [128, 128, 128])} for n, v in ordered]

    case_id = _safe_case_id(case_id or volume_node.GetName())
    image_path, label_path = images / f"{case_id}_0000.nii.gz", label_dir / f"{case_id}.nii.gz"
    if not overwrite and (image_path.exists() or label_path.exists()):
        n = 2
        while (images / f"{case_id}_{n}_0000.nii.gz").exists() or (label_dir / f"{case_id}_{n}.nii.gz").exists():
            n += 1
        case_id = f"{case_id}_{n}"
        image_path, label_path = images / f"{case_id}_0000.nii.gz", label_dir / f"{case_id}.nii.gz"
    images.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    scene = _scene(segmentation_node)
    table = color_table_for_labels(table_labels, "training set", scene, reuse=False)
    try:
        export_labelmap_file(segmentation_node, volume_node, label_path, color_table=table)
    finally:
        remove_nodes([table])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(image_path))
    if not storage.WriteData(volume_node):
        raise LoGoNetError(f"could not write {image_path}")

    training = None
    if isinstance(meta.get("training"), list):  # an MSD folder lists its cases: the new pair must be listed too
        entry = {"image": f"./imagesTr/{image_path.name}", "label": f"./labelsTr/{label_path.name}"}
        training = [e for e in meta["training"] if e.get("label") != entry["label"]] + [entry]
    # the core's one dataset.json writer; a new folder gets nnU-Net's label form, an existing one keeps its own
    from logonet.data.datasets import write_dataset_json  # SimpleITK and numpy (Slicer's own), never torch

    write_dataset_json(dataset_dir, {v: n for n, v in ordered}, training,
                       description="Cases added from 3D Slicer (LoGoNetTrain 'Add to training set')",
                       existing=meta or {"labels": {"background": 0}},
                       extra={"channel_names": meta.get("channel_names") or {"0": "CT"}, "file_ending": ".nii.gz"})
    return {"image": image_path, "label": label_path, "dataset_json": meta_path, "case_id": case_id}
