"""LoGoNetSegment's logic: volume -> ``logonet segment`` in a separate process -> segmentation node.

Usable from Slicer's Python console::

    logic = slicer.modules.logonetsegment.widgetRepresentation().self().logic   # or LoGoNetSegmentLogic()
    task = logic.process(slicer.util.getNode("CT"), model="demo", waitForCompletion=True)
    task.segmentation, task.volumes_ml

Nothing is added to the scene until the worker succeeded: a cancelled or failed run leaves the scene as it was.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import slicer
import vtk

from LoGoNetLib import scene as sc
from LoGoNetLib.catalog import ModelEntry
from LoGoNetLib.core import DEVICES
from LoGoNetLib.errors import LoGoNetError, failure_message
from LoGoNetLib.messages import Throttle, stage_words
from LoGoNetLib.process import CANCELLED, FAILED, SUCCEEDED, BackgroundProcess, Task
from LoGoNetLib.worker import Log, WorkerLogic, no_log

#: Temporary folders hold a copy of the patient's CT: ``LoGoNet-<pid>-<random>``, so that the folders of a
#: Slicer that died can be told from those of a running one and removed at the next start.
TEMP_PREFIX = "LoGoNet-"
_TEMP_NAME = re.compile(r"^LoGoNet-(\d+)-[^/\\]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:  # pragma: no cover - psutil ships with Slicer
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def remove_stale_temp_folders(temp_root: Optional[str] = None) -> List[Path]:
    """Delete ``LoGoNet-<pid>-*`` folders whose process is gone (a Slicer that crashed or was killed during a
    run); returns what was removed. Folders of running processes, and anything not named so, are left alone."""
    root = Path(temp_root or tempfile.gettempdir())
    removed = []
    try:
        candidates = list(root.iterdir())
    except OSError:
        return removed
    for folder in candidates:
        match = _TEMP_NAME.match(folder.name)
        if not match or not folder.is_dir() or folder.is_symlink() or _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


_LIVE_LOGICS: "weakref.WeakSet[SegmentLogic]" = weakref.WeakSet()


@atexit.register
def _cleanup_at_exit() -> None:  # application exit during a run: no CT copy may stay behind
    for logic in list(_LIVE_LOGICS):
        try:
            logic.cleanup()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def roi_to_ijk(volume_node, roi_node) -> Tuple[int, int, int, int, int, int]:
    """The markups ROI as a voxel box ``i0,j0,k0,i1,j1,k1`` (end exclusive) of the volume, clipped to it."""
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)  # world bounding box (a rotated ROI is enclosed by it)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    if volume_node.GetParentTransformNode() is not None:
        world_to_volume = vtk.vtkMatrix4x4()
        volume_node.GetParentTransformNode().GetMatrixTransformFromWorld(world_to_volume)
        vtk.vtkMatrix4x4.Multiply4x4(ras_to_ijk, world_to_volume, ras_to_ijk)
    lows, highs = [float("inf")] * 3, [float("-inf")] * 3
    for x in bounds[0:2]:
        for y in bounds[2:4]:
            for z in bounds[4:6]:
                ijk = ras_to_ijk.MultiplyPoint([x, y, z, 1.0])
                for axis in range(3):
                    lows[axis] = min(lows[axis], ijk[axis])
                    highs[axis] = max(highs[axis], ijk[axis])
    dims = volume_node.GetImageData().GetDimensions()
    # voxel centers are at integer indices: keep the voxels whose center is inside the box
    start = [max(0, math.ceil(lows[a] - 1e-6)) for a in range(3)]
    stop = [min(dims[a], math.floor(highs[a] + 1e-6) + 1) for a in range(3)]
    if any(stop[a] - start[a] < 1 for a in range(3)):
        raise LoGoNetError(f"the ROI '{roi_node.GetName()}' does not overlap the volume '{volume_node.GetName()}'")
    return tuple(start + stop)  # type: ignore[return-value]


class SegmentTask(Task):
    """One segmentation run: state, progress, and (on success) the segmentation node and organ volumes."""

    def __init__(self, volume_node, entry: ModelEntry, temp_dir: Path) -> None:
        super().__init__()
        self.volume_node = volume_node
        self.model = entry
        self.temp_dir = temp_dir
        self.segmentation = None
        self.volumes_ml: List[Tuple[str, int, float]] = []
        self.elapsed_s = 0.0
        self.device_used: Optional[str] = None


class SampleTask(Task):
    """The 'Load sample CT' run: ``state``, then ``volume`` (the loaded node) or ``error_message``."""

    poll_interval_ms = 300

    def __init__(self) -> None:
        super().__init__()
        self.volume = None


class SegmentLogic(WorkerLogic):
    """Runs ``logonet segment``; every collaborator (catalog, installer, command, temp folder) is injectable."""

    def __init__(self, catalog=None, installer=None, command_prefix: Optional[Sequence[str]] = None,
                 temp_root: Optional[str] = None, keep_temp: bool = False,
                 ask: Optional[Callable[[str], bool]] = None) -> None:
        super().__init__(catalog=catalog, installer=installer, command_prefix=command_prefix, ask=ask)
        self.temp_root = temp_root
        self.keep_temp = keep_temp
        self._temp_dirs: List[Path] = []
        _LIVE_LOGICS.add(self)
        remove_stale_temp_folders(temp_root)

    def cleanup(self) -> None:
        """Module cleanup / application exit: kill a running worker and delete every temporary CT copy."""
        if self.task is not None and self.task.running:
            self.task.cancel()
            if self.task.process is not None and self.task.process._process is not None:
                try:
                    self.task.process._process.wait(timeout=5)
                except Exception:
                    pass
        for folder in list(self._temp_dirs):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                self._temp_dirs.remove(folder)

    # ------------------------------------------------------------------------------------------ validation
    @staticmethod
    def validate_input(volume_node) -> None:
        if volume_node is None:
            raise LoGoNetError("select an input volume (a CT)")
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise LoGoNetError(f"'{volume_node.GetName()}' is not a scalar (CT) volume")
        image = volume_node.GetImageData()
        if image is None or min(image.GetDimensions()) < 1:
            raise LoGoNetError(f"'{volume_node.GetName()}' has no voxels")
        if image.GetNumberOfScalarComponents() != 1:
            raise LoGoNetError(f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
                               "LoGoNet segments single-channel CT volumes")
        if min(image.GetDimensions()) < 2:
            raise LoGoNetError(f"'{volume_node.GetName()}' is a 2-D image; LoGoNet needs a 3-D volume")

    def build_command(self, input_path, output_path, model_path, device: str = "auto", fast: bool = False,
                      roi: Optional[Sequence[int]] = None) -> List[str]:
        if device not in DEVICES:
            raise LoGoNetError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        command = self.command("segment", input_path, output_path, "--model", model_path,
                               "--device", DEVICES[device], "--progress", "jsonl")
        if fast:
            command.append("--fast")
        if roi is not None:
            command += ["--box", ",".join(str(int(v)) for v in roi)]
        return command

    # ------------------------------------------------------------------------------------------ run
    def process(self, inputVolume, outputSegmentation=None, model="demo", device: str = "auto", fast: bool = False,
                roiNode=None, waitForCompletion: bool = True, logCallback: Optional[Callable[[str], None]] = None,
                progressCallback: Optional[Callable[[float, str], None]] = None,
                completedCallback: Optional[Callable[[SegmentTask], None]] = None) -> SegmentTask:
        """Segment ``inputVolume``; with ``waitForCompletion`` a failure raises :class:`LoGoNetError`."""
        log = logCallback or no_log
        self.validate_input(inputVolume)
        entry = model if isinstance(model, ModelEntry) else self.catalog.find(model)
        roi = roi_to_ijk(inputVolume, roiNode) if roiNode is not None else None
        if not entry.downloaded:
            entry = self.download_model(entry, log, progressCallback)
        self.ensure_ready("a segmentation is already running: wait for it or cancel it", log)

        temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=self.temp_root))
        self._temp_dirs.append(temp_dir)
        task = SegmentTask(inputVolume, entry, temp_dir)
        self.task = task
        try:
            input_path = sc.write_volume(inputVolume, temp_dir / "input.nrrd")
            # No --stats: the organ volumes come from the labelmap this process reads anyway.
            command = self.build_command(input_path, temp_dir / "result.nrrd", entry.path, device, fast, roi)
        except Exception:
            self._cleanup(task)
            raise
        log(f"Model: {entry.title} ({entry.path})")

        throttle = Throttle(0.25)  # a few GUI updates per second, not one per sliding window
        last_text = [""]

        def on_event(event: Dict) -> None:
            kind = event.get("event")
            if kind == "start" and event.get("device"):
                task.device_used = str(event["device"])
            if progressCallback is None:
                return
            step, total = event.get("step"), event.get("total")
            text = stage_words(event.get("stage") or kind)
            changed = text != last_text[0]
            if kind == "done":
                text, fraction, force = stage_words("importing"), 1.0, True
            elif isinstance(step, (int, float)) and isinstance(total, (int, float)) and total:
                fraction, force = min(1.0, float(step) / float(total)), changed or step >= total
                if kind == "progress" and event.get("stage") in ("inference", "cases"):
                    text = f"{text}: {int(step)} of {int(total)}"
            elif kind in ("start", "stage"):
                fraction, force = 0.0, True
            else:
                return
            last_text[0] = stage_words(event.get("stage") or kind)
            if throttle.ready(force=force):
                progressCallback(fraction, text)

        def on_finished(process: BackgroundProcess) -> None:
            self._finish(task, outputSegmentation, log)
            if completedCallback is not None:
                completedCallback(task)

        self.launch(task, command, log, wait=waitForCompletion, on_event=on_event, on_finished=on_finished,
                    force_cpu=(device == "cpu"), cwd=str(temp_dir))
        if waitForCompletion and task.state == FAILED:
            raise LoGoNetError(task.error_message or "segmentation failed")
        return task

    # ------------------------------------------------------------------------------------------ sample CT
    def load_sample_ct(self, waitForCompletion: bool = True, logCallback: Optional[Callable[[str], None]] = None,
                       completedCallback: Optional[Callable[["SampleTask"], None]] = None) -> "SampleTask":
        """Run the core's ``sample --json`` (downloads the public example CT once, then uses the cache) in a
        separate process and load the CT into the scene as ``example_ct``. With ``waitForCompletion`` a failure
        raises :class:`LoGoNetError`; otherwise ``completedCallback(task)`` gets ``task.volume`` or
        ``task.error_message``."""
        log = logCallback or no_log
        task = SampleTask()
        lines: List[str] = []
        log("Fetching the sample CT (once; later runs use the cached copy)")

        def on_log(text: str) -> None:
            lines.append(text)
            if not text.lstrip().startswith("{"):
                log(text)

        def on_finished(process: BackgroundProcess) -> None:
            try:
                if process.state != SUCCEEDED:
                    raise LoGoNetError(f"the sample CT could not be fetched: {process.error_message or process.state}")
                paths = None
                for line in reversed(lines):
                    try:
                        candidate = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(candidate, dict) and isinstance(candidate.get("ct"), str):
                        paths = candidate
                        break
                if paths is None:
                    raise LoGoNetError("the sample command printed no CT path")
                task.volume = sc.load_volume(paths["ct"], name="example_ct")
                task.state = SUCCEEDED
                log(f"Loaded the sample CT {paths['ct']}")
            except Exception as error:
                task.state, task.error_message = FAILED, failure_message(error, "loading the sample CT failed")
                log(f"Error: {task.error_message}")
            if completedCallback is not None:
                completedCallback(task)

        self.launch(task, self.command("sample", "--json"), on_log, wait=waitForCompletion, on_finished=on_finished)
        if waitForCompletion and task.state == FAILED:
            raise LoGoNetError(task.error_message or "the sample CT could not be loaded")
        return task

    def download_model(self, entry: ModelEntry, log: Log = no_log,
                       progressCallback: Optional[Callable[[float, str], None]] = None) -> ModelEntry:
        """Fetch a catalog model given by URL (first use only), with progress; a clear error otherwise."""
        log(f"Downloading the model '{entry.title}' from {entry.url} (first use only)...")
        throttle = Throttle(0.25)
        idle = getattr(getattr(slicer, "app", None), "processEvents", None)

        def progress(done: int, total: Optional[int]) -> None:
            if progressCallback is not None and throttle.ready(force=bool(total) and done >= total):
                size = f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                progressCallback(done / total if total else 0.0, f"Downloading the model: {size}")
            if idle is not None:
                idle()

        try:
            entry = self.catalog.ensure_downloaded(entry, progress=progress)
        except LoGoNetError as error:
            raise LoGoNetError(f"the model '{entry.title}' could not be downloaded: {error}") from error
        log(f"Model saved in {entry.path}")
        return entry

    # ------------------------------------------------------------------------------------------ import
    def _finish(self, task: SegmentTask, output_segmentation, log: Log) -> None:
        process = task.process
        task.elapsed_s = time.monotonic() - task.started
        try:
            if process.state == SUCCEEDED:
                try:
                    task.segmentation = self.import_result(task, output_segmentation)
                    task.state = SUCCEEDED
                    log(f"Done in {task.elapsed_s:.1f} s" + (f" on {task.device_used}" if task.device_used else ""))
                except Exception as error:  # a bad result must not leave half-made nodes behind
                    task.state = FAILED
                    task.error_message = failure_message(error, "importing the result failed")
            elif process.state == CANCELLED:
                task.state = CANCELLED
                log("Cancelled.")
            else:
                task.state = FAILED
                task.error_message = process.error_message or f"logonet exited with code {process.returncode}"
            if task.state == FAILED:
                log(f"Error: {task.error_message}")
        finally:
            self._cleanup(task)

    def _cleanup(self, task: SegmentTask) -> None:
        if not self.keep_temp:
            shutil.rmtree(task.temp_dir, ignore_errors=True)
            if task.temp_dir in self._temp_dirs and not task.temp_dir.exists():
                self._temp_dirs.remove(task.temp_dir)

    def import_result(self, task: SegmentTask, output_segmentation=None):
        """Read the worker's labelmap into a segmentation node (new one unless given) next to the input."""
        volume = task.volume_node
        labels = task.model.labels
        label_node = sc.read_labelmap(task.temp_dir / "result.nrrd")
        if not sc.same_geometry(label_node, volume):
            raise LoGoNetError("importing the result failed: its voxel grid differs from the input volume's")
        label_array = slicer.util.arrayFromVolume(label_node)
        scene = volume.GetScene()
        created = []
        try:
            table = sc.color_table_for_labels(labels, task.model.title if len(task.model.title) < 40 else task.model.id,
                                              scene)
            segmentation = output_segmentation
            if segmentation is None:
                segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                       scene.GenerateUniqueName(f"{volume.GetName()} LoGoNet"))
                created.append(segmentation)
            segmentation.CreateDefaultDisplayNodes()
            sc.set_reference_geometry(segmentation, volume)
            sc.import_labelmap(label_node, segmentation, labels, table)
            segmentation.SetAttribute(sc.MODEL_ATTRIBUTE, str(task.model.path))
            sc.place_in_study(segmentation, volume)
        except Exception:
            sc.remove_nodes(created)
            raise
        task.volumes_ml = sc.label_volumes_ml(label_array, labels, sc.voxel_volume_ml(volume))
        return segmentation

    # ------------------------------------------------------------------------------------------ export
    @staticmethod
    def export_labelmap(segmentation_node, reference_volume, path):
        """Export with the model's label values (the color table stored on the segmentation)."""
        return sc.export_labelmap_file(segmentation_node, reference_volume, path)
