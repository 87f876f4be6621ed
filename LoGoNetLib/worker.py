"""What the two module logics share: their collaborators, the first-use package check, and launching a worker.

:class:`WorkerLogic` is the base of LoGoNetSegment's and LoGoNetTrain's logics. Every collaborator is
injectable (the model catalog, the package installer, the command that runs the core, the question asked
before an install), so tests run a logic with fakes and the fake worker. :meth:`WorkerLogic.launch` is the one
place that starts a :class:`~LoGoNetLib.process.Task`'s worker: environment, callbacks, then either waiting
(scripting, self-tests) or polling from Slicer's event loop (the GUI).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from .catalog import ModelCatalog
from .core import logonet_command, subprocess_env
from .errors import LoGoNetError
from .install import NoInstall
from .process import RUNNING, BackgroundProcess, Task, describe_command, schedule_polling

Log = Callable[[str], None]


def no_log(text: str) -> None:
    """A log callback that drops the text (a logic used without a log box)."""


class WorkerLogic:
    """Runs ``logonet`` commands as background tasks; one task at a time per logic."""

    def __init__(self, catalog: Optional[ModelCatalog] = None, installer=None,
                 command_prefix: Optional[Sequence[str]] = None, ask: Optional[Callable[[str], bool]] = None) -> None:
        self.catalog = catalog or ModelCatalog()
        self.installer = installer or NoInstall()
        self.command_prefix = list(command_prefix) if command_prefix else None
        self.ask = ask or (lambda question: True)
        self.task: Optional[Task] = None
        self.installing = False  # the first-use package install is running (Apply/Start must stay disabled)
        # Offer optional packages on a run? "no" for scripts (nobody to answer); the module widget, which asks a
        # person, sets "once" (LoGoNetLib.install.OPTIONAL_OFFERS).
        self.optional_offer = "no"

    def command(self, *arguments: str) -> List[str]:
        """``python -m logonet <arguments>`` (or the injected stand-in)."""
        return list(self.command_prefix or logonet_command()) + [str(a) for a in arguments]

    def ensure_ready(self, busy: str, log: Log = no_log) -> None:
        """Refuse a second run (``busy`` says why) and make sure the core's packages are installed (asking first).
        Raises :class:`LoGoNetError` with what to do."""
        if self.installing:
            raise LoGoNetError("the Python packages are being installed: wait until the install has finished")
        if self.task is not None and self.task.running:
            raise LoGoNetError(busy)
        self.installing = True
        try:
            installed = self.installer.ensure(ask=self.ask, log=log, optional=self.optional_offer)
        finally:
            self.installing = False
        if not installed.ok:
            raise LoGoNetError("; ".join(installed.problems))
        if installed.restart_needed:
            raise LoGoNetError("Python packages were updated: restart Slicer, then try again")

    def cancel(self) -> None:
        """Kill the running task's worker now (a training run is better stopped: ``stop()`` keeps a checkpoint)."""
        if self.task is not None:
            self.task.cancel()

    def launch(self, task: Task, command: Sequence[str], log: Log = no_log, wait: bool = True,
               on_event: Optional[Callable[[Dict], None]] = None,
               on_finished: Optional[Callable[[BackgroundProcess], None]] = None,
               force_cpu: bool = False, cwd: Optional[str] = None) -> Task:
        """Start ``command`` for ``task``: wait for it (``wait``) or poll it from Slicer's event loop."""
        log("Running: " + describe_command(command))
        task.process = BackgroundProcess(command, env=subprocess_env(force_cpu=force_cpu), cwd=cwd,
                                         on_event=on_event, on_log=log, on_finished=on_finished)
        task.state = RUNNING
        task.process.start()
        if wait:
            task.wait()
        else:
            schedule_polling(task)
        return task


__all__ = ["WorkerLogic", "no_log"]
