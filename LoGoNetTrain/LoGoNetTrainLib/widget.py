"""LoGoNetTrain's panel: turns the settings and clicks into :class:`~LoGoNetTrainLib.logic.TrainLogic` calls
and the run's callbacks into the epoch bar, the Dice bar and the messages. It computes nothing itself.

``TrainWidget(logic)``: the module file passes its logic; a test passes a fake one.
"""
from __future__ import annotations

import os
from pathlib import Path

import slicer
from slicer.i18n import tr as _

from LoGoNetLib.errors import LoGoNetError
from LoGoNetLib.gui import DEVICE_CHOICES, ModuleWidget, busy_cursor
from LoGoNetLib.parameters import train_parameters

from .logic import FINETUNE, FINETUNE_FROM_PRETRAINED, PRESETS, PRETRAIN, TrainSettings, count_cases

UI_FILE = Path(__file__).resolve().parent.parent / "Resources" / "UI" / "LoGoNetTrain.ui"
SETTINGS = "LoGoNet/Train/"
MODE_CHOICES = ((FINETUNE, "Fine-tune (labeled data)"),
                (FINETUNE_FROM_PRETRAINED, "Fine-tune from a pre-trained model"),
                (PRETRAIN, "Self-supervised pre-training (unlabeled data)"))


class TrainWidget(ModuleWidget):
    """The Train panel over a training logic (``problems``, ``start``, ``stop``, ``stopped_message``,
    ``add_to_training_set``, ``installing``)."""

    #: (widget name, signal, parameter name) of every setting that Start depends on: each change re-validates.
    SETTING_SIGNALS = (("modeSelector", "currentIndexChanged(int)", "Mode"),
                       ("presetSelector", "currentIndexChanged(int)", "Preset"),
                       ("epochsSpinBox", "valueChanged(int)", "Epochs"),
                       ("roiSpinBox", "valueChanged(int)", "CropSize"),
                       ("learningRateSpinBox", "valueChanged(double)", "LearningRate"),
                       ("deviceSelector", "currentIndexChanged(int)", "Device"),
                       ("modelNameLineEdit", "textChanged(QString)", "ModelName"),
                       ("resumeCheckBox", "toggled(bool)", "Resume"))
    #: Folder fields, kept per user in QSettings (the other settings are per scene).
    PATHS = (("labeledDataPathLineEdit", "Labeled"), ("unlabeledDataPathLineEdit", "Unlabeled"),
             ("outputPathLineEdit", "Output"), ("initModelPathLineEdit", "Init"),
             ("trainingSetPathLineEdit", "TrainingSet"))
    CONNECTIONS = (tuple((name, signal, "onInputsChanged") for name, signal, _param in SETTING_SIGNALS)
                   + tuple((name, "currentPathChanged(QString)", "onInputsChanged") for name, _key in PATHS)
                   + (("trainingVolumeSelector", "currentNodeChanged(vtkMRMLNode*)", "onInputsChanged"),
                      ("trainingSegmentationSelector", "currentNodeChanged(vtkMRMLNode*)", "onInputsChanged"),
                      ("startButton", "clicked(bool)", "onStartButton"),
                      ("showChartButton", "clicked()", "onShowChart"),
                      ("addToTrainingSetButton", "clicked()", "onAddToTrainingSet")))

    def __init__(self, logic=None) -> None:
        if logic is None:
            from .logic import TrainLogic

            logic = TrainLogic()
        super().__init__(logic, UI_FILE, train_parameters)

    def setupPanel(self) -> None:
        import qt

        ui = self.ui
        for key, text in MODE_CHOICES:
            ui.modeSelector.addItem(text, key)
        for preset in PRESETS:
            ui.presetSelector.addItem(preset)
        for key, text in DEVICE_CHOICES:
            ui.deviceSelector.addItem(text, key)
        settings = qt.QSettings()
        for name, key in self.PATHS:
            getattr(ui, name).currentPath = settings.value(SETTINGS + key, "")
        ui.progressBar.hide()
        self.showMetrics(False)  # no "Best Dice 0%" and no "Show chart" before a run has a first epoch

    def cleanup(self) -> None:
        super().cleanup()
        if self.task is not None and self.task.running:
            self.logic.stop()  # the trainer checkpoints; Slicer does not wait for it

    # ----------------------------------------------------------------------------------------- parameter node
    def updateGUIFromParameterNode(self) -> None:
        ui, params = self.ui, self.params
        self._updatingGui = True
        try:
            ui.modeSelector.setCurrentIndex(max(0, ui.modeSelector.findData(params.get("Mode"))))
            ui.presetSelector.setCurrentIndex(max(0, ui.presetSelector.findText(params.get("Preset"))))
            ui.epochsSpinBox.value = int(float(params.get("Epochs")))
            ui.roiSpinBox.value = int(float(params.get("CropSize")))
            ui.learningRateSpinBox.value = float(params.get("LearningRate"))
            ui.deviceSelector.setCurrentIndex(max(0, ui.deviceSelector.findData(params.get("Device"))))
            ui.modelNameLineEdit.text = params.get("ModelName")
            ui.resumeCheckBox.checked = params.get_bool("Resume")
            for role, selector in (("TrainingVolume", ui.trainingVolumeSelector),
                                   ("TrainingSegmentation", ui.trainingSegmentationSelector)):
                if params.node_ref(role) is not None:
                    selector.setCurrentNode(params.node_ref(role))
        finally:
            self._updatingGui = False
        self.onInputsChanged()

    def updateParameterNodeFromGUI(self) -> None:
        if self.params is None or self._updatingGui:
            return
        settings = self.settingsFromGui()
        for param, value in (("Mode", settings.mode), ("Preset", settings.preset), ("Epochs", settings.epochs),
                             ("CropSize", settings.roi[0]), ("LearningRate", settings.lr), ("Device", settings.device),
                             ("ModelName", settings.name or ""), ("Resume", bool(settings.resume))):
            self.params.set(param, value)
        self.params.set_node_ref("TrainingVolume", self.ui.trainingVolumeSelector.currentNode())
        self.params.set_node_ref("TrainingSegmentation", self.ui.trainingSegmentationSelector.currentNode())

    # ----------------------------------------------------------------------------------------- state
    def settingsFromGui(self) -> TrainSettings:
        ui = self.ui
        mode = ui.modeSelector.currentData
        roi = int(ui.roiSpinBox.value)
        data = ui.unlabeledDataPathLineEdit if mode == PRETRAIN else ui.labeledDataPathLineEdit
        return TrainSettings(
            mode=mode, data_dir=data.currentPath,
            out_dir=ui.outputPathLineEdit.currentPath, preset=ui.presetSelector.currentText,
            epochs=int(ui.epochsSpinBox.value), roi=(roi, roi, roi), lr=float(ui.learningRateSpinBox.value),
            device=ui.deviceSelector.currentData,
            init_model=ui.initModelPathLineEdit.currentPath if mode == FINETUNE_FROM_PRETRAINED else None,
            resume=ui.resumeCheckBox.checked, name=ui.modelNameLineEdit.text or None)

    def onInputsChanged(self, *_args) -> None:
        import qt

        if self._updatingGui:
            return
        ui = self.ui
        mode = ui.modeSelector.currentData
        ui.labeledDataPathLineEdit.enabled = mode != PRETRAIN
        ui.unlabeledDataPathLineEdit.enabled = mode == PRETRAIN
        ui.initModelPathLineEdit.enabled = mode == FINETUNE_FROM_PRETRAINED
        settings = qt.QSettings()
        for name, key in self.PATHS:
            settings.setValue(SETTINGS + key, getattr(ui, name).currentPath)
        ui.dataSummaryLabel.text = self.dataSummary(self.settingsFromGui().data_dir)
        self.updateParameterNodeFromGUI()
        self.updateButtons()

    @staticmethod
    def dataSummary(data: str) -> str:
        if not data or not os.path.isdir(data):
            return ""
        try:
            images, labels = count_cases(data)
        except LoGoNetError as error:  # Start's tooltip says it too
            return str(error)
        return _("{images} images, {labels} label maps found").format(images=images, labels=labels)

    def updateButtons(self) -> None:
        ui = self.ui
        running = self.task is not None and self.task.running
        if running:
            ui.startButton.text, ui.startButton.enabled = _("Stop"), True
            ui.startButton.toolTip = _("Save a checkpoint and stop; tick Resume to continue later")
        else:
            problems = self.logic.problems(self.settingsFromGui())
            if self.logic.installing:
                problems.insert(0, _("the Python packages are being installed"))
            ui.startButton.text = _("Start")
            ui.startButton.enabled = not problems
            ui.startButton.toolTip = _("Start training") if not problems else "\n".join(problems)
        ui.dataCollapsibleButton.enabled = not running
        ui.settingsCollapsibleButton.enabled = not running

    def showMetrics(self, visible: bool) -> None:
        for widget in (self.ui.diceLabel, self.ui.diceProgressBar, self.ui.showChartButton):
            widget.visible = visible

    # ----------------------------------------------------------------------------------------- run
    def onProgress(self, task) -> None:
        ui = self.ui
        ui.progressBar.maximum = max(1, task.total_epochs)
        ui.progressBar.value = task.epoch
        last = task.history[-1] if task.history else {}
        parts = [_("epoch {epoch}/{total}").format(epoch=task.epoch, total=task.total_epochs)]
        if isinstance(last.get("loss"), (int, float)):
            parts.append(_("loss {loss:.4f}").format(loss=last["loss"]))
        if task.best_dice is not None:
            parts.append(_("best validation Dice {dice:.3f}").format(dice=task.best_dice))
            ui.diceProgressBar.value = int(round(task.best_dice * 100))
        if task.history:
            self.showMetrics(True)
        ui.metricsLabel.text = "  ·  ".join(parts)

    def onStartButton(self, *_args) -> None:
        ui = self.ui
        if self.task is not None and self.task.running:
            if self.ask(_("Stop training? A checkpoint is saved first; tick 'Resume' to continue later.")):
                ui.metricsLabel.text = _("Stopping (saving a checkpoint)...")
                self.logic.stop()
            return
        if self.logic.installing:
            return
        ui.logTextEdit.clear()
        ui.progressBar.value = 0
        ui.diceProgressBar.value = 0
        self.showMetrics(False)
        ui.startButton.enabled = False  # no second click while the packages are installed
        ui.metricsLabel.text = _("Checking the Python packages...")
        task = None
        with self.errors(_("Training could not start")):
            task = self.logic.start(self.settingsFromGui(), waitForCompletion=False, logCallback=self.addLog,
                                    progressCallback=self.onProgress, completedCallback=self.onCompleted)
        if task is None:
            ui.metricsLabel.text = ""
        else:
            self.task = task
            if task.running:
                ui.progressBar.show()
                ui.metricsLabel.text = _("Starting...")
        self.updateButtons()

    def onCompleted(self, task) -> None:
        self.task = task
        ui = self.ui
        ui.progressBar.hide()
        if task.state == "succeeded":
            ui.metricsLabel.text += "  ·  " + _("finished")
        elif task.state == "stopped":
            ui.resumeCheckBox.checked = bool(task.checkpoint)
            ui.metricsLabel.text = self.logic.stopped_message(task)
        else:
            reason = task.error_message or _("the worker ended without a message (see the log)")
            ui.metricsLabel.text = _("Failed.")
            self.showError(_("Training failed: ") + str(reason), ui.logTextEdit.toPlainText())
        self.updateButtons()

    def onShowChart(self) -> None:
        if self.task is None or self.task.chart is None:
            slicer.util.infoDisplay(_("The chart appears after the first epoch."))
            return
        with self.errors(_("The chart could not be shown")):
            slicer.modules.plots.logic().ShowChartInLayout(self.task.chart.chart)

    def onAddToTrainingSet(self) -> None:
        ui = self.ui
        with self.errors(_("Could not add the case to the training set")), busy_cursor():
            result = self.logic.add_to_training_set(ui.trainingVolumeSelector.currentNode(),
                                                    ui.trainingSegmentationSelector.currentNode(),
                                                    ui.trainingSetPathLineEdit.currentPath)
            ui.trainingSetStatusLabel.text = _("Added case {case}").format(case=result["case_id"])
            self.addLog(_("Added {image} and {label}").format(image=result["image"], label=result["label"]))


__all__ = ["TrainWidget", "UI_FILE", "MODE_CHOICES"]
