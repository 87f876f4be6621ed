"""Helpers for the Slicer-side tests: a real MRML scene from ``slicer-core`` (PyPI) and stubs for the parts of
Slicer that only exist in the application (qt, ctk, ScriptedLoadableModule, i18n).

Import the fixtures into a test file with ``from slicer_fixtures import mrml, ...``. The tests skip cleanly
where slicer-core is not installed (Python < 3.10).
"""
from __future__ import annotations

import json
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
LIB_DIR = REPO / "LoGoNetLib"
SEGMENT_DIR = REPO / "LoGoNetSegment"
TRAIN_DIR = REPO / "LoGoNetTrain"
FAKE_CLI = LIB_DIR / "Testing" / "fake_logonet.py"
MODULE_DIRS = {"LoGoNetSegment": SEGMENT_DIR, "LoGoNetTrain": TRAIN_DIR}

# What Slicer puts on the Python path: each module file's folder (the module and its <Module>Lib), and the folder
# that holds LoGoNetLib and the logonet core (the extension's qt-scripted-modules; here the repository root).
for _path in (str(SEGMENT_DIR), str(TRAIN_DIR), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def install_app_stubs() -> None:
    """Stub modules for the application-only imports of the module files (left alone when they exist)."""
    import slicer

    for name in ("qt", "ctk"):
        sys.modules.setdefault(name, types.ModuleType(name))
    if "slicer.i18n" not in sys.modules:
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        sys.modules["slicer.i18n"] = i18n
        slicer.i18n = i18n
    if "slicer.ScriptedLoadableModule" not in sys.modules:
        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent=None):
                self.parent = parent

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None):
                self.parent = parent

            def onReload(self):  # Slicer's reloads the module file
                pass

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                pass

        class ScriptedLoadableModuleTest(unittest.TestCase):
            pass

        for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                    ScriptedLoadableModuleTest):
            setattr(slm, cls.__name__, cls)
        slm.__all__ = [c.__name__ for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                            ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]
        sys.modules["slicer.ScriptedLoadableModule"] = slm
        slicer.ScriptedLoadableModule = slm


@pytest.fixture
def mrml():
    """A real MRML scene with the Volumes, Segmentations, SubjectHierarchy and Colors logics wired up."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    logics = {"Colors": colors}
    app.SetModuleLogic("Colors", colors)
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules", "app")}
    slicer.mrmlScene = scene
    slicer.app = None
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
        subjecthierarchy=types.SimpleNamespace(logic=lambda: logics["SubjectHierarchy"]))
    install_app_stubs()
    yield types.SimpleNamespace(scene=scene, app=app, logics=logics, slicer=slicer)
    scene.Clear(1)
    for name, value in saved.items():
        setattr(slicer, name, value)


def add_volume(slicer, array: np.ndarray, spacing=(1.5, 1.2, 2.5), origin=(10.0, -20.0, 5.0), name="CT",
               lps_flip=True):
    """A scalar volume from a (k, j, i) array with a non-trivial IJK-to-RAS (flipped axes, spacing, origin)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for axis in range(3):
        sign = -1.0 if lps_flip and axis < 2 else 1.0
        matrix.SetElement(axis, axis, sign * spacing[axis])
        matrix.SetElement(axis, 3, origin[axis])
    return slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=name)


def put_in_study(scene, node, patient="Patient 1", study="Study A"):
    """Subject hierarchy Patient > Study > node (headless, nodes are not added to SH automatically)."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient_item = sh.CreateSubjectItem(sh.GetSceneItemID(), patient)
    study_item = sh.CreateStudyItem(patient_item, study)
    sh.CreateItem(study_item, node)
    return study_item


def write_fake_card(folder: Path, labels, corrupt: str = "") -> Path:
    """A model card folder good enough for the catalog and the fake CLI (``corrupt``: 'json' or 'weights')."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "logonet-model", "format_version": 1, "name": folder.name, "description": "test model",
            "architecture": {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": len(labels) + 1},
            "labels": labels,
            "preprocessing": {"spacing": [1.5, 1.5, 2.0], "intensity_window": [-175.0, 250.0],
                              "roi_size": [32, 32, 32]}}
    (folder / "model.json").write_text("{not json" if corrupt == "json" else json.dumps(meta))
    (folder / "weights.safetensors").write_bytes(b"garbage" if corrupt == "weights" else b"fake")
    return folder


def count_nodes(scene, cls: str = "vtkMRMLNode") -> int:
    return scene.GetNumberOfNodesByClass(cls)


def scene_node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
