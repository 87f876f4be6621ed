"""The two panels' behaviour, run headless: the library widgets (``SegmentWidget(logic)``, ``TrainWidget(logic)``)
with their real setup() on slicer-core's scene, the .ui's widgets replaced by recording fakes (every widget named
in the .ui exists, and a fake emits its Qt signal when the code or the test changes its value, as PythonQt does).

The Segment panel is driven by a fake logic: a click becomes a logic call, a logic callback becomes panel state.
The other tests run the real logics with the stand-in worker."""
from __future__ import annotations

import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from slicer_fixtures import REPO, FAKE_CLI, add_volume, mrml, write_fake_card  # noqa: F401

#: property -> the signal PythonQt emits when it changes
EMITS = {"value": ("valueChanged(int)", "valueChanged(double)"), "checked": ("toggled(bool)",),
         "currentPath": ("currentPathChanged(QString)",), "text": ("textChanged(QString)",)}


class Fake:
    """A stand-in for any Qt/CTK/MRML widget: attributes, signals, combo items, node selection."""

    def __init__(self, name="", kind=""):
        d = self.__dict__
        d.update(_name=name, _kind=kind, _signals={}, _items=[], _blocked=False, _node=None, _scene=None,
                 currentIndex=-1, enabled=True, visible=True, text="", toolTip="", checked=False, value=0,
                 currentPath="", maximum=100, rows=0, plain=[], segmentation=None)

    def __setattr__(self, key, value):
        old = self.__dict__.get(key)
        self.__dict__[key] = value
        if key in EMITS and old != value and not (key == "text" and self._kind != "QLineEdit"):
            for signal in EMITS[key]:
                self.emit(signal, value)

    def connect(self, signal, slot):
        self._signals.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        import inspect

        if not self._blocked:
            for slot in self._signals.get(signal, []):
                try:  # PythonQt drops the arguments a slot does not take
                    params = inspect.signature(slot).parameters.values()
                    if not any(p.kind == p.VAR_POSITIONAL for p in params):
                        args = args[:len([p for p in params if p.default is p.empty or p.kind == p.POSITIONAL_OR_KEYWORD])]
                except (TypeError, ValueError):
                    pass
                slot(*args)

    def connected(self):
        return set(self._signals)

    # QComboBox
    def addItem(self, text, data=None):
        self._items.append((text, data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def clear(self):
        self._items, self.__dict__["currentIndex"] = [], -1
        self.__dict__["plain"] = []

    def findData(self, data):
        return next((i for i, (_t, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text):
        return next((i for i, (t, _d) in enumerate(self._items) if t == text), -1)

    def setCurrentIndex(self, index):
        if index != self.currentIndex:
            self.__dict__["currentIndex"] = index
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentData(self):
        return self._items[self.currentIndex][1] if 0 <= self.currentIndex < len(self._items) else None

    @property
    def currentText(self):
        return self._items[self.currentIndex][0] if 0 <= self.currentIndex < len(self._items) else ""

    def blockSignals(self, blocked):
        self.__dict__["_blocked"] = blocked

    # qMRMLNodeComboBox & co
    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self.__dict__["_node"] = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def setSegmentationNode(self, node):
        self.__dict__["segmentation"] = node

    # text boxes and tables
    def appendPlainText(self, text):
        self.plain.append(text)

    def toPlainText(self):
        return "\n".join(self.plain)

    def setRowCount(self, rows):
        self.__dict__["rows"] = rows

    def hide(self):
        self.__dict__["visible"] = False

    def show(self):
        self.__dict__["visible"] = True

    def __getattr__(self, name):  # any other method: accepted, returns a Fake (layout(), view(), header...)
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: Fake()


def ui_names(module):
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    return {e.get("name"): e.get("class") for e in root.iter("widget") if e.get("name")}


class Settings(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):  # noqa: N802
        self[key] = value


@pytest.fixture
def app(mrml, monkeypatch, tmp_path):  # noqa: F811
    """Qt, loadUI and dialogs replaced; returns a namespace that records the dialogs shown."""
    slicer = mrml.slicer
    qt = sys.modules["qt"]
    settings = Settings()
    shown = types.SimpleNamespace(errors=[], questions=[], answers=[True])
    monkeypatch.setattr(qt, "QSettings", lambda: settings, raising=False)
    monkeypatch.setattr(qt, "Qt", types.SimpleNamespace(ElideMiddle=2, ToolTipRole=3, WaitCursor=4), raising=False)
    monkeypatch.setattr(qt, "QAbstractItemView", types.SimpleNamespace(ExtendedSelection=3), raising=False)
    monkeypatch.setattr(qt, "QApplication", types.SimpleNamespace(overrideCursor=lambda: None), raising=False)
    monkeypatch.setattr(qt, "QTableWidgetItem", lambda text: text, raising=False)
    monkeypatch.setattr(slicer, "qMRMLSegmentsTableView", Fake, raising=False)
    built = {}

    def load_ui(path):
        module = Path(path).stem
        built[module] = {name: Fake(name, kind) for name, kind in ui_names(module).items()}
        return Fake(module)

    monkeypatch.setattr(slicer.util, "loadUI", load_ui)
    monkeypatch.setattr(slicer.util, "childWidgetVariables",
                        lambda widget: types.SimpleNamespace(**built[widget._name]))
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.errors.append(text), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, **kw: shown.questions.append(text) or shown.answers[-1], raising=False)
    slm = sys.modules["slicer.ScriptedLoadableModule"]

    def setup(self):
        self.layout = Fake("layout")

    monkeypatch.setattr(slm.ScriptedLoadableModuleWidget, "setup", setup, raising=False)
    monkeypatch.setattr(slm.ScriptedLoadableModuleWidget, "resourcePath",
                        lambda self, name: str(name), raising=False)
    monkeypatch.setenv("LOGONET_HOME", str(tmp_path / "home"))
    shown.mrml = mrml
    return shown


MADE = []


def make_panel(panel):
    """setup() then enter(), as Slicer does when the module is first shown."""
    panel.setup()
    panel.enter()
    MADE.append(panel)
    return panel


@pytest.fixture(autouse=True)
def cleanup_widgets():
    yield
    while MADE:
        widget = MADE.pop()
        task = getattr(widget, "task", None)
        if task is not None and task.running and getattr(task, "process", None) is not None:
            task.process.cancel()
            task.wait(timeout=30)
        widget.cleanup()  # removes the scene observers before the scene goes


# ------------------------------------------------------------------------------------------------- Train
@pytest.fixture
def train(app, tmp_path):
    from LoGoNetLib.install import NoInstall
    from LoGoNetTrainLib.logic import TrainLogic
    from LoGoNetTrainLib.widget import TrainWidget

    widget = make_panel(TrainWidget(logic=TrainLogic(installer=NoInstall(),
                                                     command_prefix=[sys.executable, str(FAKE_CLI)])))
    data = tmp_path / "data"
    for sub, name in (("imagesTr", "a_0000.nii.gz"), ("labelsTr", "a.nii.gz")):
        (data / sub).mkdir(parents=True)
        (data / sub / name).write_bytes(b"")
    widget.ui.labeledDataPathLineEdit.currentPath = str(data)
    widget.ui.outputPathLineEdit.currentPath = str(tmp_path / "out")
    return widget


def test_train_start_is_revalidated_when_any_setting_changes(train):
    ui = train.ui
    for name, signal, _param in train.SETTING_SIGNALS:  # every setting is wired, not only the folders
        assert signal in getattr(ui, name).connected(), f"{name} {signal} is not connected"
    assert ui.startButton.enabled, ui.startButton.toolTip
    ui.roiSpinBox.value = 40  # not a multiple of 32
    assert not ui.startButton.enabled and "multiple of 32" in ui.startButton.toolTip
    ui.roiSpinBox.value = 64
    assert ui.startButton.enabled
    ui.resumeCheckBox.checked = True  # nothing to resume in a fresh folder
    assert not ui.startButton.enabled and "nothing to resume" in ui.startButton.toolTip
    ui.resumeCheckBox.checked = False
    ui.learningRateSpinBox.value = 0.0
    assert not ui.startButton.enabled and "learning rate" in ui.startButton.toolTip
    ui.learningRateSpinBox.value = 0.001
    assert ui.startButton.enabled
    # the settings are in the scene's parameter node
    assert train.params.get("CropSize") == "64" and train.params.get("LearningRate") == "0.001"


def test_train_metrics_appear_only_after_the_first_epoch_and_a_stop_says_resumable(train, app):
    ui = train.ui
    assert not ui.diceProgressBar.visible and not ui.showChartButton.visible and not ui.diceLabel.visible
    ui.epochsSpinBox.value = 3
    ui.startButton.emit("clicked(bool)", False)
    task = train.task
    assert task is not None and not ui.diceProgressBar.visible
    task.wait(timeout=60)
    assert task.state == "succeeded" and ui.diceProgressBar.visible and ui.showChartButton.visible
    assert ui.diceProgressBar.value == 30 and app.errors == []
    # a stopped run: the label says where it resumes, no error dialog
    task.state, task.checkpoint, task.checkpoint_epoch = "stopped", "/x/checkpoint.pt", 2
    train.onCompleted(task)
    assert "resumable from epoch 3 of 3" in ui.metricsLabel.text and app.errors == []
    assert ui.resumeCheckBox.checked


def test_train_start_errors_become_dialogs(train, app, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    train.logic.problems = lambda settings: []
    train.ui.outputPathLineEdit.currentPath = str(blocker / "out")
    train.ui.startButton.emit("clicked(bool)", False)
    assert len(app.errors) == 1 and "cannot be used" in app.errors[0]

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    train.logic.start = boom
    train.ui.startButton.emit("clicked(bool)", False)
    assert len(app.errors) == 2 and app.errors[1].startswith("Training could not start: ")
    assert train.ui.startButton.text == "Start"


def test_train_failure_never_says_none(train, app):
    task = types.SimpleNamespace(state="failed", error_message=None, checkpoint=None, running=False)
    train.onCompleted(task)
    assert app.errors and "None" not in app.errors[0]


# ------------------------------------------------------------------------------------------------- Segment
@pytest.fixture
def segment(app, tmp_path):
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetLib.install import NoInstall
    from LoGoNetSegmentLib.logic import SegmentLogic
    from LoGoNetSegmentLib.widget import SegmentWidget

    card = write_fake_card(tmp_path / "home" / "models" / "organs",
                           [{"value": 1, "name": "spleen", "color": [157, 108, 162]}])
    volume = add_volume(app.mrml.slicer, np.zeros((8, 10, 12), dtype=np.int16), name="CT")
    logic = SegmentLogic(catalog=ModelCatalog(), installer=NoInstall(),
                         command_prefix=[sys.executable, str(FAKE_CLI)], temp_root=str(tmp_path))
    widget = make_panel(SegmentWidget(logic=logic))
    widget.ui.modelSelector.setCurrentIndex(widget.ui.modelSelector.findData("organs"))
    return widget, volume, card


def test_segment_selections_go_to_the_parameter_node_and_come_back_after_close(segment, app):
    widget, volume, card = segment
    ui = widget.ui
    assert ui.inputVolumeSelector.currentNode() is volume  # the first volume, also stored in the scene
    assert widget.params.node_ref("InputVolume") is volume
    ui.deviceSelector.setCurrentIndex(ui.deviceSelector.findData("cpu"))
    ui.fastCheckBox.checked = True
    ui.fastCheckBox.emit("toggled(bool)", True)
    assert widget.params.get("Device") == "cpu" and widget.params.get_bool("Fast")
    assert widget.params.get("Model") == "organs"
    scene = app.mrml.scene
    scene.InvokeEvent(scene.StartCloseEvent)
    scene.Clear(0)
    scene.InvokeEvent(scene.EndCloseEvent)  # what File > Close Scene does
    assert widget.params is not None and widget.params.get("Device") == "auto"
    assert ui.deviceSelector.currentData == "auto" and ui.fastCheckBox.checked is False


def test_segment_apply_shows_words_and_is_disabled_while_installing(segment, app):
    widget, volume, card = segment
    ui = widget.ui
    assert ui.applyButton.enabled
    assert ui.modelInfoLabel.text == "1 organs: spleen"
    widget.logic.installing = True
    widget.updateButtons()
    assert not ui.applyButton.enabled and "being installed" in ui.applyButton.toolTip
    assert not ui.installDependenciesButton.enabled and not ui.sampleDataButton.enabled
    widget.logic.installing = False
    ui.applyButton.emit("clicked(bool)", False)
    widget.task.wait(timeout=60)
    assert widget.task.state == "succeeded", app.errors
    assert ui.statusLabel.text.startswith("Done in ")
    assert ui.segmentationShow3DButton.segmentation is widget.task.segmentation
    assert widget.segmentsTable.segmentation is widget.task.segmentation  # visibility/colour per segment
    assert ui.volumesTable.rows == 1
    assert not any(line.lstrip().startswith("{") for line in ui.logTextEdit.plain)


def test_segment_module_help_and_titles_take_the_organ_count_from_the_card(app):
    import importlib

    module = importlib.import_module("LoGoNetSegment")
    parent = types.SimpleNamespace()
    module.LoGoNetSegment(parent)
    from LoGoNetLib.catalog import ModelCatalog

    demo = ModelCatalog().find("demo")
    assert f"{len(demo.labels)} abdominal organs" in parent.helpText and "13" not in parent.helpText


def test_ask_without_busy_cursor_takes_the_busy_cursor_down_while_asking():
    from LoGoNetLib.gui import ask_without_busy_cursor

    stack = ["wait", "wait"]  # two nested busy cursors

    class Cursor:
        def __init__(self, shape):
            self._shape = shape

        def shape(self):
            return self._shape

    application = types.SimpleNamespace(
        overrideCursor=lambda: Cursor(stack[-1]) if stack else None,
        restoreOverrideCursor=lambda: stack.pop(),
        setOverrideCursor=lambda shape: stack.append(shape))
    seen = []
    assert ask_without_busy_cursor("Install?", lambda q: seen.append(list(stack)) or True, application) is True
    assert seen == [[]] and stack == ["wait", "wait"]


def test_ask_without_busy_cursor_with_real_qt(monkeypatch):
    qtwidgets = pytest.importorskip("PyQt5.QtWidgets")
    from PyQt5.QtCore import Qt

    from LoGoNetLib.gui import ask_without_busy_cursor

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    qapp = qtwidgets.QApplication.instance() or qtwidgets.QApplication([])
    qtwidgets.QApplication.setOverrideCursor(Qt.WaitCursor)
    try:
        seen = []
        ask_without_busy_cursor("Install?", lambda q: seen.append(qtwidgets.QApplication.overrideCursor()) or False,
                                qtwidgets.QApplication)
        assert seen == [None]
        assert qtwidgets.QApplication.overrideCursor().shape() == Qt.WaitCursor
    finally:
        while qtwidgets.QApplication.overrideCursor() is not None:
            qtwidgets.QApplication.restoreOverrideCursor()
    assert qapp is not None


# ------------------------------------------------------------------------------------------------- fake logic
class FakeTask:
    """What a segmentation logic hands back: a run the test ends by calling the completion callback."""

    def __init__(self, model):
        self.model = model
        self.state = "running"
        self.cancelled = 0
        self.segmentation = None
        self.volumes_ml = []
        self.elapsed_s = 0.0
        self.error_message = None

    @property
    def running(self):
        return self.state == "running"

    def cancel(self):
        self.cancelled += 1


class FakeSegmentLogic:
    """Records every call the panel makes; ``process`` returns a :class:`FakeTask` (or raises ``fail``)."""

    def __init__(self, catalog):
        from LoGoNetLib.install import NoInstall

        self.catalog = catalog
        self.installer = NoInstall()
        self.installing = False
        self.ask = None
        self.calls = []
        self.fail = None

    def process(self, inputVolume, **kwargs):
        self.calls.append(("process", inputVolume, kwargs))
        if self.fail is not None:
            raise self.fail
        return FakeTask(kwargs["model"])

    def cleanup(self):
        self.calls.append(("cleanup",))


@pytest.fixture
def fake_segment(app, tmp_path):
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetSegmentLib.widget import SegmentWidget

    write_fake_card(tmp_path / "home" / "models" / "organs", [{"value": 1, "name": "spleen", "color": [1, 2, 3]},
                                                               {"value": 6, "name": "liver", "color": [4, 5, 6]}])
    volume = add_volume(app.mrml.slicer, np.zeros((8, 10, 12), dtype=np.int16), name="CT")
    logic = FakeSegmentLogic(ModelCatalog())
    widget = make_panel(SegmentWidget(logic=logic))
    widget.ui.modelSelector.setCurrentIndex(widget.ui.modelSelector.findData("organs"))
    return widget, logic, volume


def test_apply_click_becomes_one_logic_call_with_the_panel_selections(fake_segment):
    widget, logic, volume = fake_segment
    ui = widget.ui
    assert widget.logic is logic and logic.ask == widget.ask  # questions go through the panel (normal cursor)
    ui.deviceSelector.setCurrentIndex(ui.deviceSelector.findData("cpu"))
    ui.fastCheckBox.checked = True
    ui.applyButton.emit("clicked(bool)", False)
    assert [call[0] for call in logic.calls] == ["process"]
    _, given_volume, kwargs = logic.calls[0]
    assert given_volume is volume and kwargs["model"].id == "organs"
    assert (kwargs["device"], kwargs["fast"], kwargs["waitForCompletion"]) == ("cpu", True, False)
    assert kwargs["roiNode"] is None and kwargs["outputSegmentation"] is None
    # while it runs, Apply is Cancel and the inputs are locked
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert not ui.inputVolumeSelector.enabled and not ui.modelSelector.enabled
    assert ui.progressBar.visible and ui.statusLabel.text == "Starting the segmentation..."


def test_logic_callbacks_become_panel_state(fake_segment, app):
    widget, logic, volume = fake_segment
    ui = widget.ui
    ui.applyButton.emit("clicked(bool)", False)
    kwargs = logic.calls[0][2]
    kwargs["logCallback"]("Worker started on cpu.")
    kwargs["progressCallback"](0.5, "Segmenting: 2 of 4")
    assert ui.logTextEdit.plain[-1] == "Worker started on cpu."
    assert ui.progressBar.value == 50 and ui.statusLabel.text == "Segmenting: 2 of 4"
    # the run succeeds: the panel shows the result the logic made
    task = widget.task
    segmentation = app.mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT LoGoNet")
    segmentation.GetSegmentation().AddEmptySegment("", "spleen", (1, 0, 0))
    task.state, task.segmentation, task.elapsed_s = "succeeded", segmentation, 1.25
    task.volumes_ml = [("spleen", 1, 12.5), ("liver", 6, 800.0)]
    kwargs["completedCallback"](task)
    assert ui.statusLabel.text == "Done in 1.2 s" and not ui.progressBar.visible
    assert ui.outputSegmentationSelector.currentNode() is segmentation
    assert widget.segmentsTable.segmentation is segmentation and ui.volumesTable.rows == 2
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled and ui.exportLabelmapButton.enabled
    assert app.errors == []


def test_cancel_click_cancels_the_running_task_and_a_cancelled_run_says_so(fake_segment, app):
    widget, logic, volume = fake_segment
    ui = widget.ui
    ui.applyButton.emit("clicked(bool)", False)
    task = widget.task
    ui.applyButton.emit("clicked(bool)", False)  # the same button, now Cancel
    assert task.cancelled == 1 and len(logic.calls) == 1 and ui.statusLabel.text == "Cancelling..."
    task.state = "cancelled"
    logic.calls[0][2]["completedCallback"](task)
    assert ui.statusLabel.text == "Cancelled: nothing was added to the scene." and app.errors == []
    assert ui.applyButton.text == "Apply" and ui.inputVolumeSelector.enabled


def test_a_failed_run_is_one_message_with_the_log_as_details(fake_segment, app):
    widget, logic, volume = fake_segment
    widget.ui.applyButton.emit("clicked(bool)", False)
    kwargs = logic.calls[0][2]
    kwargs["logCallback"]("Error: out of memory")
    task = widget.task
    task.state, task.error_message = "failed", "out of memory"
    kwargs["completedCallback"](task)
    assert app.errors == ["Segmentation failed: out of memory"] and widget.ui.statusLabel.text == "Failed."


def test_errors_meet_one_boundary_user_errors_as_is_bugs_with_traceback(fake_segment, app, caplog):
    from LoGoNetLib.errors import LoGoNetError

    widget, logic, volume = fake_segment
    logic.fail = LoGoNetError("select an input volume (a CT)")
    widget.ui.applyButton.emit("clicked(bool)", False)
    assert app.errors == ["select an input volume (a CT)"]  # the user's mistake: the message as is
    assert widget.task is None and not widget.ui.progressBar.visible and widget.ui.applyButton.text == "Apply"
    logic.fail = KeyError("labels")  # a bug
    with caplog.at_level("ERROR", logger="LoGoNet"):
        widget.ui.applyButton.emit("clicked(bool)", False)
    assert app.errors[1] == "Segmentation could not start: 'labels'"
    assert any(record.exc_info and record.exc_info[0] is KeyError for record in caplog.records)
    assert widget.ui.applyButton.enabled  # the panel stays usable


def test_apply_is_refused_by_the_panel_while_the_logic_installs(fake_segment):
    widget, logic, volume = fake_segment
    logic.installing = True
    widget.updateButtons()
    assert not widget.ui.applyButton.enabled and "being installed" in widget.ui.applyButton.toolTip
    widget.ui.applyButton.emit("clicked(bool)", False)
    assert logic.calls == []


@pytest.mark.parametrize("module, panel", [("LoGoNetSegment", "SegmentWidget"), ("LoGoNetTrain", "TrainWidget")])
def test_module_files_host_the_library_panel_with_their_logic(app, module, panel):
    """The module file only wires: its widget hosts the library panel, with the module's own logic."""
    import importlib

    loaded = importlib.import_module(module)
    host = getattr(loaded, f"{module}Widget")(types.SimpleNamespace())
    host.setup()
    MADE.append(host.panel)
    assert type(host.panel).__name__ == panel
    assert isinstance(host.panel.logic, getattr(loaded, f"{module}Logic")) and host.logic is host.panel.logic
    host.enter()
    assert host.panel.entered and host.panel.params is not None
    host.exit()
    assert not host.panel.entered


def test_segment_check_dependencies_offers_the_engine_again_and_apply_once(segment, app):
    """Check dependencies re-offers the optional engine even after a "no" (a person asked); the widget's logic
    offers it "once" on Apply, where a bare scripted logic offers nothing (nobody would answer)."""
    from LoGoNetLib.install import NoInstall
    from LoGoNetSegmentLib.logic import SegmentLogic

    widget, _volume, _card = segment
    calls = []

    class RecordingInstaller(NoInstall):
        def ensure(self, ask, log=print, optional="no"):
            calls.append(optional)
            return super().ensure(ask, log, optional)

    widget.logic.installer = RecordingInstaller()
    assert "clicked()" in widget.ui.installDependenciesButton.connected()  # the button is wired to ...
    widget.onInstallDependencies()  # ... this slot
    assert calls == ["again"] and "All required Python packages are installed." in widget.ui.logTextEdit.toPlainText()
    assert widget.logic.optional_offer == "once" and SegmentLogic().optional_offer == "no"
