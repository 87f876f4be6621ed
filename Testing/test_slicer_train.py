"""LoGoNetTrain's logic against a real MRML scene: the fake worker for the protocol details (fast), and one real
``logonet finetune`` on phantoms added through "Add to training set" (stop -> resumable checkpoint -> resume ->
the model appears in LoGoNetSegment's catalog).
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from slicer_fixtures import FAKE_CLI, add_volume, mrml, write_fake_card  # noqa: F401


def _labeled_folder(root: Path) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "imagesTr" / "a_0000.nii.gz").write_bytes(b"")
    (root / "labelsTr" / "a.nii.gz").write_bytes(b"")
    return root


def _wait_while_running(task, done, timeout_s: float = 30.0) -> None:
    """Poll a running task (or BackgroundProcess) until ``done()`` is truthy, it ends, or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while task.poll() and not done() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def train_env(tmp_path, mrml):  # noqa: F811
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetTrainLib.logic import TrainLogic

    catalog = ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json")
    logic = TrainLogic(catalog=catalog, command_prefix=[sys.executable, str(FAKE_CLI)])
    return mrml, logic, catalog, _labeled_folder(tmp_path / "data")


def test_fake_run_parses_progress_charts_and_registers(train_env, tmp_path):
    from LoGoNetTrainLib.logic import TrainSettings

    mrml, logic, catalog, data = train_env
    seen = []
    settings = TrainSettings(data_dir=str(data), out_dir=str(tmp_path / "out"), epochs=4, roi=(32, 32, 32),
                             name="liver-v1")
    task = logic.start(settings, waitForCompletion=True, progressCallback=lambda t: seen.append(t.epoch))
    assert task.state == "succeeded"
    assert task.epoch == 4 and task.total_epochs == 4 and [e["step"] for e in task.history] == [1, 2, 3, 4]
    assert task.best_dice == pytest.approx(0.4)
    assert 4 in seen
    assert task.chart.rows == 4
    table = task.chart.table.GetTable()
    assert table.GetColumnByName("loss").GetValue(3) == pytest.approx(0.25)
    assert task.chart.chart.GetNumberOfPlotSeriesNodes() == 2
    assert task.model_entry is not None and task.model_entry.path == tmp_path / "out" / "best"
    assert task.model_entry.id in [entry.id for entry in catalog.models()]
    assert catalog.find(task.model_entry.id).labels[0]["name"] == "liver"


def test_training_runs_share_the_task_base_cancel_and_an_event_pumping_wait(train_env, tmp_path, monkeypatch):
    """One Task base for every run: a training run can be cancelled like a segmentation, and waiting for it
    keeps Slicer's events flowing (both were missing from the training task before)."""
    from LoGoNetLib.process import Task
    from LoGoNetSegmentLib.logic import SampleTask, SegmentTask
    from LoGoNetTrainLib.logic import TrainSettings, TrainTask

    assert all(issubclass(cls, Task) for cls in (TrainTask, SegmentTask, SampleTask))
    mrml, logic, catalog, data = train_env
    pumped = []
    monkeypatch.setattr(mrml.slicer, "app", types.SimpleNamespace(processEvents=lambda: pumped.append(1)))
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "0.5")
    task = logic.start(TrainSettings(data_dir=str(data), out_dir=str(tmp_path / "out"), epochs=50,
                                     roi=(32, 32, 32)), waitForCompletion=False)
    _wait_while_running(task, lambda: task.history, timeout_s=60)
    logic.cancel()
    assert task.wait(timeout=60) == "cancelled" and pumped
    assert task.model_entry is None and catalog.models() == []


def test_fake_stop_leaves_checkpoint_and_resume_continues(train_env, tmp_path, monkeypatch):
    from LoGoNetTrainLib.logic import TrainSettings

    mrml, logic, catalog, data = train_env
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "0.3")
    settings = TrainSettings(data_dir=str(data), out_dir=str(tmp_path / "out"), epochs=50, roi=(32, 32, 32))
    logs = []
    task = logic.start(settings, waitForCompletion=False, logCallback=logs.append)
    _wait_while_running(task, lambda: task.checkpoint is not None)
    sigints = []
    monkeypatch.setattr("LoGoNetLib.process.kill_tree", lambda *args: sigints.append(args))
    logic.stop(grace_s=30)
    assert (tmp_path / "out" / "STOP").is_file()  # the request is a file (Windows has no usable signal)
    assert task.wait(timeout=60) == "stopped"
    assert sigints == []  # no signal was sent
    assert not (tmp_path / "out" / "STOP").exists()
    assert task.checkpoint and Path(task.checkpoint).is_file()
    stopped_at = json.loads(Path(task.checkpoint).read_text(encoding="utf-8"))["epoch"]
    assert 1 <= stopped_at < 50 and task.model_entry is None and catalog.models() == []
    assert task.checkpoint_epoch == stopped_at
    assert f"resumable from epoch {stopped_at + 1} of 50" in logs[-1] and "Resume" in logs[-1]
    assert not any("{" in line for line in logs), "raw JSON protocol lines reached the log"
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "0")
    settings.resume = True
    resumed = logic.start(settings, waitForCompletion=True)
    assert resumed.state == "succeeded"
    assert resumed.history[0]["step"] == stopped_at + 1


def test_a_worker_that_ignores_stop_is_ended_and_reported_resumable_not_failed(train_env, tmp_path, monkeypatch):
    from LoGoNetTrainLib.logic import TrainSettings

    mrml, logic, catalog, data = train_env
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "0.2")
    monkeypatch.setenv("FAKE_LOGONET_IGNORE_STOP", "1")
    settings = TrainSettings(data_dir=str(data), out_dir=str(tmp_path / "out"), epochs=500, roi=(32, 32, 32))
    logs = []
    task = logic.start(settings, waitForCompletion=False, logCallback=logs.append)
    _wait_while_running(task, lambda: task.checkpoint_epoch is not None)
    logic.stop(grace_s=0.5)
    assert task.wait(timeout=30) == "stopped"
    assert task.process.killed_after_stop and task.error_message is None
    assert "resumable from epoch" in logs[-1] and "did not exit in time" in logs[-1]
    assert not any("failed" in line.lower() or "None" in line for line in logs)
    assert not (tmp_path / "out" / "STOP").exists()


def test_output_folder_that_cannot_be_created_is_a_clear_error(train_env, tmp_path):
    from LoGoNetLib.errors import LoGoNetError
    from LoGoNetTrainLib.logic import TrainSettings

    mrml, logic, catalog, data = train_env
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    logic.problems = lambda settings: []  # the folder check passes; creating it fails (read-only disk, a file...)
    with pytest.raises(LoGoNetError, match="the output folder .*a_file/out cannot be used"):
        logic.start(TrainSettings(data_dir=str(data), out_dir=str(blocker / "out"), epochs=1, roi=(32, 32, 32)))


# A worker that counts the SIGINTs it gets: Stop must send exactly one, since the real trainer takes a second
# SIGINT as "abort now" (Ctrl-C twice) instead of "save a checkpoint and stop".
SIGINT_COUNTER = r"""
import json, signal, sys, time
received = []
signal.signal(signal.SIGINT, lambda *args: received.append(1))
print(json.dumps({"event": "start"}), flush=True)
while not received:
    time.sleep(0.01)
time.sleep(0.5)
print(json.dumps({"event": "warning", "message": "sigints=%d" % len(received)}), flush=True)
sys.exit(130)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a process group")
@pytest.mark.parametrize("process_scan_fails", [False, True])
def test_stop_sends_exactly_one_sigint(monkeypatch, process_scan_fails):
    from LoGoNetLib.process import BackgroundProcess

    if process_scan_fails:  # psutil racing with processes that exit while it reads /proc
        psutil = pytest.importorskip("psutil")

        def scan_fails(self, recursive=False):
            raise IndexError("list index out of range")

        monkeypatch.setattr(psutil.Process, "children", scan_fails)
    process = BackgroundProcess([sys.executable, "-c", SIGINT_COUNTER]).start()
    _wait_while_running(process, lambda: process.events)
    process.stop(grace_s=30)
    assert process.wait(timeout=30) == "stopped"
    assert process.events[-1]["message"] == "sigints=1"


def test_problems_are_reported_all_at_once(train_env, tmp_path):
    from LoGoNetLib.errors import LoGoNetError
    from LoGoNetTrainLib.logic import FINETUNE_FROM_PRETRAINED, PRETRAIN, TrainSettings, count_cases

    mrml, logic, catalog, data = train_env
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = TrainSettings(mode=FINETUNE_FROM_PRETRAINED, data_dir=str(empty), out_dir="", epochs=0,
                             roi=(40, 40, 40), lr=0, preset="XL")
    problems = logic.problems(settings)
    text = "\n".join(problems)
    for expected in ("preset", "epochs", "learning rate", "multiple of 32", "no volumes", "output folder",
                     "pre-trained model"):
        assert expected in text
    with pytest.raises(LoGoNetError):
        logic.start(settings)
    ok = TrainSettings(data_dir=str(data), out_dir=str(tmp_path / "o"), resume=True)
    assert any("nothing to resume" in p for p in logic.problems(ok))
    # pre-training reads nested folders and DICOM series, found as the worker finds them (data.datasets.discover)
    (empty / "patient1" / "series1").mkdir(parents=True)
    (empty / "patient1" / "liver.seg.nrrd").write_bytes(b"")
    nested = TrainSettings(mode=PRETRAIN, data_dir=str(empty), out_dir=str(tmp_path / "o"))
    assert count_cases(empty) == (0, 0)  # a .seg.nrrd is a segmentation, an empty folder no series
    assert any("no volumes found" in p for p in logic.problems(nested))  # the worker would find nothing either
    (empty / "patient1" / "series1" / "slice1.dcm").write_bytes(b"")
    (empty / "patient1" / "ct.nii.gz").write_bytes(b"")
    assert count_cases(empty) == (2, 0) and logic.problems(nested) == []


def test_case_counts_are_the_workers_discovery(tmp_path):
    """count_cases is logonet.data.datasets.discover: an MSD folder counts the cases its dataset.json lists
    (not every file in imagesTr), a label the list names but that is missing is not counted, and a broken
    dataset.json is one clear error instead of a wrong count."""
    from LoGoNetLib.errors import LoGoNetError
    from LoGoNetTrainLib.logic import count_cases

    data = tmp_path / "msd"
    for sub, names in (("imagesTr", ("a.nii.gz", "b.nii.gz", "c.nii.gz")), ("labelsTr", ("a.nii.gz",))):
        (data / sub).mkdir(parents=True)
        for name in names:
            (data / sub / name).write_bytes(b"")
    listed = [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
              {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}]
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}, "training": listed}))
    assert count_cases(data) == (2, 1)
    (data / "dataset.json").write_text("{broken")
    with pytest.raises(LoGoNetError, match="dataset.json is not valid JSON"):
        count_cases(data)


def test_command_line_matches_the_cli(train_env, tmp_path):
    from LoGoNetTrainLib.logic import FINETUNE_FROM_PRETRAINED, PRETRAIN, TrainSettings

    mrml, logic, catalog, data = train_env
    logic.command_prefix = None
    command = logic.build_command(TrainSettings(mode=FINETUNE_FROM_PRETRAINED, data_dir="D", out_dir="O",
                                                preset="S", epochs=7, roi=(96, 96, 64), lr=2e-4, device="gpu",
                                                init_model="P", resume=True, name="n"))
    assert command[1:4] == ["-m", "logonet", "finetune"]
    joined = " ".join(command[3:])
    assert joined == ("finetune D --out O --preset S --epochs 7 --roi 96 96 64 --lr 0.0002 --device cuda "
                      "--progress jsonl --init P --name n --resume")
    pre = logic.build_command(TrainSettings(mode=PRETRAIN, data_dir="U", out_dir="O", device="cpu"))
    assert pre[3:5] == ["pretrain", "U"] and "--init" not in pre


# ------------------------------------------------------------------------------------------ training set
def _scene_case(mrml, labels, seed):  # noqa: F811
    """A volume and a segmentation made in the scene (as an annotator leaves them after correcting)."""
    from LoGoNetLib import scene as sc

    rng = np.random.default_rng(seed)
    volume = add_volume(mrml.slicer, rng.integers(-100, 200, (12, 14, 16)).astype(np.int16), name=f"case {seed}")
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg {seed}")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    table = sc.color_table_for_labels(labels, "model", mrml.scene)
    seg.SetLabelmapConversionColorTableNodeID(table.GetID())
    # segments added in an order unrelated to the values
    for n, label in enumerate(reversed(labels)):
        segment_id = seg.GetSegmentation().AddEmptySegment("", label["name"], (1, 0, 0))
        mask = np.zeros((12, 14, 16), np.uint8)
        mask[n * 3:n * 3 + 2, 2:6, 2:6] = 1
        mrml.slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, segment_id, volume)
    return volume, seg


def test_add_to_training_set_writes_stable_nnunet_pairs(train_env, tmp_path):
    import SimpleITK as sitk

    from LoGoNetTrainLib.logic import TrainLogic

    mrml, logic, catalog, data = train_env
    labels = [{"value": 3, "name": "left kidney", "color": [212, 126, 151]},
              {"value": 6, "name": "liver", "color": [221, 130, 101]}]
    dataset = tmp_path / "trainset"
    volume, seg = _scene_case(mrml, labels, 1)
    first = TrainLogic.add_to_training_set(volume, seg, dataset)
    volume2, seg2 = _scene_case(mrml, labels, 2)
    seg2.GetSegmentation().AddEmptySegment("", "tumor", (0, 1, 0))
    mask = np.zeros((12, 14, 16), np.uint8)
    mask[10:, 10:, 10:] = 1
    mrml.slicer.util.updateSegmentBinaryLabelmapFromArray(
        mask, seg2, seg2.GetSegmentation().GetSegmentIdBySegmentName("tumor"), volume2)
    second = TrainLogic.add_to_training_set(volume2, seg2, dataset, case_id="case 1")  # name clash -> new id
    meta = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"background": 0, "left kidney": 3, "liver": 6, "tumor": 7}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "CT"}
    assert first["image"].name == "case_1_0000.nii.gz" and first["label"].name == "case_1.nii.gz"
    assert second["case_id"] == "case_1_2"
    lab1 = sitk.ReadImage(str(first["label"]))
    img1 = sitk.ReadImage(str(first["image"]))
    assert lab1.GetSize() == img1.GetSize() and np.allclose(lab1.GetSpacing(), img1.GetSpacing())
    assert np.allclose(lab1.GetOrigin(), img1.GetOrigin()) and np.allclose(lab1.GetDirection(), img1.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(lab1))) == {0, 3, 6}
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(second["label"]))))) == {0, 3, 6, 7}
    # the image voxels are the scene's
    assert np.array_equal(sitk.GetArrayFromImage(img1), mrml.slicer.util.arrayFromVolume(volume))
    # the data subsystem reads it as an nnU-Net dataset without problems
    datasets = pytest.importorskip("logonet.data.datasets")
    index = datasets.discover(dataset)
    assert len(index.cases) == 2


def test_add_to_msd_folder_lists_the_case_and_keeps_taken_values(train_env, tmp_path):
    """An MSD folder ({"1": "spleen"} labels, a "training" list) gets the pair listed; a model value that the
    folder already gives to another name moves to the next free value instead of merging two organs."""
    import SimpleITK as sitk

    from LoGoNetTrainLib.logic import TrainLogic

    mrml, _, _, _ = train_env
    dataset = tmp_path / "msd"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps(
        {"name": "msd", "labels": {"0": "background", "1": "spleen", "3": "tumor"}, "training": []}))
    labels = [{"value": 3, "name": "left kidney", "color": [212, 126, 151]},
              {"value": 6, "name": "liver", "color": [221, 130, 101]}]
    volume, seg = _scene_case(mrml, labels, 1)
    added = TrainLogic.add_to_training_set(volume, seg, dataset)  # labels from the color table
    meta = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"0": "background", "1": "spleen", "3": "tumor", "4": "left kidney", "6": "liver"}
    assert meta["training"] == [{"image": "./imagesTr/case_1_0000.nii.gz", "label": "./labelsTr/case_1.nii.gz"}]
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(added["label"]))))) == {0, 4, 6}
    datasets = pytest.importorskip("logonet.data.datasets")
    index = datasets.discover(dataset)
    assert len(index.cases) == 1 and index.label_names == {1: "spleen", 3: "tumor", 4: "left kidney", 6: "liver"}


# ------------------------------------------------------------------------------------------ real CLI
@pytest.mark.slow
def test_real_finetune_on_cases_added_from_the_scene_stop_resume_catalog(mrml, tmp_path, make_phantom_dataset):  # noqa: F811
    """Phantoms loaded into the scene -> "Add to training set" -> `logonet finetune` through the subprocess:
    progress parsed, Stop leaves a resumable checkpoint, Resume finishes, and the model is in the catalog."""
    pytest.importorskip("torch")
    from LoGoNetLib import scene as sc
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetTrainLib.logic import TrainLogic, TrainSettings
    from logonet.data.labels import BTCV_LABELS

    labels = [label.to_dict() for label in BTCV_LABELS]
    phantoms = make_phantom_dataset(cases=2, size=32, seed=0)
    dataset = tmp_path / "trainset"
    volumes_logic = mrml.logics["Volumes"]
    import vtk

    for n, image in enumerate(sorted((phantoms / "imagesTr").glob("*.nii.gz"))):
        volume = volumes_logic.AddArchetypeVolume(str(image), f"phantom {n}", 0, vtk.vtkStringArray())
        seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"phantom {n} seg")
        sc.set_reference_geometry(seg, volume)
        table = sc.color_table_for_labels(labels, "BTCV", mrml.scene)
        sc.import_labelmap(sc.read_labelmap(phantoms / "labelsTr" / image.name), seg, labels, table)
        TrainLogic.add_to_training_set(volume, seg, dataset, case_id=f"phantom_{n}")

    catalog = ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json")
    logic = TrainLogic(catalog=catalog)  # the real `python -m logonet`
    # the smallest real run: 3 epochs of one 2-crop step on a 32^3 phantom (ULKANet T: the fastest of the
    # family on CPU; the Slicer side does not depend on the architecture), validation only at the end
    run = tmp_path / "run"
    settings = TrainSettings(data_dir=str(dataset), out_dir=str(run), preset="T", epochs=3, roi=(32, 32, 32),
                             device="cpu", name="phantom-test",
                             extra_args=("--model", "ulkanet", "--samples", "2", "--no-augment", "--val-fraction",
                                         "0.5", "--val-every", "3", "--cache", "none"))
    log = []
    task = logic.start(settings, waitForCompletion=False, logCallback=log.append)
    _wait_while_running(task, lambda: task.history, timeout_s=300)
    assert task.history and task.history[0]["step"] == 1 and "loss" in task.history[0], "\n".join(log[-20:])
    assert task.total_epochs == 3 and task.chart.rows == 1
    logic.stop(grace_s=120)
    assert task.wait(timeout=240) == "stopped", task.error_message or "\n".join(log[-20:])
    import torch

    saved = int(torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")["epoch"])
    assert 1 <= saved < 3 and task.checkpoint == str(run / "checkpoint.pt")
    assert catalog.models() == []  # nothing registered for a stopped run
    settings.resume = True
    task = logic.start(settings, waitForCompletion=True, logCallback=log.append)
    assert task.state == "succeeded", task.error_message or "\n".join(log[-20:])
    assert [event["step"] for event in task.history] == list(range(saved + 1, 4))  # continued, nothing redone
    rows = (run / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()[1:]
    assert [int(float(row.split(",")[0])) for row in rows] == [1, 2, 3]
    entry = task.model_entry
    assert entry is not None and entry.id in [e.id for e in catalog.models()]
    assert [label["value"] for label in entry.labels] == list(range(1, 14))
