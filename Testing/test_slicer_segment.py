"""LoGoNetSegment's logic against a real MRML scene (slicer-core), with a fake ``logonet`` worker process.

The fake worker (LoGoNetSegment/Testing/Python/fake_logonet.py) speaks the real CLI and progress protocol, so
most tests here check the Slicer side alone and fast; test_demo_model_on_sample_ct_end_to_end runs the real
``python -m logonet segment`` with the bundled demo model on the sample CT.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from slicer_fixtures import FAKE_CLI, add_volume, mrml, put_in_study, scene_node_ids, write_fake_card  # noqa: F401

LABELS = [{"value": 2, "name": "liver", "color": [221, 130, 101]},
          {"value": 5, "name": "spleen", "color": [157, 108, 162],
           "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                           "type": ["SCT", "78961009", "Spleen"]}},
          {"value": 9, "name": "aorta", "color": [224, 97, 76]}]


@pytest.fixture
def logic_env(tmp_path, mrml):  # noqa: F811
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetSegmentLib.logic import SegmentLogic

    card = write_fake_card(tmp_path / "models" / "organs", LABELS)
    catalog = ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json")
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    logic = SegmentLogic(catalog=catalog, command_prefix=[sys.executable, str(FAKE_CLI)], temp_root=str(temp_root))
    rng = np.random.default_rng(0)
    volume = add_volume(mrml.slicer, rng.integers(-200, 300, (18, 20, 24)).astype(np.int16))
    study = put_in_study(mrml.scene, volume)
    return mrml, logic, card, volume, study, temp_root


def test_segment_names_colors_values_geometry_study(logic_env, tmp_path):
    mrml, logic, card, volume, study, temp_root = logic_env
    slicer = mrml.slicer
    progress, log = [], []
    task = logic.process(volume, model=str(card), device="cpu", waitForCompletion=True,
                         progressCallback=lambda f, text: progress.append(f), logCallback=log.append)
    seg = task.segmentation
    assert task.state == "succeeded" and seg is not None
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "spleen", "aorta"]
    for label in LABELS:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(label["name"]))
        assert np.allclose(segment.GetColor(), [c / 255 for c in label["color"]])
    spleen = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("spleen"))
    assert "78961009" in spleen.GetTerminology()
    # reference geometry and subject hierarchy placement
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    # progress went to 100%, the log shows the command, temp files are gone
    assert progress and progress[-1] == 1.0
    assert any("segment" in line and "--progress jsonl" in line for line in log)
    assert list(temp_root.iterdir()) == []
    # organ volumes in mL: voxels * voxel volume
    expected = {l["name"]: 0.0 for l in LABELS}
    spacing = np.prod(volume.GetSpacing()) / 1000.0
    for name, value, ml in task.volumes_ml:
        assert ml == pytest.approx(np.count_nonzero(_label_array(slicer, seg, volume) == value) * spacing)
        expected.pop(name)
    assert not expected
    # export: the model's label values, not segment order, on the input's grid
    out = logic.export_labelmap(seg, volume, tmp_path / "export.nii.gz")
    exported = _read(out)
    assert set(np.unique(exported)) == {0, 2, 5, 9}
    assert exported.shape == slicer.util.arrayFromVolume(volume).shape


def _label_array(slicer, seg, volume):
    from LoGoNetLib import scene as sc

    node = sc.export_labelmap_node(seg, volume)
    try:
        return slicer.util.arrayFromVolume(node).copy()
    finally:
        sc.remove_nodes([node])


def _read(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_export_keeps_values_after_segments_are_reordered_and_added(logic_env, tmp_path):
    mrml, logic, card, volume, _, _ = logic_env
    seg = logic.process(volume, model=str(card), waitForCompletion=True).segmentation
    segmentation = seg.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("liver"))  # value 2 gone
    segmentation.AddEmptySegment("", "tumor", (1.0, 0.0, 0.0))
    tumor = segmentation.GetSegmentIdBySegmentName("tumor")
    mask = np.zeros(mrml.slicer.util.arrayFromVolume(volume).shape, np.uint8)
    mask[-2:, :2, :2] = 1
    mrml.slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, tumor, volume)
    exported = _read(logic.export_labelmap(seg, volume, tmp_path / "e.nrrd"))
    values = set(np.unique(exported))
    assert {5, 9} <= values and 2 not in values and 1 not in values
    assert exported[-1, 0, 0] > 9  # a new segment gets a new value, not one of the model's


def test_geometry_of_output_equals_input(logic_env):
    mrml, logic, card, volume, _, _ = logic_env
    from LoGoNetLib import scene as sc

    seg = logic.process(volume, model=str(card), waitForCompletion=True).segmentation
    node = sc.export_labelmap_node(seg, volume)
    assert sc.same_geometry(node, volume)


def test_cancel_during_run_leaves_no_new_node(logic_env, monkeypatch):
    mrml, logic, card, volume, _, temp_root = logic_env
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "20")
    before = scene_node_ids(mrml.scene)
    events = []
    task = logic.process(volume, model=str(card), waitForCompletion=False,
                         progressCallback=lambda f, text: events.append(text))
    deadline = time.monotonic() + 20
    while not events and time.monotonic() < deadline:  # wait until the worker really runs
        task.poll()
        time.sleep(0.05)
    assert events, "the worker never reported progress"
    pid = task.process.pid
    task.cancel()
    assert task.wait(timeout=20) == "cancelled"
    assert scene_node_ids(mrml.scene) == before
    assert task.segmentation is None
    assert list(temp_root.iterdir()) == []
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the whole process tree is gone (reaped by Popen)
            os.kill(pid, 0)
            time.sleep(0.05)


def test_corrupt_model_gives_readable_error_and_no_node(logic_env, tmp_path):
    mrml, logic, card, volume, _, _ = logic_env
    from LoGoNetLib.errors import LoGoNetError

    bad = write_fake_card(tmp_path / "broken", LABELS, corrupt="json")
    before = scene_node_ids(mrml.scene)
    with pytest.raises(LoGoNetError, match="model.json: is not valid JSON"):  # the command line's words
        logic.process(volume, model=str(bad), waitForCompletion=True)
    with pytest.raises(LoGoNetError, match="is not a model card"):
        logic.process(volume, model=str(tmp_path), waitForCompletion=True)
    with pytest.raises(LoGoNetError, match="not found"):
        logic.process(volume, model="no-such-model", waitForCompletion=True)
    assert scene_node_ids(mrml.scene) == before


def test_hand_broken_model_lists_do_not_stop_the_module(tmp_path, caplog):
    """A registry or catalog file that is not JSON, or JSON of the wrong shape, is skipped with a log line; the
    module still lists what it can and can register models again."""
    from LoGoNetLib.catalog import ModelCatalog

    card = write_fake_card(tmp_path / "organs", LABELS)
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text("{not json", encoding="utf-8")
    catalog = ModelCatalog(home=tmp_path / "home", catalog_file=catalog_file)
    for broken in ("[1, 2]", '{"models": {"a": 1}}', '{"models": [3, {"id": "x"}, {"path": 5}]}'):
        catalog.registry_file.parent.mkdir(parents=True, exist_ok=True)
        catalog.registry_file.write_text(broken, encoding="utf-8")
        assert catalog.models() == []
    assert "ignoring the model list" in caplog.text
    entry = catalog.register(card, title="Organs")
    assert [e.id for e in catalog.models()] == [entry.id] and catalog.find(entry.id).usable


def test_worker_error_line_becomes_the_message(logic_env, tmp_path):
    mrml, logic, card, volume, _, _ = logic_env
    from LoGoNetLib.errors import LoGoNetError

    # the catalog accepts the card but the worker refuses it: the worker's error line reaches the user
    broken = write_fake_card(tmp_path / "w", LABELS, corrupt="weights")
    before = scene_node_ids(mrml.scene)
    logic.command_prefix = [sys.executable, "-c", "import sys; print('logonet segment: error: weights do not match "
                                                  "the card', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(LoGoNetError, match="weights do not match the card"):
        logic.process(volume, model=str(broken), waitForCompletion=True)
    assert scene_node_ids(mrml.scene) == before


def test_bad_inputs_are_refused_before_launching(logic_env):
    mrml, logic, card, volume, _, _ = logic_env
    from LoGoNetLib.errors import LoGoNetError

    with pytest.raises(LoGoNetError, match="select an input volume"):
        logic.process(None, model=str(card))
    label = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lab")
    with pytest.raises(LoGoNetError, match="not a scalar"):
        logic.process(label, model=str(card))
    with pytest.raises(LoGoNetError, match="device must be"):
        logic.process(volume, model=str(card), device="tpu")


def test_roi_is_passed_in_voxel_indices_and_result_stays_inside(logic_env):
    mrml, logic, card, volume, _, _ = logic_env
    from LoGoNetSegmentLib.logic import roi_to_ijk
    from LoGoNetLib.errors import LoGoNetError

    # the ROI covering voxels i 4..11, j 3..9, k 2..13 (centers), given in RAS
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    lo = ijk_to_ras.MultiplyPoint([4, 3, 2, 1])[:3]
    hi = ijk_to_ras.MultiplyPoint([11, 9, 13, 1])[:3]
    roi.SetCenter(*[(a + b) / 2 for a, b in zip(lo, hi)])
    roi.SetSize(*[abs(a - b) + 0.01 for a, b in zip(lo, hi)])
    assert roi_to_ijk(volume, roi) == (4, 3, 2, 12, 10, 14)
    seg = logic.process(volume, model=str(card), roiNode=roi, waitForCompletion=True).segmentation
    from LoGoNetLib import scene as sc

    node = sc.export_labelmap_node(seg, volume)
    array = mrml.slicer.util.arrayFromVolume(node)
    k, j, i = np.nonzero(array)
    assert k.min() >= 2 and k.max() < 14 and j.min() >= 3 and j.max() < 10 and i.min() >= 4 and i.max() < 12
    far = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    far.SetCenter(1000, 1000, 1000)
    far.SetSize(5, 5, 5)
    with pytest.raises(LoGoNetError, match="does not overlap"):
        roi_to_ijk(volume, far)


def test_existing_output_segmentation_is_reused(logic_env):
    mrml, logic, card, volume, _, _ = logic_env
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    seg.GetSegmentation().AddEmptySegment("", "old", (1, 1, 1))
    task = logic.process(volume, outputSegmentation=seg, model=str(card), waitForCompletion=True)
    assert task.segmentation is seg
    assert seg.GetSegmentation().GetSegmentIdBySegmentName("old") == ""
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    # a second run reuses the model's color table instead of adding another one
    tables = mrml.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
    logic.process(volume, outputSegmentation=seg, model=str(card), waitForCompletion=True)
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == tables


def test_installer_is_asked_before_launch(logic_env):
    mrml, logic, card, volume, _, _ = logic_env
    from LoGoNetLib.install import DependencyInstaller
    from LoGoNetLib.errors import LoGoNetError

    pip_calls, questions = [], []
    installer = DependencyInstaller(version_of=lambda dist: None if dist == "monai" else "99.0",
                                    pip_install=pip_calls.append, install_torch=lambda req: True)
    logic.installer = installer
    logic.ask = lambda question: questions.append(question) or False
    before = scene_node_ids(mrml.scene)
    with pytest.raises(LoGoNetError, match="monai>=1.4"):
        logic.process(volume, model=str(card), waitForCompletion=True)
    assert questions and "monai>=1.4" in questions[0] and pip_calls == []
    assert scene_node_ids(mrml.scene) == before
    logic.ask = lambda question: True
    task = logic.process(volume, model=str(card), waitForCompletion=True)
    assert pip_calls == ['"monai>=1.4" --no-deps'] and task.state == "succeeded"



def test_segment_installer_offers_the_fast_engine_once_and_never_blocks():
    """With every required package present, the Segment installer asks once for the optional OpenVINO engine:
    yes installs it, no is remembered (never asked again), and a failed install still lets segmentation run."""
    from LoGoNetLib.install import ENGINE_DECLINED_KEY, DependencyInstaller

    def installer(pip, settings, offer=True):
        return DependencyInstaller(version_of=lambda dist: None if dist in ("openvino", "onnx") else "99.0",
                                   pip_install=pip, install_torch=lambda req: True, offer_engine=offer,
                                   settings=settings)

    pip_calls, questions, log = [], [], []
    result = installer(pip_calls.append, {}).ensure(ask=lambda q: questions.append(q) or True, log=log.append,
                                                    optional="once")
    assert result.ok and len(questions) == 1 and "OpenVINO" in questions[0] and "openvino>=2024.0" in questions[0]
    assert pip_calls == ['"openvino>=2024.0"', '"onnx>=1.15"'] and result.installed == ["openvino>=2024.0", "onnx>=1.15"]

    settings, questions, pip_calls = {}, [], []
    no = installer(pip_calls.append, settings)
    for _ in range(2):
        result = no.ensure(ask=lambda q: questions.append(q) or False, log=log.append, optional="once")
        assert result.ok and not result.declined  # declining the optional engine is not a failed check
    assert len(questions) == 1 and pip_calls == [] and settings[ENGINE_DECLINED_KEY] is True
    assert "runs with PyTorch" in log[-1]
    no.ensure(ask=lambda q: questions.append(q) or False, log=log.append, optional="again")  # Check dependencies
    assert len(questions) == 2

    def broken(requirement):
        raise OSError("no network")

    log = []
    result = installer(broken, {}).ensure(ask=lambda q: True, log=log.append, optional="once")
    assert result.ok and result.installed == [] and "no network" in log[-1]

    questions = []
    installer(pip_calls.append, {}, offer=False).ensure(ask=lambda q: questions.append(q) or True, optional="again")
    installer(pip_calls.append, {}).ensure(ask=lambda q: questions.append(q) or True)  # a script: nobody to ask
    assert questions == []  # the Train module's installer never offers it, nor any installer to a script
    with pytest.raises(ValueError, match="optional must be"):
        installer(pip_calls.append, {}).ensure(ask=lambda q: True, optional="yes")


# ------------------------------------------------------------------------------------------ real CLI
@pytest.mark.slow
def test_demo_model_on_sample_ct_end_to_end(mrml, sample_ct, tmp_path):  # noqa: F811
    """The sample CT loaded into the scene -> the real ``python -m logonet segment --model demo --fast`` through
    the Segment logic: segments named and coloured per the demo card, exported labelmap values equal the model's
    label values (voxel for voxel the worker's own output), geometry equal to the input, placed in its study."""
    pytest.importorskip("torch")
    import json

    import SimpleITK as sitk
    import vtk

    from LoGoNetLib import scene as sc
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetLib.core import resources_dir
    from LoGoNetSegmentLib.logic import SegmentLogic

    card = json.loads((resources_dir() / "Models" / "demo" / "model.json").read_text(encoding="utf-8"))
    labels = card["labels"]
    volume = mrml.logics["Volumes"].AddArchetypeVolume(sample_ct["ct"], "example_ct", 0, vtk.vtkStringArray())
    assert volume is not None
    study = put_in_study(mrml.scene, volume)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    # the real `python -m logonet` and the bundled catalog (ModelCatalog.json -> Models/demo); keep the worker's
    # result file to compare the export with it
    logic = SegmentLogic(catalog=ModelCatalog(home=tmp_path / "home"), temp_root=str(temp_root), keep_temp=True)
    log = []
    task = logic.process(volume, model="demo", device="cpu", fast=True, waitForCompletion=True,
                         logCallback=log.append)
    assert task.state == "succeeded", "\n".join(log[-20:])
    assert any(" -m logonet segment " in line and "--fast" in line for line in log)
    seg = task.segmentation

    # segments named, coloured and coded per the model card, in label order, with the card's label values
    segmentation = seg.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == [label["name"] for label in labels]
    for segment, label in zip(segments, labels):
        assert np.allclose(segment.GetColor(), [c / 255 for c in label["color"]], atol=1e-6), label["name"]
        assert segment.GetLabelValue() == label["value"]
        assert label["terminology"]["type"][1] in segment.GetTerminology(), label["name"]

    # exported labelmap: the model's label values, voxel for voxel what the worker wrote
    exported_path = logic.export_labelmap(seg, volume, tmp_path / "export.nii.gz")
    exported_image = sitk.ReadImage(str(exported_path))
    exported = sitk.GetArrayFromImage(exported_image)
    worker = sitk.GetArrayFromImage(sitk.ReadImage(str(task.temp_dir / "result.nrrd")))
    assert np.array_equal(exported, worker)
    values = set(np.unique(exported).tolist())
    assert values <= {0} | {label["value"] for label in labels}
    liver = next(label["value"] for label in labels if label["name"] == "liver")
    assert np.count_nonzero(exported == liver) > 0  # a sane model finds the liver; no accuracy claim here
    assert dict((name, ml) for name, _, ml in task.volumes_ml)["liver"] > 0

    # geometry equal to the input: the export on disk and the segmentation's reference geometry
    ct = sitk.ReadImage(sample_ct["ct"])
    assert exported_image.GetSize() == ct.GetSize()
    assert np.allclose(exported_image.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    assert np.allclose(exported_image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    assert np.allclose(exported_image.GetDirection(), ct.GetDirection(), atol=1e-6)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume
    label_node = sc.export_labelmap_node(seg, volume)
    assert sc.same_geometry(label_node, volume)
    sc.remove_nodes([label_node])

    # placed in the input's study
    sh = mrml.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


def test_corrupt_weights_real_worker_readable_error_and_no_node(logic_env, tmp_path):
    """The real ``python -m logonet segment`` refuses a card whose weights are damaged: the user gets its one-line
    reason (no traceback) and the scene is unchanged."""
    pytest.importorskip("torch")
    import shutil

    from LoGoNetLib.core import resources_dir
    from LoGoNetLib.errors import LoGoNetError

    mrml, logic, card, volume, _, temp_root = logic_env
    broken = tmp_path / "broken-demo"
    broken.mkdir()
    shutil.copy(resources_dir() / "Models" / "demo" / "model.json", broken / "model.json")
    (broken / "weights.safetensors").write_bytes(b"\0" * 64)  # the catalog only sees that the file exists
    logic.command_prefix = None  # the real `python -m logonet`
    before = scene_node_ids(mrml.scene)
    with pytest.raises(LoGoNetError) as raised:
        logic.process(volume, model=str(broken), device="cpu", waitForCompletion=True)
    message = str(raised.value)
    assert "weights.safetensors" in message and "Traceback" not in message and "\n" not in message
    assert scene_node_ids(mrml.scene) == before
    assert list(temp_root.iterdir()) == []
