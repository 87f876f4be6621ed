"""LoGoNetTrain's logic: ``logonet pretrain`` / ``logonet finetune`` in a separate process.

Progress lines become an epoch progress, the loss and best Dice, and a live chart (a table node plotted by
plot series/chart nodes). Stop writes the trainer's STOP file: it saves a checkpoint and exits, and the same settings
with ``resume=True`` continue from it. A successful fine-tune is registered in the model catalog, so it shows
in LoGoNetSegment's model selector.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import slicer
import vtk

from LoGoNetLib import scene as sc
from LoGoNetLib.catalog import ModelEntry, read_card
from LoGoNetLib.core import DEVICES
from LoGoNetLib.errors import LoGoNetError, failure_message, from_core
from LoGoNetLib.process import FAILED, STOPPED, SUCCEEDED, BackgroundProcess, Task
from LoGoNetLib.worker import Log, WorkerLogic, no_log

PRETRAIN, FINETUNE, FINETUNE_FROM_PRETRAINED = "pretrain", "finetune", "finetune_from_pretrained"
MODES = (PRETRAIN, FINETUNE, FINETUNE_FROM_PRETRAINED)
PRESETS = ("T", "S", "L")
#: The trainer checkpoints and stops when this file appears in its output folder (logonet.train's STOP file).
STOP_FILE = "STOP"


def count_cases(folder) -> Tuple[int, int]:
    """(images, label maps) in a dataset folder, found the way the worker finds them
    (:func:`logonet.data.datasets.discover`: MSD, nnU-Net, images/labels pairs, or any volumes and DICOM series
    below the folder). Names and small headers only, never the volumes. A broken ``dataset.json`` is a
    :class:`LoGoNetError`."""
    from logonet.data.datasets import discover  # numpy and SimpleITK (Slicer's own), never torch

    with from_core():
        index = discover(folder)
    labels = [case for case in index.labeled() if Path(case["label"]).is_file()]
    return len(index.cases), len(labels)


@dataclass
class TrainSettings:
    mode: str = FINETUNE
    data_dir: str = ""
    out_dir: str = ""
    preset: str = "T"
    epochs: int = 100
    roi: Sequence[int] = (96, 96, 96)
    lr: float = 1e-4
    device: str = "auto"
    init_model: Optional[str] = None  # a pre-trained model card (FINETUNE_FROM_PRETRAINED)
    resume: bool = False
    name: Optional[str] = None
    extra_args: Sequence[str] = field(default_factory=tuple)  # passed through to the CLI as is


class TrainTask(Task):
    """One training run: epochs seen, best Dice, the checkpoint, and (on success) the catalog entry."""

    poll_interval_ms = 500

    def __init__(self, settings: TrainSettings) -> None:
        super().__init__()
        self.settings = settings
        self.history: List[Dict] = []
        self.epoch = 0
        self.total_epochs = int(settings.epochs)
        self.best_dice: Optional[float] = None
        self.checkpoint: Optional[str] = None
        self.checkpoint_epoch: Optional[int] = None  # epochs the last checkpoint holds
        self.model_entry: Optional[ModelEntry] = None
        self.chart = None


class TrainingChart:
    """A table (epoch, loss, dice) shown as two plot series in one chart: Slicer's plot view draws it live."""

    def __init__(self, scene, name: str) -> None:
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} metrics"))
        for column in ("epoch", "loss", "dice"):
            array = vtk.vtkFloatArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} chart"))
        self.chart.SetTitle(f"{name}: loss and validation Dice")
        self.chart.SetXAxisTitle("epoch")
        self.series = []
        for column, color in (("loss", (0.85, 0.3, 0.2)), ("dice", (0.2, 0.45, 0.85))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {column}"))
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetColor(*color)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series.append(series)

    def add(self, epoch: int, loss: Optional[float], dice: Optional[float]) -> None:
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for column, value in (("epoch", epoch), ("loss", loss), ("dice", dice)):
            table.GetColumnByName(column).SetValue(row, float("nan") if value is None else float(value))
        table.Modified()
        self.table.Modified()

    @property
    def rows(self) -> int:
        return self.table.GetNumberOfRows()

    def nodes(self):
        return [self.table, self.chart] + self.series


class TrainLogic(WorkerLogic):
    """Builds, starts and stops training runs; collaborators are injectable like the segmentation logic's."""

    def __init__(self, catalog=None, installer=None, command_prefix: Optional[Sequence[str]] = None,
                 ask: Optional[Callable[[str], bool]] = None, chart: bool = True) -> None:
        super().__init__(catalog=catalog, installer=installer, command_prefix=command_prefix, ask=ask)
        self.chart = chart

    # ------------------------------------------------------------------------------------------ validation
    def problems(self, settings: TrainSettings) -> List[str]:
        """Every problem with the settings at once (empty when they can run)."""
        found = []
        if settings.mode not in MODES:
            found.append(f"mode must be one of {', '.join(MODES)}")
        if settings.preset not in PRESETS:
            found.append(f"preset must be one of {', '.join(PRESETS)}")
        if settings.device not in DEVICES:
            found.append(f"device must be one of {', '.join(DEVICES)}")
        if int(settings.epochs) < 1:
            found.append("epochs must be at least 1")
        if not (float(settings.lr) > 0):
            found.append("the learning rate must be positive")
        roi = list(settings.roi)
        if len(roi) not in (1, 3) or any(int(r) < 32 or int(r) % 32 for r in roi):
            found.append("the ROI must be 1 or 3 sizes, each a multiple of 32 (e.g. 96 96 96)")
        data = Path(settings.data_dir) if settings.data_dir else None
        if data is None or not data.is_dir():
            found.append(f"the {'unlabeled' if settings.mode == PRETRAIN else 'labeled'} data folder "
                         f"{settings.data_dir or '(none)'} does not exist")
        else:
            try:
                images, labels = count_cases(data)
            except LoGoNetError as error:
                found.append(str(error))
                images = labels = -1
            if images == 0:
                found.append(f"no volumes found in {data} (expected imagesTr/ or images/, or volumes or DICOM series "
                             "in the folder)")
            elif settings.mode != PRETRAIN and labels == 0:
                found.append(f"no label maps found in {data} (fine-tuning needs imagesTr/+labelsTr/ or images/+labels/)")
        if not settings.out_dir:
            found.append("choose an output folder")
        elif settings.resume and not (Path(settings.out_dir) / "checkpoint.pt").is_file():
            found.append(f"nothing to resume: {Path(settings.out_dir) / 'checkpoint.pt'} does not exist")
        if settings.mode == FINETUNE_FROM_PRETRAINED:
            if not settings.init_model:
                found.append("choose the pre-trained model to start from")
            elif not Path(settings.init_model).exists():
                found.append(f"the pre-trained model {settings.init_model} does not exist")
        return found

    def build_command(self, settings: TrainSettings) -> List[str]:
        command = self.command(
            settings.mode if settings.mode == PRETRAIN else "finetune", settings.data_dir, "--out", settings.out_dir,
            "--preset", settings.preset, "--epochs", int(settings.epochs), "--roi", *[int(r) for r in settings.roi],
            "--lr", repr(float(settings.lr)), "--device", DEVICES[settings.device], "--progress", "jsonl")
        if settings.mode == FINETUNE_FROM_PRETRAINED and settings.init_model:
            command += ["--init", str(settings.init_model)]
        if settings.name and settings.mode != PRETRAIN:
            command += ["--name", settings.name]
        if settings.resume:
            command.append("--resume")
        return command + [str(a) for a in settings.extra_args]

    # ------------------------------------------------------------------------------------------ run
    def start(self, settings: TrainSettings, waitForCompletion: bool = False,
              logCallback: Optional[Log] = None,
              progressCallback: Optional[Callable[[TrainTask], None]] = None,
              completedCallback: Optional[Callable[[TrainTask], None]] = None) -> TrainTask:
        log = logCallback or no_log
        problems = self.problems(settings)
        if problems:
            raise LoGoNetError("; ".join(problems))
        self.ensure_ready("a training run is already running: stop it first", log)
        out = Path(settings.out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / STOP_FILE).unlink(missing_ok=True)  # a request left by an earlier Stop
        except OSError as error:
            raise LoGoNetError(f"the output folder {out} cannot be used: {error.strerror or error}") from error
        task = TrainTask(settings)
        self.task = task

        def on_event(event: Dict) -> None:
            kind = event.get("event")
            if kind in ("start", "epoch", "progress") and isinstance(event.get("total"), int) and kind != "progress":
                task.total_epochs = int(event["total"])
            if kind == "start" and isinstance(event.get("step"), int):
                task.epoch = int(event["step"])
            elif kind == "epoch":
                task.epoch = int(event.get("step") or task.epoch + 1)
                best = event.get("best_dice")
                if isinstance(best, (int, float)):
                    task.best_dice = float(best)
                task.history.append(event)
                if self.chart and slicer.mrmlScene is not None:
                    if task.chart is None:
                        task.chart = TrainingChart(slicer.mrmlScene, settings.name or Path(settings.out_dir).name)
                    task.chart.add(task.epoch, event.get("loss"), event.get("dice"))
            elif kind == "checkpoint" and event.get("path"):
                task.checkpoint = str(event["path"])
                if isinstance(event.get("step"), int):
                    task.checkpoint_epoch = int(event["step"])
            if progressCallback is not None:
                progressCallback(task)

        def on_finished(process: BackgroundProcess) -> None:
            self._finish(task, log)
            if completedCallback is not None:
                completedCallback(task)

        return self.launch(task, self.build_command(settings), log, wait=waitForCompletion, on_event=on_event,
                           on_finished=on_finished, force_cpu=(settings.device == "cpu"))

    def stop(self, grace_s: float = 120.0) -> None:
        """Graceful stop on every OS: a ``STOP`` file in the output folder, which the trainer checks at every step
        and between validation cases; it saves a checkpoint and exits (and is killed after ``grace_s``)."""
        if self.task is not None:
            self.task.stop(grace_s=grace_s, stop_file=str(Path(self.task.settings.out_dir) / STOP_FILE))

    def _finish(self, task: TrainTask, log: Log) -> None:
        process = task.process
        out = Path(task.settings.out_dir)
        if (out / "checkpoint.pt").is_file():
            task.checkpoint = str(out / "checkpoint.pt")
        try:
            (out / STOP_FILE).unlink(missing_ok=True)  # a request the worker never read (killed, or already done)
        except OSError:
            pass
        if process.state == SUCCEEDED:
            task.state = SUCCEEDED
            if task.settings.mode != PRETRAIN:
                try:
                    task.model_entry = self.catalog.register(out, title=task.settings.name or out.name)
                    log(f"Model '{task.model_entry.id}' added to LoGoNetSegment's model list.")
                except Exception as error:
                    task.state = FAILED
                    task.error_message = ("training finished but its model is unusable: "
                                          + failure_message(error, "registering the model failed"))
            else:
                log(f"Pre-trained model written to {out}; fine-tune from it next.")
        elif process.state == STOPPED:
            task.state = STOPPED
            log(self.stopped_message(task))
        else:
            task.state = process.state
            task.error_message = process.error_message
            if task.state == FAILED:
                log(f"Error: {task.error_message}")

    @staticmethod
    def stopped_message(task: TrainTask) -> str:
        """What a stopped (or, after the grace period, killed) run says: where it can resume, never 'failed'."""
        killed = task.process is not None and task.process.killed_after_stop
        head = "Stopped (the worker did not exit in time and was ended)" if killed else "Stopped"
        if not task.checkpoint:
            return f"{head}. No checkpoint was written yet: start again without Resume."
        done = task.checkpoint_epoch if task.checkpoint_epoch is not None else task.epoch
        return (f"{head}, resumable from epoch {done + 1} of {task.total_epochs}: checkpoint {task.checkpoint}; "
                "tick 'Resume' and press Start to continue.")

    # ------------------------------------------------------------------------------------------ training set
    @staticmethod
    def add_to_training_set(volume_node, segmentation_node, dataset_dir, case_id: Optional[str] = None) -> Dict:
        """Export the volume + (corrected) segmentation as an nnU-Net pair with the model's label values."""
        if volume_node is None or segmentation_node is None:
            raise LoGoNetError("select the volume and its segmentation")
        if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
            raise LoGoNetError(f"'{segmentation_node.GetName()}' has no segments")
        labels = None
        table = sc.conversion_color_table(segmentation_node)
        if table is not None:
            labels = sc.labels_from_color_table(table)
        else:
            model_path = segmentation_node.GetAttribute(sc.MODEL_ATTRIBUTE)
            if model_path:
                try:
                    labels = read_card(model_path).get("labels")
                except LoGoNetError:  # the model is gone: the segments' own names and colours decide
                    labels = None
        return sc.add_to_training_set(volume_node, segmentation_node, dataset_dir, case_id=case_id, labels=labels)


__all__ = ["TrainLogic", "TrainSettings", "TrainTask", "TrainingChart", "count_cases", "MODES", "PRESETS",
           "PRETRAIN", "FINETUNE", "FINETUNE_FROM_PRETRAINED"]
