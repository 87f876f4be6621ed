"""LoGoNetSegment: segment abdominal organs in the loaded CT with a LoGoNet model.

Thin module file: the work is in ``LoGoNetLib`` (shared with LoGoNetTrain). The segmentation itself runs in a
separate ``PythonSlicer -m logonet segment`` process, so Slicer stays responsive and a crash or out-of-memory
cannot take it down.
"""
from __future__ import annotations

import os
import sys

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *  # noqa: F401,F403
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from slicer.util import VTKObservationMixin  # noqa: E402

from LoGoNetLib.catalog import ModelCatalog  # noqa: E402
from LoGoNetLib.dicomseg import DicomSegError, export_dicom_seg  # noqa: E402
from LoGoNetLib.gui import ask_without_busy_cursor, organ_summary  # noqa: E402
from LoGoNetLib.install import DependencyInstaller  # noqa: E402
from LoGoNetLib.parameters import segment_parameters  # noqa: E402
from LoGoNetLib.segmentlogic import LoGoNetError, SegmentLogic  # noqa: E402

SETTINGS = "LoGoNet/"
DEVICE_CHOICES = (("auto", "Auto (GPU if available)"), ("gpu", "GPU"), ("cpu", "CPU"))


def _demo_organs() -> str:
    """'12 abdominal organs' from the bundled demo model's card (never a number typed into the help text)."""
    try:
        demo = next((entry for entry in ModelCatalog().bundled() if entry.id == "demo" and entry.usable), None)
    except Exception:  # a broken installation must not stop the module from loading
        demo = None
    return f"{len(demo.labels)} abdominal organs" if demo is not None else "abdominal organs"


# ----------------------------------------------------------------------------------------------------- module
class LoGoNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LoGoNet Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LoGoNet for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Segment abdominal organs in a CT with a LoGoNet model: the bundled demo model ({organs}, BTCV labels), "
            "a model trained with LoGoNetTrain, or any LoGoNet model folder. Each model's organs are listed under "
            "the model selector. The model runs in a separate process; Apply becomes Cancel while it runs. "
            "'Load sample CT' loads a public example CT to try it.").format(organs=_demo_organs())
        self.parent.acknowledgementText = _(
            "LoGoNet: local and global 3-D segmentation with masked self-supervised pre-training. "
            "The demo model is for demonstration only, not for clinical use.")


# ----------------------------------------------------------------------------------------------------- widget
class LoGoNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.task = None
        self.sampleTask = None
        self.params = None
        self._updatingGui = False
        self._progressText = ""

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/LoGoNetSegment.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = LoGoNetSegmentLogic()
        self.logic.ask = lambda question: ask_without_busy_cursor(
            question, lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle="LoGoNet"))

        for key, text in DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(text, key)
        self.ui.modelSelector.view().setTextElideMode(qt.Qt.ElideMiddle)
        self.ui.volumesTable.setHorizontalHeaderLabels([_("Organ"), _("Volume (mL)")])
        self.ui.volumesTable.horizontalHeader().setStretchLastSection(True)
        # Visibility and colour per segment, as in the Segmentations module (created here, not in the .ui, so
        # that the .ui stays loadable by Qt Designer and by the panel renderer without Slicer's plugins).
        self.segmentsTable = slicer.qMRMLSegmentsTableView()
        self.segmentsTable.setMRMLScene(slicer.mrmlScene)
        self.segmentsTable.setSelectionMode(qt.QAbstractItemView.ExtendedSelection)
        self.segmentsTable.setOpacityColumnVisible(False)
        self.ui.segmentsTableContainer.layout().addWidget(self.segmentsTable)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.sampleDataButton.connect("clicked()", self.onLoadSampleCT)
        self.ui.browseModelButton.connect("clicked()", self.onBrowseModel)
        self.ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.ui.openModelsFolderButton.connect("clicked()", self.onOpenModelsFolder)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.fastCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportLabelmapButton.connect("clicked()", self.onExportLabelmap)
        self.ui.exportDicomSegButton.connect("clicked()", self.onExportDicomSeg)
        self.ui.editInSegmentEditorButton.connect("clicked()", self.onEditInSegmentEditor)
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()  # kills a running worker and deletes the temporary CT copy

    def enter(self):
        self.initializeParameterNode()

    def onReload(self):
        """Developer mode: reload LoGoNetLib's submodules first, then this module file."""
        import LoGoNetLib

        LoGoNetLib.reload_submodules()
        ScriptedLoadableModuleWidget.onReload(self)

    # ----------------------------------------------------------------------------------------- parameter node
    def onSceneStartClose(self, caller, event):
        self.params = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Selections live in the scene's parameter node (saved with the scene); the GUI shows them."""
        self.params = segment_parameters(slicer.mrmlScene)
        if self.params.node_ref("InputVolume") is None:
            self.params.set_node_ref("InputVolume", slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode"))
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        if self.params is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(self.params.node_ref("InputVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(self.params.node_ref("OutputSegmentation"))
            self.ui.roiSelector.setCurrentNode(self.params.node_ref("ROI"))
            index = self.ui.modelSelector.findData(self.params.get("Model"))
            if index >= 0:
                self.ui.modelSelector.setCurrentIndex(index)
            self.ui.deviceSelector.setCurrentIndex(max(0, self.ui.deviceSelector.findData(self.params.get("Device"))))
            self.ui.fastCheckBox.checked = self.params.get_bool("Fast")
        finally:
            self._updatingGui = False
        self.onModelChanged()
        self.onOutputChanged(self.ui.outputSegmentationSelector.currentNode())

    def updateParameterNodeFromGUI(self, *_args):
        if self.params is not None and not self._updatingGui:
            self.params.set_node_ref("InputVolume", self.ui.inputVolumeSelector.currentNode())
            self.params.set_node_ref("OutputSegmentation", self.ui.outputSegmentationSelector.currentNode())
            self.params.set_node_ref("ROI", self.ui.roiSelector.currentNode())
            entry = self.currentModel()
            if entry is not None:
                self.params.set("Model", entry.id)
            self.params.set("Device", self.ui.deviceSelector.currentData or "auto")
            self.params.set("Fast", bool(self.ui.fastCheckBox.checked))
        self.updateButtons()

    # ----------------------------------------------------------------------------------------- state
    def busy(self):
        return ((self.task is not None and self.task.running) or self.logic.installing
                or (self.sampleTask is not None and self.sampleTask.running))

    def updateButtons(self, *_args):
        running = self.task is not None and self.task.running
        volume = self.ui.inputVolumeSelector.currentNode()
        entry = self.currentModel()
        if running:
            self.ui.applyButton.text, self.ui.applyButton.enabled = _("Cancel"), True
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene")
        else:
            self.ui.applyButton.text = _("Apply")
            reasons = []
            if self.logic.installing:
                reasons.append(_("the Python packages are being installed"))
            if self.sampleTask is not None and self.sampleTask.running:
                reasons.append(_("the sample CT is loading"))
            if volume is None:
                reasons.append(_("select an input volume"))
            if entry is None or not entry.usable:
                reasons.append(_("select a usable model"))
            self.ui.applyButton.enabled = not reasons
            self.ui.applyButton.toolTip = (_("Segment the input volume") if not reasons
                                           else _("Cannot apply: ") + "; ".join(reasons))
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        has_result = segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        for button in (self.ui.exportLabelmapButton, self.ui.exportDicomSegButton, self.ui.editInSegmentEditorButton):
            button.enabled = has_result and not running
        busy = self.busy()
        for widget in (self.ui.inputVolumeSelector, self.ui.modelSelector, self.ui.browseModelButton,
                       self.ui.deviceSelector, self.ui.fastCheckBox, self.ui.roiSelector,
                       self.ui.outputSegmentationSelector, self.ui.installDependenciesButton,
                       self.ui.sampleDataButton, self.ui.refreshModelsButton):
            widget.enabled = not busy

    def onOutputChanged(self, node):
        self.ui.segmentationShow3DButton.setSegmentationNode(node)
        self.segmentsTable.setSegmentationNode(node)
        self.updateParameterNodeFromGUI()

    # ----------------------------------------------------------------------------------------- models
    def refreshModels(self):
        import qt

        current = self.ui.modelSelector.currentData
        wanted = current or (self.params.get("Model") if self.params is not None else "demo")
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        self.models = self.logic.catalog.models()
        for index, entry in enumerate(self.models):
            title = entry.title if entry.usable else f"{entry.title} (unusable)"
            self.ui.modelSelector.addItem(title, entry.id)
            self.ui.modelSelector.setItemData(index, f"{title}\n{entry.tooltip()}", qt.Qt.ToolTipRole)
        self.ui.modelSelector.setCurrentIndex(max(0, self.ui.modelSelector.findData(wanted)))
        self.ui.modelSelector.blockSignals(False)
        self.onModelChanged()

    def currentModel(self):
        index = self.ui.modelSelector.currentIndex
        models = getattr(self, "models", [])
        return models[index] if 0 <= index < len(models) else None

    def onModelChanged(self, *_args):
        entry = self.currentModel()
        if entry is None:
            self.ui.modelInfoLabel.text = _("No model: add a model folder (Advanced)")
        elif entry.error:
            self.ui.modelInfoLabel.text = _("Cannot use this model: ") + entry.error
        elif not entry.downloaded:
            self.ui.modelInfoLabel.text = _("Downloaded on first Apply (then kept in the models folder)")
        else:
            self.ui.modelInfoLabel.text = organ_summary(entry)
        self.ui.modelSelector.toolTip = (f"{entry.title}\n{entry.tooltip()}" if entry else "")
        self.ui.modelInfoLabel.toolTip = entry.tooltip() if entry else ""
        self.updateParameterNodeFromGUI()

    def onBrowseModel(self):
        import qt

        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a LoGoNet model folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("This folder is not a usable LoGoNet model."), waitCursor=True):
            entry = self.logic.catalog.register(folder)
            self.refreshModels()
            self.ui.modelSelector.setCurrentIndex(self.ui.modelSelector.findData(entry.id))

    def onOpenModelsFolder(self):
        import qt

        folder = self.logic.catalog.models_dir
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onInstallDependencies(self):
        if self.busy():
            return
        installer = DependencyInstaller()
        if not installer.missing():
            self.addLog(_("All required Python packages are installed."))
            return
        self.logic.installing = True  # Apply, Load sample CT and this button stay disabled meanwhile
        self.updateButtons()
        try:
            # the question comes first, with the normal cursor; the busy cursor only while pip runs
            with slicer.util.tryWithErrorDisplay(_("Installing LoGoNet's Python packages failed."), waitCursor=True):
                result = installer.ensure(ask=self.logic.ask, log=self.addLog)
                for problem in result.problems:
                    self.addLog(problem)
        finally:
            self.logic.installing = False
            self.updateButtons()
        if result.restart_needed and ask_without_busy_cursor(
                _("Packages were updated. Restart Slicer now?"), slicer.util.confirmYesNoDisplay):
            slicer.util.restart()

    # ----------------------------------------------------------------------------------------- run
    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)  # called from the polling timer: no processEvents needed

    def onProgress(self, fraction, text):
        self.ui.progressBar.value = int(round(fraction * 100))
        self.ui.statusLabel.text = text

    def onLoadSampleCT(self):
        if self.busy():
            return
        self.ui.statusLabel.text = _("Loading the sample CT (downloaded once, about 38 MB)...")
        try:
            self.sampleTask = self.logic.load_sample_ct(waitForCompletion=False, logCallback=self.addLog,
                                                        completedCallback=self.onSampleLoaded)
        except Exception as error:
            slicer.util.errorDisplay(_("The sample CT could not be loaded: ") + str(error), windowTitle="LoGoNet")
            return
        self.updateButtons()

    def onSampleLoaded(self, task):
        if task.state == "succeeded":
            self.ui.inputVolumeSelector.setCurrentNode(task.volume)
            slicer.util.setSliceViewerLayers(background=task.volume, fit=True)
            self.ui.statusLabel.text = _("Sample CT loaded: press Apply.")
        else:
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(str(task.error_message), windowTitle="LoGoNet",
                                     detailedText=self.ui.logTextEdit.toPlainText())
        self.updateButtons()

    def onApplyButton(self):
        if self.task is not None and self.task.running:
            self.ui.statusLabel.text = _("Cancelling...")
            self.task.cancel()
            return
        if self.busy():
            return
        self.ui.logTextEdit.clear()
        self.ui.volumesTable.setRowCount(0)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Checking the Python packages...")
        self.ui.applyButton.enabled = False  # no second click while packages or the model are installed
        try:
            self.task = self.logic.process(
                self.ui.inputVolumeSelector.currentNode(),
                outputSegmentation=self.ui.outputSegmentationSelector.currentNode(),
                model=self.currentModel(), device=self.ui.deviceSelector.currentData,
                fast=self.ui.fastCheckBox.checked, roiNode=self.ui.roiSelector.currentNode(),
                waitForCompletion=False, logCallback=self.addLog, progressCallback=self.onProgress,
                completedCallback=self.onCompleted)
        except LoGoNetError as error:
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = ""
            self.updateButtons()
            slicer.util.errorDisplay(str(error), windowTitle="LoGoNet")
            return
        except Exception as error:
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = ""
            self.updateButtons()
            slicer.util.errorDisplay(_("Segmentation could not start: ") + str(error), windowTitle="LoGoNet",
                                     detailedText=__import__("traceback").format_exc())
            return
        self.ui.statusLabel.text = _("Starting the segmentation...")
        self.refreshModelsIfDownloaded()
        self.updateButtons()

    def refreshModelsIfDownloaded(self):
        entry = self.currentModel()
        if entry is not None and not entry.downloaded and self.task is not None and self.task.model.downloaded:
            self.refreshModels()

    def onCompleted(self, task):
        self.ui.progressBar.hide()
        if task.state == "succeeded":
            self.ui.outputSegmentationSelector.setCurrentNode(task.segmentation)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s").format(seconds=task.elapsed_s)
            self.showVolumes(task.volumes_ml)
        elif task.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
        else:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Segmentation failed: ") + str(task.error_message), windowTitle="LoGoNet",
                                     detailedText=self.ui.logTextEdit.toPlainText())
        self.updateButtons()

    def showVolumes(self, volumes):
        import qt

        self.ui.volumesTable.setRowCount(len(volumes))
        for row, (name, _value, ml) in enumerate(volumes):
            self.ui.volumesTable.setItem(row, 0, qt.QTableWidgetItem(name))
            self.ui.volumesTable.setItem(row, 1, qt.QTableWidgetItem(f"{ml:.1f}"))

    # ----------------------------------------------------------------------------------------- results
    def onExportLabelmap(self):
        import qt

        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Export labelmap"), f"{segmentation.GetName()}.nii.gz",
                                              "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            self.logic.export_labelmap(segmentation, volume, path)
            self.addLog(_("Labelmap written with the model's label values: ") + path)

    def onExportDicomSeg(self):
        """DICOM SEG through Slicer's DICOM export dialog (``slicer.qSlicerDICOMExportDialog``)."""
        try:
            export_dicom_seg(self.ui.outputSegmentationSelector.currentNode(),
                             self.ui.inputVolumeSelector.currentNode())
        except DicomSegError as error:
            slicer.util.errorDisplay(str(error), windowTitle="LoGoNet")

    def onEditInSegmentEditor(self):
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)  # Slicer >= 5.2 (this extension needs 5.8)


# ----------------------------------------------------------------------------------------------------- logic
class LoGoNetSegmentLogic(ScriptedLoadableModuleLogic, SegmentLogic):
    """``process(inputVolume, outputSegmentation=None, model="demo", device="auto", fast=False, roiNode=None,
    waitForCompletion=True, ...)``: see LoGoNetLib.segmentlogic.SegmentLogic."""

    def __init__(self, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
        kwargs.setdefault("catalog", ModelCatalog())
        kwargs.setdefault("installer", DependencyInstaller())
        SegmentLogic.__init__(self, **kwargs)


# ----------------------------------------------------------------------------------------------------- tests
class LoGoNetSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer without GPU or download: the fake worker stands in for the model, unless
    ``LOGONET_SELFTEST_FULL=1`` asks for the bundled demo model (needs torch)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_and_export()

    def test_segment_and_export(self):
        import tempfile

        import numpy as np
        import vtk

        from LoGoNetLib import scene as sc
        from LoGoNetLib.install import NoInstall

        self.delayDisplay("Segmenting a synthetic volume")
        array = np.zeros((24, 32, 32), dtype=np.int16)
        array[6:18, 8:24, 8:24] = 200
        matrix = vtk.vtkMatrix4x4()
        for axis, spacing in enumerate((-1.5, -1.5, 2.0)):
            matrix.SetElement(axis, axis, spacing)
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name="LoGoNetSelfTestCT")
        full = os.environ.get("LOGONET_SELFTEST_FULL") == "1"
        fake = os.path.join(_here, "Testing", "Python", "fake_logonet.py")
        logic = LoGoNetSegmentLogic(installer=NoInstall() if not full else DependencyInstaller(),
                                    command_prefix=None if full else [sys.executable, fake])
        entry = logic.catalog.find("demo") if full or logic.catalog.bundled() else None
        if entry is None:
            self.delayDisplay("No bundled demo model: skipped")
            return
        task = logic.process(volume, model=entry, device="cpu", fast=True, waitForCompletion=True)
        self.assertEqual(task.state, "succeeded")
        segmentation = task.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(entry.labels))
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), entry.labels[0]["name"])
        with tempfile.TemporaryDirectory() as folder:
            path = sc.export_labelmap_file(task.segmentation, volume, os.path.join(folder, "labels.nrrd"))
            exported = slicer.util.arrayFromVolume(sc.read_labelmap(path))
        self.assertTrue(set(np.unique(exported)) <= {0} | {label["value"] for label in entry.labels})
        self.delayDisplay("Test passed")
