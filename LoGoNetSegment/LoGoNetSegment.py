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

from LoGoNetLib.catalog import ModelCatalog  # noqa: E402
from LoGoNetLib.install import DependencyInstaller  # noqa: E402
from LoGoNetLib.segmentlogic import LoGoNetError, SegmentLogic  # noqa: E402

SETTINGS = "LoGoNet/"
DEVICE_CHOICES = (("auto", "Auto (GPU if available)"), ("gpu", "GPU"), ("cpu", "CPU"))


# ----------------------------------------------------------------------------------------------------- module
class LoGoNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LoGoNet Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LoGoNet for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Segment 13 abdominal organs (BTCV labels) in a CT with a LoGoNet model: the bundled demo model, "
            "a model trained with LoGoNetTrain, or any LoGoNet model folder. The model runs in a separate "
            "process; Apply becomes Cancel while it runs.")
        self.parent.acknowledgementText = _(
            "LoGoNet: local and global 3-D segmentation with masked self-supervised pre-training. "
            "The demo model is for demonstration only, not for clinical use.")


# ----------------------------------------------------------------------------------------------------- widget
class LoGoNetSegmentWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.task = None
        self._updating = False

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/LoGoNetSegment.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = LoGoNetSegmentLogic()
        self.logic.ask = lambda question: slicer.util.confirmOkCancelDisplay(question, windowTitle="LoGoNet")

        for key, text in DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(text, key)
        settings = qt.QSettings()
        index = self.ui.deviceSelector.findData(settings.value(SETTINGS + "Device", "auto"))
        self.ui.deviceSelector.setCurrentIndex(max(0, index))
        self.ui.fastCheckBox.checked = settings.value(SETTINGS + "Fast", "false") == "true"
        self.ui.volumesTable.setHorizontalHeaderLabels([_("Segment"), _("Volume (mL)")])
        self.ui.volumesTable.horizontalHeader().setStretchLastSection(True)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.browseModelButton.connect("clicked()", self.onBrowseModel)
        self.ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.ui.openModelsFolderButton.connect("clicked()", self.onOpenModelsFolder)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.fastCheckBox.connect("toggled(bool)", self.onSettingsChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportLabelmapButton.connect("clicked()", self.onExportLabelmap)
        self.ui.exportDicomSegButton.connect("clicked()", self.onExportDicomSeg)
        self.ui.editInSegmentEditorButton.connect("clicked()", self.onEditInSegmentEditor)
        self.ui.progressBar.hide()
        self.refreshModels()
        if not self.ui.inputVolumeSelector.currentNode():
            self.ui.inputVolumeSelector.setCurrentNode(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode"))
        self.updateButtons()

    def cleanup(self):
        if self.task is not None and self.task.running:
            self.task.cancel()

    # ----------------------------------------------------------------------------------------- state
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
        for widget in (self.ui.inputVolumeSelector, self.ui.modelSelector, self.ui.browseModelButton,
                       self.ui.deviceSelector, self.ui.fastCheckBox, self.ui.roiSelector,
                       self.ui.outputSegmentationSelector):
            widget.enabled = not running

    def onSettingsChanged(self, *_args):
        import qt

        settings = qt.QSettings()
        settings.setValue(SETTINGS + "Device", self.ui.deviceSelector.currentData)
        settings.setValue(SETTINGS + "Fast", "true" if self.ui.fastCheckBox.checked else "false")

    def onOutputChanged(self, node):
        self.ui.segmentationShow3DButton.setSegmentationNode(node)
        self.updateButtons()

    # ----------------------------------------------------------------------------------------- models
    def refreshModels(self):
        import qt

        current = self.ui.modelSelector.currentData
        wanted = current or qt.QSettings().value(SETTINGS + "Model", "demo")
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        self.models = self.logic.catalog.models()
        for index, entry in enumerate(self.models):
            title = entry.title if entry.usable else f"{entry.title} (unusable)"
            self.ui.modelSelector.addItem(title, entry.id)
            self.ui.modelSelector.setItemData(index, entry.tooltip(), qt.Qt.ToolTipRole)
        self.ui.modelSelector.setCurrentIndex(max(0, self.ui.modelSelector.findData(wanted)))
        self.ui.modelSelector.blockSignals(False)
        self.onModelChanged()

    def currentModel(self):
        index = self.ui.modelSelector.currentIndex
        models = getattr(self, "models", [])
        return models[index] if 0 <= index < len(models) else None

    def onModelChanged(self, *_args):
        import qt

        entry = self.currentModel()
        if entry is None:
            self.ui.modelInfoLabel.text = _("No model: add a model folder")
        elif entry.error:
            self.ui.modelInfoLabel.text = _("Cannot use this model: ") + entry.error
        else:
            names = ", ".join(label["name"] for label in entry.labels)
            self.ui.modelInfoLabel.text = f"{len(entry.labels)} " + _("segments: ") + names
            qt.QSettings().setValue(SETTINGS + "Model", entry.id)
        self.ui.modelInfoLabel.toolTip = entry.tooltip() if entry else ""
        self.updateButtons()

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
        with slicer.util.tryWithErrorDisplay(_("Installing LoGoNet's Python packages failed."), waitCursor=True):
            installer = DependencyInstaller()
            missing = installer.missing()
            if not missing:
                self.addLog(_("All required Python packages are installed."))
                return
            result = installer.ensure(ask=self.logic.ask, log=self.addLog)
            for problem in result.problems:
                self.addLog(problem)
            if result.restart_needed and slicer.util.confirmYesNoDisplay(
                    _("Packages were updated. Restart Slicer now?")):
                slicer.util.restart()

    # ----------------------------------------------------------------------------------------- run
    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)
        slicer.app.processEvents()

    def onProgress(self, fraction, text):
        self.ui.progressBar.value = int(round(fraction * 100))
        self.ui.statusLabel.text = text

    def onApplyButton(self):
        if self.task is not None and self.task.running:
            self.ui.statusLabel.text = _("Cancelling...")
            self.task.cancel()
            return
        self.ui.logTextEdit.clear()
        self.ui.volumesTable.setRowCount(0)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
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
            slicer.util.errorDisplay(str(error), windowTitle="LoGoNet")
            return
        except Exception as error:
            self.ui.progressBar.hide()
            slicer.util.errorDisplay(_("Segmentation could not start: ") + str(error), windowTitle="LoGoNet",
                                     detailedText=__import__("traceback").format_exc())
            return
        self.ui.statusLabel.text = _("Segmenting...")
        self.updateButtons()

    def onCompleted(self, task):
        self.ui.progressBar.hide()
        if task.state == "succeeded":
            self.ui.outputSegmentationSelector.setCurrentNode(task.segmentation)
            self.ui.segmentationShow3DButton.setSegmentationNode(task.segmentation)
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
        """DICOM SEG through Slicer's own exporter (core from 5.12, QuantitativeReporting before)."""
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        if not volume.GetAttribute("DICOM.instanceUIDs"):
            slicer.util.errorDisplay(_("DICOM SEG needs a CT loaded from DICOM. Use 'Export labelmap' instead, "
                                       "or load the CT through the DICOM module."), windowTitle="LoGoNet")
            return
        if not hasattr(slicer.modules, "dicom"):
            slicer.util.errorDisplay(_("This Slicer has no DICOM module."), windowTitle="LoGoNet")
            return
        try:
            import DICOMSegmentationPlugin  # noqa: F401
        except ImportError:
            slicer.util.errorDisplay(_("This Slicer has no DICOM SEG exporter: install QuantitativeReporting "
                                       "(Slicer < 5.12)."), windowTitle="LoGoNet")
            return
        from DICOMLib import DICOMExportDialog

        dialog = DICOMExportDialog(sh.GetItemByDataNode(segmentation))
        dialog.execDialog()

    def onEditInSegmentEditor(self):
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:  # pragma: no cover - Slicer < 5.2
            editor.setMasterVolumeNode(volume)


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
