"""LoGoNetTrain: self-supervised pre-training and fine-tuning on local folders, and "Add to training set".

Thin module file over LoGoNetLib, which lives in the LoGoNetSegment module folder (one copy for both modules).
Training runs in a separate ``PythonSlicer -m logonet finetune|pretrain`` process; Stop lets it save a
checkpoint first, and a finished model appears in LoGoNetSegment's model list.
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
try:
    import LoGoNetLib  # installed extension: next to this file; developer mode: on the module path
except ImportError:  # a source checkout: LoGoNetLib is in the sibling LoGoNetSegment folder
    sys.path.insert(0, os.path.join(os.path.dirname(_here), "LoGoNetSegment"))
    import LoGoNetLib

from slicer.util import VTKObservationMixin  # noqa: E402

from LoGoNetLib.catalog import ModelCatalog  # noqa: E402
from LoGoNetLib.gui import ask_without_busy_cursor  # noqa: E402
from LoGoNetLib.install import DependencyInstaller  # noqa: E402
from LoGoNetLib.parameters import train_parameters  # noqa: E402
from LoGoNetLib.segmentlogic import LoGoNetError  # noqa: E402
from LoGoNetLib.trainlogic import (FINETUNE, FINETUNE_FROM_PRETRAINED, PRESETS, PRETRAIN, TrainLogic,  # noqa: E402
                                   TrainSettings, count_cases)

SETTINGS = "LoGoNet/Train/"
MODE_CHOICES = ((FINETUNE, "Fine-tune (labeled data)"),
                (FINETUNE_FROM_PRETRAINED, "Fine-tune from a pre-trained model"),
                (PRETRAIN, "Self-supervised pre-training (unlabeled data)"))
DEVICE_CHOICES = (("auto", "Auto (GPU if available)"), ("gpu", "GPU"), ("cpu", "CPU"))


class LoGoNetTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LoGoNet Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LoGoNet for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Pre-train LoGoNet on unlabeled CTs (masked self-supervision) and fine-tune it on labeled ones "
            "(nnU-Net imagesTr/labelsTr, MSD dataset.json, or images/labels folders). Corrected segmentations can "
            "be added to a training folder for the next round. Trained models appear in LoGoNet Segment.")
        self.parent.acknowledgementText = _("LoGoNet for 3D Slicer.")


class LoGoNetTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.task = None
        self.params = None
        self._updatingGui = False

    #: (widget name, signal, parameter name) of every setting that Start depends on: each change re-validates.
    SETTING_SIGNALS = (("modeSelector", "currentIndexChanged(int)", "Mode"),
                       ("presetSelector", "currentIndexChanged(int)", "Preset"),
                       ("epochsSpinBox", "valueChanged(int)", "Epochs"),
                       ("roiSpinBox", "valueChanged(int)", "CropSize"),
                       ("learningRateSpinBox", "valueChanged(double)", "LearningRate"),
                       ("deviceSelector", "currentIndexChanged(int)", "Device"),
                       ("modelNameLineEdit", "textChanged(QString)", "ModelName"),
                       ("resumeCheckBox", "toggled(bool)", "Resume"))
    PATHS = (("labeledDataPathLineEdit", "Labeled"), ("unlabeledDataPathLineEdit", "Unlabeled"),
             ("outputPathLineEdit", "Output"), ("initModelPathLineEdit", "Init"),
             ("trainingSetPathLineEdit", "TrainingSet"))

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/LoGoNetTrain.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = LoGoNetTrainLogic()
        self.logic.ask = lambda question: ask_without_busy_cursor(
            question, lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle="LoGoNet"))

        for key, text in MODE_CHOICES:
            self.ui.modeSelector.addItem(text, key)
        for preset in PRESETS:
            self.ui.presetSelector.addItem(preset)
        for key, text in DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(text, key)
        settings = qt.QSettings()  # folders are per user (QSettings); the other settings are per scene
        for name, key in self.PATHS:
            line_edit = getattr(self.ui, name)
            line_edit.currentPath = settings.value(SETTINGS + key, "")
            line_edit.connect("currentPathChanged(QString)", self.onInputsChanged)
        for name, signal, _param in self.SETTING_SIGNALS:
            getattr(self.ui, name).connect(signal, self.onInputsChanged)
        self.ui.trainingVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.trainingSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.showChartButton.connect("clicked()", self.onShowChart)
        self.ui.addToTrainingSetButton.connect("clicked()", self.onAddToTrainingSet)
        self.ui.progressBar.hide()
        self.showMetrics(False)  # no "Best Dice 0%" and no "Show chart" before a run has a first epoch

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.task is not None and self.task.running:
            self.logic.stop()  # the trainer checkpoints; Slicer does not wait for it

    def enter(self):
        self.initializeParameterNode()

    def onReload(self):
        """Developer mode: reload LoGoNetLib's submodules first, then this module file."""
        LoGoNetLib.reload_submodules()
        ScriptedLoadableModuleWidget.onReload(self)

    # ----------------------------------------------------------------------------------------- parameter node
    def onSceneStartClose(self, caller, event):
        self.params = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.params = train_parameters(slicer.mrmlScene)
        self._updatingGui = True
        try:
            self.ui.modeSelector.setCurrentIndex(max(0, self.ui.modeSelector.findData(self.params.get("Mode"))))
            self.ui.presetSelector.setCurrentIndex(max(0, self.ui.presetSelector.findText(self.params.get("Preset"))))
            self.ui.epochsSpinBox.value = int(float(self.params.get("Epochs")))
            self.ui.roiSpinBox.value = int(float(self.params.get("CropSize")))
            self.ui.learningRateSpinBox.value = float(self.params.get("LearningRate"))
            self.ui.deviceSelector.setCurrentIndex(max(0, self.ui.deviceSelector.findData(self.params.get("Device"))))
            self.ui.modelNameLineEdit.text = self.params.get("ModelName")
            self.ui.resumeCheckBox.checked = self.params.get_bool("Resume")
            if self.params.node_ref("TrainingVolume") is not None:
                self.ui.trainingVolumeSelector.setCurrentNode(self.params.node_ref("TrainingVolume"))
            if self.params.node_ref("TrainingSegmentation") is not None:
                self.ui.trainingSegmentationSelector.setCurrentNode(self.params.node_ref("TrainingSegmentation"))
        finally:
            self._updatingGui = False
        self.onInputsChanged()

    def updateParameterNodeFromGUI(self):
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
        mode = self.ui.modeSelector.currentData
        roi = int(self.ui.roiSpinBox.value)
        return TrainSettings(
            mode=mode,
            data_dir=(self.ui.unlabeledDataPathLineEdit if mode == PRETRAIN else self.ui.labeledDataPathLineEdit).currentPath,
            out_dir=self.ui.outputPathLineEdit.currentPath, preset=self.ui.presetSelector.currentText,
            epochs=int(self.ui.epochsSpinBox.value), roi=(roi, roi, roi), lr=float(self.ui.learningRateSpinBox.value),
            device=self.ui.deviceSelector.currentData,
            init_model=self.ui.initModelPathLineEdit.currentPath if mode == FINETUNE_FROM_PRETRAINED else None,
            resume=self.ui.resumeCheckBox.checked, name=self.ui.modelNameLineEdit.text or None)

    def onInputsChanged(self, *_args):
        import qt

        if self._updatingGui:
            return
        mode = self.ui.modeSelector.currentData
        self.ui.labeledDataPathLineEdit.enabled = mode != PRETRAIN
        self.ui.unlabeledDataPathLineEdit.enabled = mode == PRETRAIN
        self.ui.initModelPathLineEdit.enabled = mode == FINETUNE_FROM_PRETRAINED
        settings = qt.QSettings()
        for name, key in self.PATHS:
            settings.setValue(SETTINGS + key, getattr(self.ui, name).currentPath)
        data = self.settingsFromGui().data_dir
        if data and os.path.isdir(data):
            images, labels = count_cases(data)
            self.ui.dataSummaryLabel.text = _("{images} images, {labels} label maps found").format(
                images=images, labels=labels)
        else:
            self.ui.dataSummaryLabel.text = ""
        self.updateParameterNodeFromGUI()
        self.updateButtons()

    def updateButtons(self):
        running = self.task is not None and self.task.running
        if running:
            self.ui.startButton.text, self.ui.startButton.enabled = _("Stop"), True
            self.ui.startButton.toolTip = _("Save a checkpoint and stop; tick Resume to continue later")
        else:
            problems = self.logic.problems(self.settingsFromGui())
            if self.logic.installing:
                problems.insert(0, _("the Python packages are being installed"))
            self.ui.startButton.text = _("Start")
            self.ui.startButton.enabled = not problems
            self.ui.startButton.toolTip = _("Start training") if not problems else "\n".join(problems)
        self.ui.dataCollapsibleButton.enabled = not running
        self.ui.settingsCollapsibleButton.enabled = not running

    def showMetrics(self, visible):
        for widget in (self.ui.diceLabel, self.ui.diceProgressBar, self.ui.showChartButton):
            widget.visible = visible

    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def onProgress(self, task):
        self.ui.progressBar.maximum = max(1, task.total_epochs)
        self.ui.progressBar.value = task.epoch
        last = task.history[-1] if task.history else {}
        parts = [_("epoch {epoch}/{total}").format(epoch=task.epoch, total=task.total_epochs)]
        if isinstance(last.get("loss"), (int, float)):
            parts.append(_("loss {loss:.4f}").format(loss=last["loss"]))
        if task.best_dice is not None:
            parts.append(_("best validation Dice {dice:.3f}").format(dice=task.best_dice))
            self.ui.diceProgressBar.value = int(round(task.best_dice * 100))
        if task.history:
            self.showMetrics(True)
        self.ui.metricsLabel.text = "  ·  ".join(parts)

    def onStartButton(self):
        if self.task is not None and self.task.running:
            if ask_without_busy_cursor(_("Stop training? A checkpoint is saved first; tick 'Resume' to continue "
                                         "later."), slicer.util.confirmOkCancelDisplay):
                self.ui.metricsLabel.text = _("Stopping (saving a checkpoint)...")
                self.logic.stop()
            return
        if self.logic.installing:
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.diceProgressBar.value = 0
        self.showMetrics(False)
        self.ui.startButton.enabled = False  # no second click while the packages are installed
        self.ui.metricsLabel.text = _("Checking the Python packages...")
        try:
            self.task = self.logic.start(self.settingsFromGui(), waitForCompletion=False, logCallback=self.addLog,
                                         progressCallback=self.onProgress, completedCallback=self.onCompleted)
        except LoGoNetError as error:
            self.ui.metricsLabel.text = ""
            self.updateButtons()
            slicer.util.errorDisplay(str(error), windowTitle="LoGoNet")
            return
        except Exception as error:  # OSError and anything unforeseen: a dialog, never a silent traceback
            self.ui.metricsLabel.text = ""
            self.updateButtons()
            slicer.util.errorDisplay(_("Training could not start: ") + str(error), windowTitle="LoGoNet",
                                     detailedText=__import__("traceback").format_exc())
            return
        self.ui.progressBar.show()
        self.ui.metricsLabel.text = _("Starting...")
        self.updateButtons()

    def onCompleted(self, task):
        self.ui.progressBar.hide()
        if task.state == "succeeded":
            self.ui.metricsLabel.text += "  ·  " + _("finished")
        elif task.state == "stopped":
            self.ui.resumeCheckBox.checked = bool(task.checkpoint)
            self.ui.metricsLabel.text = self.logic.stopped_message(task)
        else:
            reason = task.error_message or _("the worker ended without a message (see the log)")
            self.ui.metricsLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Training failed: ") + str(reason), windowTitle="LoGoNet",
                                     detailedText=self.ui.logTextEdit.toPlainText())
        self.updateButtons()

    def onShowChart(self):
        if self.task is None or self.task.chart is None:
            slicer.util.infoDisplay(_("The chart appears after the first epoch."))
            return
        slicer.modules.plots.logic().ShowChartInLayout(self.task.chart.chart)

    def onAddToTrainingSet(self):
        with slicer.util.tryWithErrorDisplay(_("Could not add the case to the training set."), waitCursor=True):
            result = self.logic.add_to_training_set(self.ui.trainingVolumeSelector.currentNode(),
                                                    self.ui.trainingSegmentationSelector.currentNode(),
                                                    self.ui.trainingSetPathLineEdit.currentPath)
            self.ui.trainingSetStatusLabel.text = _("Added case {case}").format(case=result["case_id"])
            self.addLog(_("Added {image} and {label}").format(image=result["image"], label=result["label"]))


class LoGoNetTrainLogic(ScriptedLoadableModuleLogic, TrainLogic):
    """``start(TrainSettings(...), waitForCompletion=...)``, ``stop()``, ``add_to_training_set(...)``: see
    LoGoNetLib.trainlogic.TrainLogic."""

    def __init__(self, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
        kwargs.setdefault("catalog", ModelCatalog())
        kwargs.setdefault("installer", DependencyInstaller())
        TrainLogic.__init__(self, **kwargs)


class LoGoNetTrainTest(ScriptedLoadableModuleTest):
    """Inside Slicer, GPU- and download-free: the fake worker trains 3 'epochs' into a temporary folder."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_train_and_register()

    def test_train_and_register(self):
        import tempfile

        from LoGoNetLib.install import NoInstall

        fake = os.path.join(os.path.dirname(LoGoNetLib.__file__), "..", "Testing", "Python", "fake_logonet.py")
        with tempfile.TemporaryDirectory() as folder:
            data = os.path.join(folder, "data")
            for sub in ("imagesTr", "labelsTr"):
                os.makedirs(os.path.join(data, sub))
                open(os.path.join(data, sub, "case_0000.nii.gz" if sub == "imagesTr" else "case.nii.gz"), "wb").close()
            catalog = ModelCatalog(home=os.path.join(folder, "home"))
            logic = LoGoNetTrainLogic(catalog=catalog, installer=NoInstall(),
                                      command_prefix=[sys.executable, os.path.abspath(fake)])
            task = logic.start(TrainSettings(data_dir=data, out_dir=os.path.join(folder, "out"), epochs=3,
                                             roi=(32, 32, 32), name="selftest"), waitForCompletion=True)
            self.assertEqual(task.state, "succeeded")
            self.assertEqual(task.epoch, 3)
            self.assertEqual(task.chart.rows, 3)
            self.assertIn(task.model_entry.id, [entry.id for entry in catalog.models()])
        self.delayDisplay("Test passed")

