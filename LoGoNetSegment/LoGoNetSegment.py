"""LoGoNetSegment: segment abdominal organs in the loaded CT with a LoGoNet model.

The module file holds the metadata and the wiring: the panel is ``LoGoNetSegmentLib.widget.SegmentWidget``, the
logic ``LoGoNetSegmentLib.logic.SegmentLogic``, the shared helpers are in the top-level ``LoGoNetLib``. The
segmentation itself runs in a separate ``PythonSlicer -m logonet segment`` process, so Slicer stays responsive
and a crash or out-of-memory cannot take it down.
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
from LoGoNetSegmentLib.logic import SegmentLogic
from LoGoNetSegmentLib.widget import SegmentWidget, demo_organs


class LoGoNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(
            self.parent, _("LoGoNet Segment"),
            helpText=_(
                "Segment abdominal organs in a CT with a LoGoNet model: the bundled demo model ({organs}, BTCV "
                "labels), a model trained with LoGoNetTrain, or any LoGoNet model folder. Each model's organs are "
                "listed under the model selector. The model runs in a separate process; Apply becomes Cancel while "
                "it runs. 'Load sample CT' loads a public example CT to try it.").format(organs=demo_organs()),
            acknowledgementText=_(
                "LoGoNet: local and global 3-D segmentation with masked self-supervised pre-training. "
                "The demo model is for demonstration only, not for clinical use."))


class LoGoNetSegmentWidget(PanelHost, ScriptedLoadableModuleWidget):
    """Hosts :class:`SegmentWidget` (``LoGoNetSegmentLib.widget``) with this module's logic."""

    LIBRARIES = ("LoGoNetSegmentLib",)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.hostPanel(SegmentWidget(logic=LoGoNetSegmentLogic()))


class LoGoNetSegmentLogic(ScriptedLoadableModuleLogic, SegmentLogic):
    """``process(inputVolume, outputSegmentation=None, model="demo", device="auto", fast=False, roiNode=None,
    waitForCompletion=True, ...)``: see LoGoNetSegmentLib.logic.SegmentLogic. In Slicer the Python packages are
    installed on first use (after asking)."""

    def __init__(self, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
        kwargs.setdefault("installer", DependencyInstaller(offer_engine=True))  # offers OpenVINO once
        SegmentLogic.__init__(self, **kwargs)


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
        from LoGoNetLib.core import fake_worker
        from LoGoNetLib.install import NoInstall

        self.delayDisplay("Segmenting a synthetic volume")
        array = np.zeros((24, 32, 32), dtype=np.int16)
        array[6:18, 8:24, 8:24] = 200
        matrix = vtk.vtkMatrix4x4()
        for axis, spacing in enumerate((-1.5, -1.5, 2.0)):
            matrix.SetElement(axis, axis, spacing)
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name="LoGoNetSelfTestCT")
        full = os.environ.get("LOGONET_SELFTEST_FULL") == "1"
        logic = LoGoNetSegmentLogic(installer=NoInstall() if not full else DependencyInstaller(),
                                    command_prefix=None if full else [sys.executable, str(fake_worker())])
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
