"""Issue 12, defect 3: both panels fit Slicer's module panel (about 440 px). Each .ui is loaded with PyQt5
(a test extra; skipped where it is absent) under QT_QPA_PLATFORM=offscreen, with plain stand-ins for the CTK/MRML
classes, and the layout is asserted: minimum width, the model combo box sizing by a minimum contents length
instead of its longest title, and no button sharing the model row."""
from __future__ import annotations

import os
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PANEL_WIDTH = 440
LONG_TITLE = "LoGoNet fine-tuned on our hospital's 412 portal-venous abdominal CTs, preset L, 2026-11-30 run 3"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PyQt5.QtWidgets")
uic = pytest.importorskip("PyQt5.uic")


def _stand_ins():
    """Modules named like the .ui headers (``qMRMLNodeComboBox.h`` -> ``qMRMLNodeComboBox``), as uic imports them."""
    from PyQt5.QtWidgets import QComboBox, QGroupBox, QHBoxLayout, QLineEdit, QSizePolicy, QToolButton, QWidget

    class ctkCollapsibleButton(QGroupBox):  # noqa: N801
        def setText(self, text):  # noqa: N802
            self.setTitle(text)

        def setCollapsed(self, value):  # noqa: N802
            pass

    class qMRMLNodeComboBox(QComboBox):  # noqa: N801
        def __init__(self, parent=None):
            super().__init__(parent)
            self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
            self.addItem("Create new segmentation")  # the longest text the real one shows closed

        def __getattr__(self, name):
            if name.startswith("set"):
                return lambda *args: None
            raise AttributeError(name)

    class ctkPathLineEdit(QWidget):  # noqa: N801
        Dirs, Drives = 1, 2

        def __init__(self, parent=None):
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            layout.addWidget(QLineEdit())
            layout.addWidget(QToolButton())

        def __getattr__(self, name):
            if name.startswith("set"):
                return lambda *args: None
            raise AttributeError(name)

    class qMRMLWidget(QWidget):  # noqa: N801
        pass

    class qMRMLSegmentationShow3DButton(QToolButton):  # noqa: N801
        def __init__(self, parent=None):
            super().__init__(parent)
            self.setText("Show 3D")

    for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit, qMRMLWidget, qMRMLSegmentationShow3DButton):
        module = types.ModuleType(cls.__name__)
        setattr(module, cls.__name__, cls)
        sys.modules[cls.__name__] = module


@pytest.fixture(scope="module")
def qapp():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["test"])
    app.setStyle("Fusion")
    _stand_ins()
    return app


def load(module: str, tmp_path: Path):
    tree = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui")
    root = tree.getroot()
    for connections in root.findall("connections"):  # signals of the real MRML classes
        root.remove(connections)
    path = tmp_path / f"{module}.ui"
    tree.write(path)
    return uic.loadUi(str(path))


def test_segment_panel_fits_with_a_long_model_title(qapp, tmp_path):
    from PyQt5.QtWidgets import QComboBox

    panel = load("LoGoNetSegment", tmp_path)
    panel.modelSelector.addItem(LONG_TITLE, "long")
    panel.modelSelector.addItem("LoGoNet demo: 12 abdominal organs (BTCV labels), tiny, CPU-friendly", "demo")
    for text in ("Auto (GPU if available)", "GPU", "CPU"):
        panel.deviceSelector.addItem(text)
    combo = panel.modelSelector
    assert combo.sizeAdjustPolicy() == QComboBox.AdjustToMinimumContentsLengthWithIcon
    assert combo.minimumContentsLength() <= 20
    width = panel.minimumSizeHint().width()
    assert width <= PANEL_WIDTH, f"the Segment panel needs {width} px"
    assert combo.minimumSizeHint().width() < combo.fontMetrics().horizontalAdvance(LONG_TITLE) / 2
    # the model combo has its row to itself ("Add model folder..." went to Advanced)
    form = panel.inputsCollapsibleButton.layout()
    row = form.getWidgetPosition(combo)[0]
    assert form.itemAt(row, form.FieldRole).widget() is combo
    assert panel.browseModelButton.parent() is panel.advancedCollapsibleButton
    # it really lays out in 440 px: every widget of the inputs section inside the panel
    panel.resize(PANEL_WIDTH, panel.sizeHint().height())
    panel.show()
    qapp.processEvents()
    for child in panel.inputsCollapsibleButton.findChildren(QtWidgets.QWidget):
        if child.isVisible():
            right = child.mapTo(panel, child.rect().topRight()).x()
            assert right <= PANEL_WIDTH, f"{child.objectName()} reaches {right} px"
    panel.hide()


def test_train_panel_fits(qapp, tmp_path):
    panel = load("LoGoNetTrain", tmp_path)
    for text in ("Fine-tune (labeled data)", "Fine-tune from a pre-trained model",
                 "Self-supervised pre-training (unlabeled data)"):
        panel.modeSelector.addItem(text)
    width = panel.minimumSizeHint().width()
    assert width <= PANEL_WIDTH, f"the Train panel needs {width} px"


def test_the_check_catches_a_panel_that_is_too_wide(qapp, tmp_path):
    """The same measurement fails for the old layout: a combo sized to its title next to a button."""
    from PyQt5.QtWidgets import QComboBox, QHBoxLayout, QPushButton, QWidget

    old = QWidget()
    row = QHBoxLayout(old)
    combo = QComboBox()
    combo.addItem(LONG_TITLE)
    row.addWidget(combo)
    row.addWidget(QPushButton("Add folder..."))
    assert old.minimumSizeHint().width() > PANEL_WIDTH
