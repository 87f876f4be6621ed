"""Export a LoGoNet segmentation as DICOM SEG through Slicer's own DICOM export dialog.

The dialog is the C++ ``slicer.qSlicerDICOMExportDialog`` (``setMRMLScene``, then
``execDialog(subjectHierarchyItemID)``; the same in Slicer 5.8, 5.10 and 5.12). There is no Python
``DICOMLib.DICOMExportDialog``. The SEG writer behind it is the ``DICOMSegmentationPlugin``: part of Slicer from
5.12 (it uses the bundled dcmqi), from the QuantitativeReporting extension before.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import slicer

from LoGoNetLib import scene as sc
from LoGoNetLib.errors import LoGoNetError

DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
NO_EXPORTER = ("This Slicer has no DICOM SEG exporter (DICOMSegmentationPlugin): install the QuantitativeReporting "
               "extension from the Extensions Manager and restart Slicer (Slicer 5.12 and later include it). "
               "Until then, use 'Export labelmap'.")
NOT_FROM_DICOM = ("DICOM SEG needs a CT loaded from DICOM (through the DICOM module): '{name}' was not. "
                  "Use 'Export labelmap' instead, or load the CT through the DICOM module.")


def exporter_available() -> bool:
    """True when a DICOM SEG writer plugin is registered or importable."""
    plugins = getattr(getattr(slicer, "modules", None), "dicomPlugins", None) or {}
    if "DICOMSegmentationPlugin" in plugins:
        return True
    try:
        return importlib.util.find_spec("DICOMSegmentationPlugin") is not None
    except (ImportError, ValueError):
        return False


def export_dicom_seg(segmentation_node, volume_node, dialog_factory: Optional[Callable[[], object]] = None,
                     has_exporter: Optional[Callable[[], bool]] = None) -> int:
    """Open Slicer's DICOM export dialog on the segmentation (placed in the CT's study first); returns the
    subject-hierarchy item it was opened on. Raises :class:`LoGoNetError` with the reason when it cannot."""
    if segmentation_node is None or volume_node is None:
        raise LoGoNetError("select the input CT and its segmentation")
    if not volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE):
        raise LoGoNetError(NOT_FROM_DICOM.format(name=volume_node.GetName()))
    if not (has_exporter or exporter_available)():
        raise LoGoNetError(NO_EXPORTER)
    factory = dialog_factory or getattr(slicer, "qSlicerDICOMExportDialog", None)
    if factory is None:
        raise LoGoNetError("This Slicer has no DICOM export dialog (the DICOM module is disabled).")
    scene = volume_node.GetScene()
    sc.set_reference_geometry(segmentation_node, volume_node)  # the SEG's frames follow the CT's slices
    item = sc.place_in_study(segmentation_node, volume_node)  # same patient and study as the CT
    dialog = factory()
    dialog.setMRMLScene(scene)
    dialog.execDialog(item)
    return item


__all__ = ["export_dicom_seg", "exporter_available", "NO_EXPORTER"]
