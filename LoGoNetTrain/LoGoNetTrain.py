"""LoGoNetTrain: self-supervised pre-training and fine-tuning on local folders, and "Add to training set".

The module file holds the metadata and the wiring: the panel is ``LoGoNetTrainLib.widget.TrainWidget``, the
logic ``LoGoNetTrainLib.logic.TrainLogic``, the shared helpers are in the top-level ``LoGoNetLib``. Training runs
in a separate ``PythonSlicer -m logonet finetune|pretrain`` process; Stop lets it save a checkpoint first, and a
finished model appears in LoGoNetSegment's model list.
"""
from __future__ import annotations

import os
import sys

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import *  # noqa: F401,F403
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

from LoGoNetLib.gui import PanelHost, describe_module
from LoGoNetLib.install import DependencyInstaller
from LoGoNetTrainLib.logic import TrainLogic, TrainSettings
from LoGoNetTrainLib.widget import TrainWidget


class LoGoNetTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(
            self.parent, _("LoGoNet Train"),
            helpText=_(
                "Pre-train LoGoNet on unlabeled CTs (masked self-supervision) and fine-tune it on labeled ones "
                "(nnU-Net imagesTr/labelsTr, MSD dataset.json, or images/labels folders). Corrected segmentations can "
                "be added to a training folder for the next round. Trained models appear in LoGoNet Segment."),
            acknowledgementText=_("LoGoNet for 3D Slicer."))


class LoGoNetTrainWidget(PanelHost, ScriptedLoadableModuleWidget):
    """Hosts :class:`TrainWidget` (``LoGoNetTrainLib.widget``) with this module's logic."""

    LIBRARIES = ("LoGoNetTrainLib",)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.hostPanel(TrainWidget(logic=LoGoNetTrainLogic()))


class LoGoNetTrainLogic(ScriptedLoadableModuleLogic, TrainLogic):
    """``start(TrainSettings(...), waitForCompletion=...)``, ``stop()``, ``add_to_training_set(...)``: see
    LoGoNetTrainLib.logic.TrainLogic. In Slicer the Python packages are installed on first use (after asking)."""

    def __init__(self, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
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

        from LoGoNetLib.catalog import ModelCatalog
        from LoGoNetLib.core import fake_worker
        from LoGoNetLib.install import NoInstall

        with tempfile.TemporaryDirectory() as folder:
            data = os.path.join(folder, "data")
            for sub in ("imagesTr", "labelsTr"):
                os.makedirs(os.path.join(data, sub))
                open(os.path.join(data, sub, "case_0000.nii.gz" if sub == "imagesTr" else "case.nii.gz"), "wb").close()
            catalog = ModelCatalog(home=os.path.join(folder, "home"))
            logic = LoGoNetTrainLogic(catalog=catalog, installer=NoInstall(),
                                      command_prefix=[sys.executable, str(fake_worker())])
            task = logic.start(TrainSettings(data_dir=data, out_dir=os.path.join(folder, "out"), epochs=3,
                                             roi=(32, 32, 32), name="selftest"), waitForCompletion=True)
            self.assertEqual(task.state, "succeeded")
            self.assertEqual(task.epoch, 3)
            self.assertEqual(task.chart.rows, 3)
            self.assertIn(task.model_entry.id, [entry.id for entry in catalog.models()])
        self.delayDisplay("Test passed")
