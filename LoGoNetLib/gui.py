"""What both module panels share: the .ui, the scene's parameter node, questions and errors.

:class:`ModuleWidget` is the base of LoGoNetSegment's and LoGoNetTrain's widgets (their module files only host
them, SlicerNNUnet style). It takes its logic as an argument, so a test drives a widget with a fake logic.
``qt`` is imported lazily (inside functions), so the helpers here also work headless and with PyQt5 in tests.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import slicer
from slicer.util import VTKObservationMixin

from .errors import error_boundary
from .parameters import ParameterNode

#: The device selector's items (the logics map them to the worker's ``--device``).
DEVICE_CHOICES = (("auto", "Auto (GPU if available)"), ("gpu", "GPU"), ("cpu", "CPU"))
TITLE = "LoGoNet"


def describe_module(parent, title: str, helpText: str, acknowledgementText: str) -> None:
    """The metadata both module classes set on their ``parent`` (category Segmentation, contributors)."""
    from slicer.i18n import translate

    parent.title = title
    parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
    parent.dependencies = []
    parent.contributors = ["LoGoNet for 3D Slicer contributors"]
    parent.helpText = helpText
    parent.acknowledgementText = acknowledgementText


def ask_without_busy_cursor(question: str, confirm: Callable[[str], bool], application=None) -> bool:
    """Ask ``question`` with the normal cursor: every override cursor (a busy cursor set during a running
    install or export) is taken down while the dialog is open and put back afterwards. A question under a busy
    cursor looks like a hang and invites a second click."""
    if application is None:
        import qt

        application = qt.QApplication
    saved = []
    while application.overrideCursor() is not None:
        saved.append(application.overrideCursor().shape())
        application.restoreOverrideCursor()
    try:
        return bool(confirm(question))
    finally:
        for shape in reversed(saved):
            application.setOverrideCursor(shape)


@contextlib.contextmanager
def busy_cursor() -> Iterator[None]:
    """The busy cursor while the block runs (a no-op where the application cannot set one)."""
    import qt

    application = getattr(qt, "QApplication", None)
    if not hasattr(application, "setOverrideCursor"):
        yield
        return
    application.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        application.restoreOverrideCursor()


def organ_summary(entry) -> str:
    """'12 organs: spleen, ...' for a catalog entry (the count and names come from its model card)."""
    labels = entry.labels if entry is not None else []
    if not labels:
        return ""
    return f"{len(labels)} organs: " + ", ".join(str(label.get("name")) for label in labels)


class ModuleWidget(VTKObservationMixin):
    """A module panel: loads its .ui, keeps its selections in the scene's parameter node (re-created after
    *File > Close scene*), and turns every action's error into one message (:func:`error_boundary`).

    Subclasses declare their signal connections in :attr:`CONNECTIONS`, fill their widgets in
    :meth:`setupPanel` and show the parameter node in :meth:`updateGUIFromParameterNode`."""

    #: ``(widget name in the .ui, Qt signal, method name)``: what :meth:`setup` connects, after :meth:`setupPanel`.
    CONNECTIONS: Tuple[Tuple[str, str, str], ...] = ()

    def __init__(self, logic, ui_file: Path, parameters: Callable[..., ParameterNode]) -> None:
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self.ui_file = Path(ui_file)
        self.parameters = parameters
        self.params: Optional[ParameterNode] = None
        self.task = None
        self.entered = False
        self.uiWidget = None
        self.ui = None
        self._updatingGui = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        self.uiWidget = slicer.util.loadUI(str(self.ui_file))
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic.ask = self.ask
        self.logic.optional_offer = "once"  # a person answers: optional packages may be offered (once)
        self.setupPanel()
        for name, signal, slot in self.CONNECTIONS:
            getattr(self.ui, name).connect(signal, getattr(self, slot))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def setupPanel(self) -> None:
        """Fill the selectors, before the signals are connected (subclasses)."""

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.entered = True
        self.initializeParameterNode()

    def exit(self) -> None:
        self.entered = False

    # ------------------------------------------------------------------------------------------ parameter node
    def onSceneStartClose(self, caller, event) -> None:
        self.params = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.entered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Selections live in the scene's parameter node (saved with the scene); the panel shows them."""
        self.params = self.parameters(slicer.mrmlScene)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self) -> None:
        """Show the parameter node in the panel (subclasses)."""

    # ------------------------------------------------------------------------------------------ messages
    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)  # called from the polling timer: no processEvents needed

    def ask(self, question: str) -> bool:
        """An OK/Cancel question, never under a busy cursor."""
        return ask_without_busy_cursor(
            question, lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=TITLE))

    def showError(self, message: str, details: Optional[str] = None) -> None:
        if details:
            slicer.util.errorDisplay(message, windowTitle=TITLE, detailedText=details)
        else:
            slicer.util.errorDisplay(message, windowTitle=TITLE)

    def errors(self, what: str):
        """``with self.errors("X could not start"):`` around an action: the one error boundary of the panel."""
        return error_boundary(what, self.showError)


class PanelHost:
    """Mixed into a module file's ``ScriptedLoadableModuleWidget`` (before it): hosts one :class:`ModuleWidget`,
    forwards enter/exit/cleanup to it, and reloads the libraries named in ``LIBRARIES`` (after LoGoNetLib)
    before Slicer reloads the module file itself."""

    #: The module's own library packages, reloaded by "Reload" in developer mode.
    LIBRARIES: tuple = ()
    panel: Optional[ModuleWidget] = None

    def hostPanel(self, panel: ModuleWidget) -> None:
        panel.setup()
        self.layout.addWidget(panel.uiWidget)
        self.panel = panel
        self.logic = panel.logic  # the console's way in: slicer.modules.<name>.widgetRepresentation().self().logic

    def enter(self) -> None:
        if self.panel is not None:
            self.panel.enter()

    def exit(self) -> None:
        if self.panel is not None:
            self.panel.exit()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cleanup()

    def onReload(self) -> None:
        from . import reload_libraries

        reload_libraries(*self.LIBRARIES)
        super().onReload()  # ScriptedLoadableModuleWidget's: reloads the module file


__all__ = ["DEVICE_CHOICES", "ModuleWidget", "PanelHost", "describe_module", "ask_without_busy_cursor", "busy_cursor",
           "organ_summary"]
