"""LoGoNetSegment's panel: turns clicks into :class:`~LoGoNetSegmentLib.logic.SegmentLogic` calls and the
logic's callbacks (log lines, progress, completion) into what the panel shows. It computes nothing itself.

``SegmentWidget(logic)``: the module file passes its logic; a test passes a fake one.
"""
from __future__ import annotations

from pathlib import Path

import slicer
from slicer.i18n import tr as _

from LoGoNetLib.catalog import ModelCatalog
from LoGoNetLib.errors import LOG
from LoGoNetLib.gui import DEVICE_CHOICES, ModuleWidget, ask_without_busy_cursor, busy_cursor, organ_summary
from LoGoNetLib.parameters import segment_parameters

from .dicomseg import export_dicom_seg

UI_FILE = Path(__file__).resolve().parent.parent / "Resources" / "UI" / "LoGoNetSegment.ui"


def demo_organs(catalog=None) -> str:
    """'12 abdominal organs' from the bundled demo model's card (never a number typed into the help text)."""
    try:
        demo = next((entry for entry in (catalog or ModelCatalog()).bundled() if entry.id == "demo" and entry.usable),
                    None)
    except Exception:  # a broken installation must not stop the module from loading
        LOG.warning("the bundled demo model could not be read", exc_info=True)
        demo = None
    return f"{len(demo.labels)} abdominal organs" if demo is not None else "abdominal organs"


class SegmentWidget(ModuleWidget):
    """The Segment panel over a segmentation logic (``process``, ``load_sample_ct``, ``export_labelmap``,
    ``catalog``, ``installing``)."""

    CONNECTIONS = (
        ("inputVolumeSelector", "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI"),
        ("roiSelector", "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI"),
        ("modelSelector", "currentIndexChanged(int)", "onModelChanged"),
        ("deviceSelector", "currentIndexChanged(int)", "updateParameterNodeFromGUI"),
        ("fastCheckBox", "toggled(bool)", "updateParameterNodeFromGUI"),
        ("outputSegmentationSelector", "currentNodeChanged(vtkMRMLNode*)", "onOutputChanged"),
        ("sampleDataButton", "clicked()", "onLoadSampleCT"),
        ("browseModelButton", "clicked()", "onBrowseModel"),
        ("refreshModelsButton", "clicked()", "refreshModels"),
        ("openModelsFolderButton", "clicked()", "onOpenModelsFolder"),
        ("installDependenciesButton", "clicked()", "onInstallDependencies"),
        ("applyButton", "clicked(bool)", "onApplyButton"),
        ("exportLabelmapButton", "clicked()", "onExportLabelmap"),
        ("exportDicomSegButton", "clicked()", "onExportDicomSeg"),
        ("editInSegmentEditorButton", "clicked()", "onEditInSegmentEditor"),
    )

    def __init__(self, logic=None) -> None:
        if logic is None:
            from .logic import SegmentLogic

            logic = SegmentLogic()
        super().__init__(logic, UI_FILE, segment_parameters)
        self.sampleTask = None
        self.models = []
        self.segmentsTable = None

    def setupPanel(self) -> None:
        import qt

        ui = self.ui
        for key, text in DEVICE_CHOICES:
            ui.deviceSelector.addItem(text, key)
        ui.modelSelector.view().setTextElideMode(qt.Qt.ElideMiddle)
        ui.volumesTable.setHorizontalHeaderLabels([_("Organ"), _("Volume (mL)")])
        ui.volumesTable.horizontalHeader().setStretchLastSection(True)
        # Visibility and colour per segment, as in the Segmentations module (created here, not in the .ui, so
        # that the .ui stays loadable by Qt Designer and by the panel renderer without Slicer's plugins).
        self.segmentsTable = slicer.qMRMLSegmentsTableView()
        self.segmentsTable.setMRMLScene(slicer.mrmlScene)
        self.segmentsTable.setSelectionMode(qt.QAbstractItemView.ExtendedSelection)
        self.segmentsTable.setOpacityColumnVisible(False)
        ui.segmentsTableContainer.layout().addWidget(self.segmentsTable)

        ui.progressBar.hide()
        self.refreshModels()

    def cleanup(self) -> None:
        super().cleanup()
        self.logic.cleanup()  # kills a running worker and deletes the temporary CT copy

    # ----------------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        params = segment_parameters(slicer.mrmlScene)
        if params.node_ref("InputVolume") is None:
            params.set_node_ref("InputVolume", slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode"))
        super().initializeParameterNode()

    def updateGUIFromParameterNode(self) -> None:
        if self.params is None or self._updatingGui:
            return
        ui = self.ui
        self._updatingGui = True
        try:
            ui.inputVolumeSelector.setCurrentNode(self.params.node_ref("InputVolume"))
            ui.outputSegmentationSelector.setCurrentNode(self.params.node_ref("OutputSegmentation"))
            ui.roiSelector.setCurrentNode(self.params.node_ref("ROI"))
            index = ui.modelSelector.findData(self.params.get("Model"))
            if index >= 0:
                ui.modelSelector.setCurrentIndex(index)
            ui.deviceSelector.setCurrentIndex(max(0, ui.deviceSelector.findData(self.params.get("Device"))))
            ui.fastCheckBox.checked = self.params.get_bool("Fast")
        finally:
            self._updatingGui = False
        self.onModelChanged()
        self.onOutputChanged(ui.outputSegmentationSelector.currentNode())

    def updateParameterNodeFromGUI(self, *_args) -> None:
        ui = self.ui
        if self.params is not None and not self._updatingGui:
            self.params.set_node_ref("InputVolume", ui.inputVolumeSelector.currentNode())
            self.params.set_node_ref("OutputSegmentation", ui.outputSegmentationSelector.currentNode())
            self.params.set_node_ref("ROI", ui.roiSelector.currentNode())
            entry = self.currentModel()
            if entry is not None:
                self.params.set("Model", entry.id)
            self.params.set("Device", ui.deviceSelector.currentData or "auto")
            self.params.set("Fast", bool(ui.fastCheckBox.checked))
        self.updateButtons()

    # ----------------------------------------------------------------------------------------- state
    def busy(self) -> bool:
        return ((self.task is not None and self.task.running) or self.logic.installing
                or (self.sampleTask is not None and self.sampleTask.running))

    def updateButtons(self, *_args) -> None:
        ui = self.ui
        running = self.task is not None and self.task.running
        entry = self.currentModel()
        if running:
            ui.applyButton.text, ui.applyButton.enabled = _("Cancel"), True
            ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene")
        else:
            ui.applyButton.text = _("Apply")
            reasons = []
            if self.logic.installing:
                reasons.append(_("the Python packages are being installed"))
            if self.sampleTask is not None and self.sampleTask.running:
                reasons.append(_("the sample CT is loading"))
            if ui.inputVolumeSelector.currentNode() is None:
                reasons.append(_("select an input volume"))
            if entry is None or not entry.usable:
                reasons.append(_("select a usable model"))
            ui.applyButton.enabled = not reasons
            ui.applyButton.toolTip = (_("Segment the input volume") if not reasons
                                      else _("Cannot apply: ") + "; ".join(reasons))
        segmentation = ui.outputSegmentationSelector.currentNode()
        has_result = segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        for button in (ui.exportLabelmapButton, ui.exportDicomSegButton, ui.editInSegmentEditorButton):
            button.enabled = has_result and not running
        busy = self.busy()
        for widget in (ui.inputVolumeSelector, ui.modelSelector, ui.browseModelButton, ui.deviceSelector,
                       ui.fastCheckBox, ui.roiSelector, ui.outputSegmentationSelector, ui.installDependenciesButton,
                       ui.sampleDataButton, ui.refreshModelsButton):
            widget.enabled = not busy

    def onOutputChanged(self, node) -> None:
        self.ui.segmentationShow3DButton.setSegmentationNode(node)
        self.segmentsTable.setSegmentationNode(node)
        self.updateParameterNodeFromGUI()

    # ----------------------------------------------------------------------------------------- models
    def refreshModels(self) -> None:
        import qt

        selector = self.ui.modelSelector
        wanted = selector.currentData or (self.params.get("Model") if self.params is not None else "demo")
        selector.blockSignals(True)
        selector.clear()
        self.models = self.logic.catalog.models()
        for index, entry in enumerate(self.models):
            title = entry.title if entry.usable else f"{entry.title} (unusable)"
            selector.addItem(title, entry.id)
            selector.setItemData(index, f"{title}\n{entry.tooltip()}", qt.Qt.ToolTipRole)
        selector.setCurrentIndex(max(0, selector.findData(wanted)))
        selector.blockSignals(False)
        self.onModelChanged()

    def currentModel(self):
        index = self.ui.modelSelector.currentIndex
        return self.models[index] if 0 <= index < len(self.models) else None

    def onModelChanged(self, *_args) -> None:
        entry = self.currentModel()
        if entry is None:
            text = _("No model: add a model folder (Advanced)")
        elif entry.error:
            text = _("Cannot use this model: ") + entry.error
        elif not entry.downloaded:
            text = _("Downloaded on first Apply (then kept in the models folder)")
        else:
            text = organ_summary(entry)
        self.ui.modelInfoLabel.text = text
        self.ui.modelSelector.toolTip = f"{entry.title}\n{entry.tooltip()}" if entry else ""
        self.ui.modelInfoLabel.toolTip = entry.tooltip() if entry else ""
        self.updateParameterNodeFromGUI()

    def onBrowseModel(self) -> None:
        import qt

        folder = qt.QFileDialog.getExistingDirectory(self.uiWidget, _("Choose a LoGoNet model folder"))
        if not folder:
            return
        with self.errors(_("The model folder could not be added")):
            entry = self.logic.catalog.register(folder)
            self.refreshModels()
            self.ui.modelSelector.setCurrentIndex(self.ui.modelSelector.findData(entry.id))

    def onOpenModelsFolder(self) -> None:
        import qt

        with self.errors(_("The models folder could not be opened")):
            folder = self.logic.catalog.models_dir
            folder.mkdir(parents=True, exist_ok=True)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onInstallDependencies(self) -> None:
        if self.busy():
            return
        installer = self.logic.installer
        if not installer.missing():
            self.addLog(_("All required Python packages are installed."))
        self.logic.installing = True  # Apply, Load sample CT and this button stay disabled meanwhile
        self.updateButtons()
        result = None
        try:
            with self.errors(_("Installing LoGoNet's Python packages failed")):
                # asks first, with the normal cursor; offers the optional engine even after an earlier "no"
                result = installer.ensure(ask=self.ask, log=self.addLog, optional="again")
                for problem in result.problems:
                    self.addLog(problem)
        finally:
            self.logic.installing = False
            self.updateButtons()
        restart = _("Packages were updated. Restart Slicer now?")
        if result is not None and result.restart_needed and self.askYesNo(restart):
            slicer.util.restart()

    def askYesNo(self, question: str) -> bool:
        return ask_without_busy_cursor(question, slicer.util.confirmYesNoDisplay)

    # ----------------------------------------------------------------------------------------- run
    def onProgress(self, fraction: float, text: str) -> None:
        self.ui.progressBar.value = int(round(fraction * 100))
        self.ui.statusLabel.text = text

    def onLoadSampleCT(self) -> None:
        if self.busy():
            return
        self.ui.statusLabel.text = _("Loading the sample CT (downloaded once, about 38 MB)...")
        with self.errors(_("The sample CT could not be loaded")):
            self.sampleTask = self.logic.load_sample_ct(waitForCompletion=False, logCallback=self.addLog,
                                                        completedCallback=self.onSampleLoaded)
        self.updateButtons()

    def onSampleLoaded(self, task) -> None:
        if task.state == "succeeded":
            self.ui.inputVolumeSelector.setCurrentNode(task.volume)
            slicer.util.setSliceViewerLayers(background=task.volume, fit=True)
            self.ui.statusLabel.text = _("Sample CT loaded: press Apply.")
        else:
            self.ui.statusLabel.text = ""
            self.showError(str(task.error_message), self.ui.logTextEdit.toPlainText())
        self.updateButtons()

    def onApplyButton(self, *_args) -> None:
        ui = self.ui
        if self.task is not None and self.task.running:
            ui.statusLabel.text = _("Cancelling...")
            self.task.cancel()
            return
        if self.busy():
            return
        ui.logTextEdit.clear()
        ui.volumesTable.setRowCount(0)
        ui.progressBar.value = 0
        ui.progressBar.show()
        ui.statusLabel.text = _("Checking the Python packages...")
        ui.applyButton.enabled = False  # no second click while packages or the model are installed
        task = None
        with self.errors(_("Segmentation could not start")):
            task = self.logic.process(
                ui.inputVolumeSelector.currentNode(), outputSegmentation=ui.outputSegmentationSelector.currentNode(),
                model=self.currentModel(), device=ui.deviceSelector.currentData, fast=ui.fastCheckBox.checked,
                roiNode=ui.roiSelector.currentNode(), waitForCompletion=False, logCallback=self.addLog,
                progressCallback=self.onProgress, completedCallback=self.onCompleted)
        if task is None:
            ui.progressBar.hide()
            ui.statusLabel.text = ""
        else:
            self.task = task
            if task.running:
                ui.statusLabel.text = _("Starting the segmentation...")
            self.refreshModelsIfDownloaded()
        self.updateButtons()

    def refreshModelsIfDownloaded(self) -> None:
        entry = self.currentModel()
        if entry is not None and not entry.downloaded and self.task is not None and self.task.model.downloaded:
            self.refreshModels()

    def onCompleted(self, task) -> None:
        self.task = task
        self.ui.progressBar.hide()
        if task.state == "succeeded":
            self.ui.outputSegmentationSelector.setCurrentNode(task.segmentation)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s").format(seconds=task.elapsed_s)
            self.showVolumes(task.volumes_ml)
        elif task.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
        else:
            self.ui.statusLabel.text = _("Failed.")
            reason = task.error_message or _("the worker ended without a message (see the log)")
            self.showError(_("Segmentation failed: ") + str(reason), self.ui.logTextEdit.toPlainText())
        self.updateButtons()

    def showVolumes(self, volumes) -> None:
        import qt

        self.ui.volumesTable.setRowCount(len(volumes))
        for row, (name, _value, ml) in enumerate(volumes):
            self.ui.volumesTable.setItem(row, 0, qt.QTableWidgetItem(name))
            self.ui.volumesTable.setItem(row, 1, qt.QTableWidgetItem(f"{ml:.1f}"))

    # ----------------------------------------------------------------------------------------- results
    def onExportLabelmap(self) -> None:
        import qt

        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        path = qt.QFileDialog.getSaveFileName(self.uiWidget, _("Export labelmap"), f"{segmentation.GetName()}.nii.gz",
                                              "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)")
        if not path:
            return
        with self.errors(_("Export failed")), busy_cursor():
            self.logic.export_labelmap(segmentation, volume, path)
            self.addLog(_("Labelmap written with the model's label values: ") + path)

    def onExportDicomSeg(self) -> None:
        """DICOM SEG through Slicer's DICOM export dialog (``slicer.qSlicerDICOMExportDialog``)."""
        with self.errors(_("DICOM SEG export failed")):
            export_dicom_seg(self.ui.outputSegmentationSelector.currentNode(),
                             self.ui.inputVolumeSelector.currentNode())

    def onEditInSegmentEditor(self) -> None:
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        with self.errors(_("The Segment Editor could not be opened")):
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentation)
            editor.setSourceVolumeNode(volume)  # Slicer >= 5.2 (this extension needs 5.8)


__all__ = ["SegmentWidget", "demo_organs", "UI_FILE"]
