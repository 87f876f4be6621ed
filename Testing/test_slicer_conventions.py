"""Issue 12: DICOM SEG export through Slicer's real dialog (defect 1), the parameter node saved with the scene,
onReload of the libraries, and the one-click sample CT, against slicer-core's scene."""
from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
import pytest

from slicer_fixtures import FAKE_CLI, LIB_DIR, REPO, SEGMENT_DIR, TRAIN_DIR, add_volume, mrml, put_in_study  # noqa: F401

LIB = LIB_DIR


# ----------------------------------------------------------------------------------------- defect 1: DICOM SEG
class FakeExportDialog:
    """Records what the module does with ``slicer.qSlicerDICOMExportDialog`` (C++; setMRMLScene + execDialog)."""
    made = []

    def __init__(self):
        self.calls = []
        FakeExportDialog.made.append(self)

    def setMRMLScene(self, scene):  # noqa: N802
        self.calls.append(("setMRMLScene", scene))

    def execDialog(self, item):  # noqa: N802
        self.calls.append(("execDialog", item))
        return True


@pytest.fixture
def dicom_case(mrml):  # noqa: F811
    volume = add_volume(mrml.slicer, np.zeros((6, 8, 10), dtype=np.int16), name="CT from DICOM")
    study = put_in_study(mrml.scene, volume)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT LoGoNet")
    segmentation.GetSegmentation().AddEmptySegment("", "liver", (1.0, 0.5, 0.4))
    return mrml, volume, study, segmentation


def test_dicom_seg_opens_slicers_export_dialog_on_the_segmentation_in_the_ct_study(dicom_case, monkeypatch):
    from LoGoNetSegmentLib.dicomseg import export_dicom_seg

    mrml, volume, study, segmentation = dicom_case
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3.4 1.2.3.5")
    monkeypatch.setattr(mrml.slicer, "qSlicerDICOMExportDialog", FakeExportDialog, raising=False)
    FakeExportDialog.made.clear()
    item = export_dicom_seg(segmentation, volume, has_exporter=lambda: True)
    sh = mrml.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert item == sh.GetItemByDataNode(segmentation) and sh.GetItemParent(item) == study
    assert FakeExportDialog.made[0].calls == [("setMRMLScene", mrml.scene), ("execDialog", item)]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume


def test_dicom_seg_errors_say_what_to_do(dicom_case):
    from LoGoNetSegmentLib.dicomseg import export_dicom_seg
    from LoGoNetLib.errors import LoGoNetError

    mrml, volume, study, segmentation = dicom_case
    opened = []
    with pytest.raises(LoGoNetError, match="needs a CT loaded from DICOM.*Export labelmap"):
        export_dicom_seg(segmentation, volume, dialog_factory=lambda: opened.append(1), has_exporter=lambda: True)
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")
    with pytest.raises(LoGoNetError, match="no DICOM SEG exporter.*QuantitativeReporting"):
        export_dicom_seg(segmentation, volume, dialog_factory=lambda: opened.append(1), has_exporter=lambda: False)
    assert opened == []


def test_exporter_detection_follows_the_registered_plugins(mrml, monkeypatch):  # noqa: F811
    from LoGoNetSegmentLib.dicomseg import exporter_available

    monkeypatch.delitem(sys.modules, "DICOMSegmentationPlugin", raising=False)
    assert exporter_available() is False  # not in slicer-core, nor importable here
    monkeypatch.setattr(mrml.slicer.modules, "dicomPlugins", {"DICOMSegmentationPlugin": object}, raising=False)
    assert exporter_available() is True


def test_no_module_imports_a_python_dicom_export_dialog():
    """DICOMLib has no Python DICOMExportDialog in any Slicer version: importing it is the defect 1 bug."""
    for path in list(SEGMENT_DIR.rglob("*.py")) + list(TRAIN_DIR.rglob("*.py")) + list(LIB_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "DICOMLib":
                assert all(alias.name != "DICOMExportDialog" for alias in node.names), path
            if isinstance(node, ast.Attribute) and node.attr == "DICOMExportDialog":
                pytest.fail(f"{path}: {ast.unparse(node)}")


# ----------------------------------------------------------------------------------------- parameter node
def _reload_scene(slicer, scene):
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    loaded = slicer.vtkMRMLScene()
    loaded.SetLoadFromXMLString(1)
    loaded.SetSceneXMLString(xml)
    loaded.Import()
    return loaded


def test_segment_selections_are_saved_with_the_scene_and_restored(mrml):  # noqa: F811
    from LoGoNetLib.parameters import segment_parameters

    volume = add_volume(mrml.slicer, np.zeros((4, 5, 6), dtype=np.int16), name="CT A")
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT A LoGoNet")
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "abdomen")
    params = segment_parameters(mrml.scene)
    assert params.get("Model") == "demo" and params.get("Device") == "auto" and not params.get_bool("Fast")
    params.set_node_ref("InputVolume", volume)
    params.set_node_ref("OutputSegmentation", segmentation)
    params.set_node_ref("ROI", roi)
    params.set("Model", "my-model")
    params.set("Device", "cpu")
    params.set("Fast", True)
    assert segment_parameters(mrml.scene).node is params.node  # one node per module and scene
    loaded = _reload_scene(mrml.slicer, mrml.scene)
    restored = segment_parameters(loaded)
    assert restored.node is not params.node
    assert restored.node_ref("InputVolume").GetName() == "CT A"
    assert restored.node_ref("OutputSegmentation").GetName() == "CT A LoGoNet"
    assert restored.node_ref("ROI").GetName() == "abdomen"
    assert (restored.get("Model"), restored.get("Device"), restored.get_bool("Fast")) == ("my-model", "cpu", True)


def test_train_settings_are_saved_with_the_scene(mrml):  # noqa: F811
    from LoGoNetLib.parameters import train_parameters

    params = train_parameters(mrml.scene)
    assert params.get("Epochs") == "100" and params.get("Mode") == "finetune"
    params.set("Epochs", 7)
    params.set("LearningRate", 0.002)
    params.set("Resume", True)
    restored = train_parameters(_reload_scene(mrml.slicer, mrml.scene))
    assert (restored.get("Epochs"), restored.get("LearningRate"), restored.get_bool("Resume")) == ("7", "0.002", True)


def test_closing_the_scene_gives_default_parameters(mrml):  # noqa: F811
    from LoGoNetLib.parameters import segment_parameters

    volume = add_volume(mrml.slicer, np.zeros((4, 5, 6), dtype=np.int16))
    params = segment_parameters(mrml.scene)
    params.set("Model", "other")
    params.set_node_ref("InputVolume", volume)
    mrml.scene.Clear(0)  # File > Close scene (singletons are kept and reset)
    again = segment_parameters(mrml.scene)  # what the widget's EndCloseEvent observer calls
    assert again.get("Model") == "demo" and again.node_ref("InputVolume") is None


# ----------------------------------------------------------------------------------------- onReload
@pytest.mark.parametrize("package, folder", [("LoGoNetLib", LIB),
                                             ("LoGoNetSegmentLib", SEGMENT_DIR / "LoGoNetSegmentLib"),
                                             ("LoGoNetTrainLib", TRAIN_DIR / "LoGoNetTrainLib")])
def test_every_library_lists_its_submodules_for_reload(package, folder):
    import importlib

    files = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert sorted(importlib.import_module(package).SUBMODULES) == files, f"{package}.SUBMODULES must list every file"


def test_reload_reloads_the_shared_library_then_the_modules_own():
    # in a fresh interpreter, so the reload does not swap classes under the other tests
    code = f"""
import sys
sys.path[:0] = [{str(SEGMENT_DIR)!r}, {str(REPO)!r}, {str(REPO / "Testing")!r}]
import slicer_fixtures
slicer_fixtures.install_app_stubs()  # slicer.i18n for the panel module
import LoGoNetLib
from LoGoNetLib import catalog
from LoGoNetSegmentLib import logic
catalog.CATALOG_FORMAT = "changed before reload"
old_entry_class = catalog.ModelEntry
modules = LoGoNetLib.reload_libraries("LoGoNetSegmentLib")
names = [m.__name__ for m in modules]
assert names == (["LoGoNetLib." + n for n in LoGoNetLib.SUBMODULES]
                 + ["LoGoNetSegmentLib." + n for n in ("dicomseg", "logic", "widget")]), names
assert catalog.CATALOG_FORMAT == "logonet-model-catalog", "catalog was not reloaded"
assert catalog.ModelEntry is not old_entry_class
assert logic.ModelEntry is catalog.ModelEntry, "the module's logic still holds the old catalog"
print("reloaded", len(modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("reloaded ")


@pytest.mark.parametrize("module, library", [("LoGoNetSegment", "LoGoNetSegmentLib"),
                                             ("LoGoNetTrain", "LoGoNetTrainLib")])
def test_reload_reloads_the_libraries_before_the_module_file(mrml, monkeypatch, module, library):  # noqa: F811
    import importlib

    import LoGoNetLib

    calls = []
    monkeypatch.setattr(LoGoNetLib, "reload_libraries", lambda *packages: calls.append(("libraries", packages)))
    slm = sys.modules["slicer.ScriptedLoadableModule"]
    monkeypatch.setattr(slm.ScriptedLoadableModuleWidget, "onReload", lambda self: calls.append(("module",)))
    widget = getattr(importlib.import_module(module), f"{module}Widget")(None)
    widget.onReload()
    assert calls == [("libraries", (library,)), ("module",)]


# ----------------------------------------------------------------------------------------- sample CT
def test_load_sample_ct_runs_the_core_sample_command_and_loads_the_ct(mrml, tmp_path, monkeypatch):  # noqa: F811
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetSegmentLib.logic import SegmentLogic

    monkeypatch.setenv("FAKE_LOGONET_SAMPLE_DIR", str(tmp_path / "sample"))
    logic = SegmentLogic(catalog=ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json"),
                         command_prefix=[sys.executable, str(FAKE_CLI)], temp_root=str(tmp_path))
    logs = []
    task = logic.load_sample_ct(waitForCompletion=True, logCallback=logs.append)
    volume = task.volume
    assert task.state == "succeeded" and volume.GetName() == "example_ct"
    assert volume.GetScene() is mrml.scene and volume.IsA("vtkMRMLScalarVolumeNode")
    array = mrml.slicer.util.arrayFromVolume(volume)
    assert array.shape == (12, 16, 16) and int(array.max()) == 200
    assert np.allclose(volume.GetSpacing(), (3.0, 3.0, 3.0))
    assert any("sample --json" in line for line in logs)


def test_load_sample_ct_failure_is_a_clear_error(mrml, tmp_path, monkeypatch):  # noqa: F811
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetSegmentLib.logic import SegmentLogic
    from LoGoNetLib.errors import LoGoNetError

    monkeypatch.setenv("FAKE_LOGONET_SAMPLE_DIR", str(tmp_path / "sample"))
    monkeypatch.setenv("FAKE_LOGONET_SAMPLE_FAIL", "1")
    logic = SegmentLogic(catalog=ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json"),
                         command_prefix=[sys.executable, str(FAKE_CLI)], temp_root=str(tmp_path))
    before = mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(LoGoNetError, match="sample CT could not be fetched: .*no network"):
        logic.load_sample_ct(waitForCompletion=True)
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before
