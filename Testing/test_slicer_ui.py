"""The .ui files against the module code: every ``self.ui.<name>`` exists in the module's .ui, every widget
class is one Slicer provides (explicit allow-list of Qt, CTK and qMRML/qSlicer classes), every signal the code
connects exists on that class, and the module files import headless (with the app-only parts stubbed).
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict

import pytest

from slicer_fixtures import mrml  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
MODULES = ("LoGoNetSegment", "LoGoNetTrain")

#: Widget and layout classes Slicer's designer plugins and PythonQt provide (what loadUI can instantiate).
QT_WIDGETS = {"QWidget", "QLabel", "QPushButton", "QToolButton", "QComboBox", "QCheckBox", "QRadioButton",
              "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QPlainTextEdit", "QTextEdit", "QTextBrowser",
              "QProgressBar", "QTableWidget", "QListWidget", "QTreeWidget", "QGroupBox", "QFrame", "QSlider",
              "QTabWidget", "QStackedWidget", "QScrollArea", "QSplitter"}
QT_LAYOUTS = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}
CTK_WIDGETS = {"ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkPathLineEdit", "ctkDirectoryButton",
               "ctkSearchBox", "ctkSliderWidget", "ctkRangeWidget", "ctkComboBox", "ctkCheckableComboBox",
               "ctkDoubleSpinBox", "ctkMenuButton", "ctkCheckBox"}
MRML_WIDGETS = {"qMRMLWidget", "qSlicerWidget", "qMRMLNodeComboBox", "qMRMLSegmentationShow3DButton",
                "qMRMLSubjectHierarchyTreeView", "qMRMLSubjectHierarchyComboBox", "qMRMLSegmentEditorWidget",
                "qMRMLSegmentsTableView", "qMRMLPlotWidget", "qMRMLPlotView", "qSlicerMarkupsPlaceWidget"}
ALLOWED_WIDGETS = QT_WIDGETS | CTK_WIDGETS | MRML_WIDGETS
#: Other Slicer Qt classes the code may create through ``slicer.`` (checked against the v5.8.1 headers).
SLICER_QT_CLASSES = {"qSlicerDICOMExportDialog"}
#: Non-widget Qt classes the module code may use through ``qt.``.
QT_OTHER = {"QSettings", "QFileDialog", "QTableWidgetItem", "QDesktopServices", "QUrl", "QTimer", "Qt",
            "QMessageBox", "QColor", "QIcon", "QSize", "QApplication", "QAbstractItemView"}
#: Signals (as connected from Python) per class; a name not listed here is an error.
SIGNALS: Dict[str, set] = {
    "QPushButton": {"clicked()", "clicked(bool)", "toggled(bool)"},
    "QToolButton": {"clicked()", "clicked(bool)"},
    "QCheckBox": {"toggled(bool)", "stateChanged(int)", "clicked(bool)"},
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)"},
    "QSpinBox": {"valueChanged(int)"},
    "QDoubleSpinBox": {"valueChanged(double)"},
    "QLineEdit": {"textChanged(QString)", "editingFinished()"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "nodeAdded(vtkMRMLNode*)"},
    "qMRMLWidget": {"mrmlSceneChanged(vtkMRMLScene*)"},
}
#: Slots the .ui connections may call, per receiver class.
SLOTS = {"qMRMLNodeComboBox": {"setMRMLScene(vtkMRMLScene*)"},
         "qMRMLSegmentationShow3DButton": {"setMRMLScene(vtkMRMLScene*)"}}


def ui_widgets(path: Path) -> Dict[str, str]:
    """widget name -> class, for every widget and layout in a .ui file."""
    root = ET.parse(path).getroot()
    found = {}
    for element in root.iter():
        if element.tag in ("widget", "layout") and element.get("name"):
            found[element.get("name")] = element.get("class")
    return found


def module_code(module: str) -> str:
    """The code that drives a module's panel: the module file, its own library and LoGoNetLib's panel base."""
    files = [REPO / module / f"{module}.py", *sorted((REPO / module / f"{module}Lib").glob("*.py")),
             REPO / "LoGoNetLib" / "gui.py"]
    return "\n".join(path.read_text(encoding="utf-8") for path in files)


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_uses_is_in_the_ui(module):
    widgets = ui_widgets(REPO / module / "Resources" / "UI" / f"{module}.ui")
    used = set(re.findall(r"\bui\.(\w+)", module_code(module)))
    used |= {name for name, _signal, _slot in panel_class(module).CONNECTIONS}
    assert used, "the module code uses no widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{module}.py uses widgets that {module}.ui lacks: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_classes_are_ones_slicer_provides(module):
    path = REPO / module / "Resources" / "UI" / f"{module}.ui"
    root = ET.parse(path).getroot()
    for element in root.iter("widget"):
        assert element.get("class") in ALLOWED_WIDGETS, f"{path.name}: {element.get('name')} has class " \
                                                        f"{element.get('class')}, which Slicer does not provide"
    for element in root.iter("layout"):
        assert element.get("class") in QT_LAYOUTS, f"{path.name}: layout class {element.get('class')}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom_used = {e.get("class") for e in root.iter("widget") if not e.get("class").startswith("Q")}
    assert custom_used <= declared, f"{path.name}: declare custom widgets {sorted(custom_used - declared)}"
    assert root.find("widget").get("class") == "qMRMLWidget", "the .ui root must be a qMRMLWidget"
    widgets = ui_widgets(path)
    for connection in root.iter("connection"):
        receiver = connection.findtext("receiver")
        assert connection.findtext("sender") in widgets and receiver in widgets
        assert connection.findtext("slot") in SLOTS.get(widgets[receiver], set())


def panel_class(module: str):
    """The library panel class a module file hosts (``SegmentWidget``, ``TrainWidget``)."""
    import importlib

    from slicer_fixtures import install_app_stubs

    install_app_stubs()
    name = {"LoGoNetSegment": "SegmentWidget", "LoGoNetTrain": "TrainWidget"}[module]
    return getattr(importlib.import_module(f"{module}Lib.widget"), name)


@pytest.mark.parametrize("module", MODULES)
def test_code_uses_only_provided_classes_and_signals(module):
    code = module_code(module)
    for name in set(re.findall(r"\bqt\.(Q\w+|Qt)\b", code)):
        assert name in QT_WIDGETS | QT_OTHER, f"{module}.py uses qt.{name}, not in the allow-list"
    for name in set(re.findall(r"\bctk\.(\w+)", code)):
        assert name in CTK_WIDGETS, f"{module}.py uses ctk.{name}"
    for name in set(re.findall(r"\bslicer\.(q[A-Z]\w+)", code)):
        assert name in MRML_WIDGETS | SLICER_QT_CLASSES, f"{module}.py uses slicer.{name}"
    widgets = ui_widgets(REPO / module / "Resources" / "UI" / f"{module}.ui")
    panel = panel_class(module)
    connects = [(name, signal) for name, signal, _slot in panel.CONNECTIONS]
    assert connects and all(callable(getattr(panel, slot, None)) for _name, _signal, slot in panel.CONNECTIONS)
    for name, signal in connects:
        cls = widgets[name]
        assert signal in SIGNALS.get(cls, set()), f"{module} panel connects {name} ({cls}) to unknown signal {signal}"


def test_the_checker_catches_a_missing_widget(monkeypatch):
    """The check itself fails for code that uses a widget the .ui lacks."""
    monkeypatch.setattr(sys.modules[__name__], "module_code",
                        lambda module: "self.ui.applyButton.enabled = True\nself.ui.noSuchWidget.show()")
    with pytest.raises(AssertionError, match="noSuchWidget"):
        test_every_widget_the_code_uses_is_in_the_ui("LoGoNetSegment")


def test_module_files_import_headless_and_logic_has_the_documented_api(mrml):
    """Both module files import (app-only parts stubbed) and their Logic classes are their libraries' logics."""
    import importlib

    from LoGoNetLib.install import DependencyInstaller
    from LoGoNetSegmentLib.logic import SegmentLogic
    from LoGoNetTrainLib.logic import TrainLogic

    segment = importlib.import_module("LoGoNetSegment")
    train = importlib.import_module("LoGoNetTrain")
    logic = segment.LoGoNetSegmentLogic()
    assert isinstance(logic, SegmentLogic) and isinstance(logic.installer, DependencyInstaller)
    assert logic.installer.offer_engine and not train.LoGoNetTrainLogic().installer.offer_engine  # inference only
    assert isinstance(train.LoGoNetTrainLogic(), TrainLogic)
    import inspect

    params = inspect.signature(logic.process).parameters
    for name in ("inputVolume", "outputSegmentation", "model", "device", "fast", "roiNode", "waitForCompletion"):
        assert name in params
    assert params["waitForCompletion"].default is True
    # one logic class per module, whichever way it was imported
    assert segment.SegmentLogic is SegmentLogic and train.TrainLogic is TrainLogic

