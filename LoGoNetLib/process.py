"""Run ``logonet`` in a separate process and follow its ``--progress jsonl`` output.

:class:`BackgroundProcess` starts the worker, a reader thread puts its output lines on a queue and
:meth:`BackgroundProcess.poll` (called by a QTimer in the GUI, or in a loop by :meth:`wait`) turns them into
callbacks: ``on_event(dict)`` for protocol events and ``on_log(str)`` for everything. ``cancel()`` kills the
whole process tree; ``stop(stop_file=...)`` first asks politely (it creates the trainer's stop file, which works
on every OS, so a trainer saves a checkpoint) and kills only after a grace period; a stopped run ends as
``stopped`` however it exited. :class:`Task` is what a logic hands to its widget: one run of a worker, with the
same running/poll/wait/cancel/stop for every kind of run. Nothing here imports Qt or Slicer.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from logonet.events import parse_event_line

from .messages import describe_event

#: Exit codes a finished task can report besides the process's own.
USER_CANCELLED = 1001
DID_NOT_RUN = 1002

IDLE, RUNNING, STOPPING, CANCELLING, SUCCEEDED, FAILED, CANCELLED, STOPPED = (
    "idle", "running", "stopping", "cancelling", "succeeded", "failed", "cancelled", "stopped")


def _children(pid: int) -> List:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with Slicer
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.Error, OSError, IndexError, ValueError):
        # psutil scans every /proc/<pid>/stat: a process that exits during the scan (the worker itself while it
        # stops, or anyone else's) can surface as a parse error. The process-group signal still reaches the tree.
        return []


def _in_group(pid: int, group: int) -> bool:
    try:
        return os.getpgid(pid) == group
    except OSError:  # gone already
        return True


def kill_tree(process: "subprocess.Popen", sig: Optional[int] = None) -> None:
    """Send ``sig`` (default: kill) once to the process and each of its descendants (the launcher is only the
    parent).

    Once only matters for SIGINT: the trainer takes a first SIGINT as "checkpoint and stop" and a second one as
    "abort now" (Ctrl-C twice), so a signal sent to the process group must not be sent again to its members.
    """
    if process.poll() is not None and not _children(process.pid):
        return
    kids = _children(process.pid)
    if sig is None:
        sig = signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM
    targets = kids + [process]
    if os.name == "posix":
        try:
            os.killpg(process.pid, sig)  # started with start_new_session: its group is the whole tree
            # only the descendants that left the group (a new session of their own) still need the signal
            targets = [child for child in kids if not _in_group(child.pid, process.pid)]
        except (ProcessLookupError, PermissionError):
            pass
    for child in targets:
        try:
            if child is process:
                process.send_signal(sig)
            else:
                child.send_signal(sig)
        except Exception:  # already gone
            pass


class BackgroundProcess:
    """One worker process: start, poll, wait, stop gracefully or cancel."""

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 on_event: Optional[Callable[[Dict], None]] = None, on_log: Optional[Callable[[str], None]] = None,
                 on_finished: Optional[Callable[["BackgroundProcess"], None]] = None) -> None:
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.on_event = on_event
        self.on_log = on_log
        self.on_finished = on_finished
        self.state = IDLE
        self.returncode: Optional[int] = None
        self.events: List[Dict] = []
        self.log_tail: List[str] = []
        self.error_message: Optional[str] = None
        self._process: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._reader_done = False
        self._stop_deadline: Optional[float] = None
        self.killed_after_stop = False  # the worker ignored the stop request for the whole grace period

    # -------------------------------------------------------------------------------------------------- start
    def start(self) -> "BackgroundProcess":
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                      cwd=self.cwd, bufsize=1, universal_newlines=True, encoding="utf-8", errors="replace")
        if os.name == "posix":
            kwargs["start_new_session"] = True
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self._process = subprocess.Popen(self.command, **kwargs)
        except OSError as error:
            self.state, self.returncode = FAILED, DID_NOT_RUN
            self.error_message = f"could not start {self.command[0]}: {error}"
            self._finish()
            return self
        self.state = RUNNING
        self._reader = threading.Thread(target=self._read, name="logonet-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._queue.put(line.rstrip("\r\n"))
        self._queue.put(None)

    # -------------------------------------------------------------------------------------------------- drive
    @property
    def running(self) -> bool:
        return self.state in (RUNNING, STOPPING, CANCELLING)

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def poll(self) -> bool:
        """Handle queued output; return True while the task is still running."""
        if not self.running:
            return False
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._reader_done = True
                break
            self._handle_line(line)
        if self.state == STOPPING and self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
            self._stop_deadline = None  # did not stop in time: kill it (still a stop: the last checkpoint stays)
            self.killed_after_stop = True
            kill_tree(self._process)
        if self._reader_done and self._process is not None and self._process.poll() is not None:
            self.returncode = self._process.returncode
            if self.state == CANCELLING:
                self.state, self.returncode = CANCELLED, USER_CANCELLED
            elif self.returncode == 0:
                self.state = SUCCEEDED
            elif self.state == STOPPING:
                # Stopped on request: after saving what it had (exit 130), or killed after the grace period
                # (the checkpoint of the last finished epoch is still there). Never a "failure".
                self.state = STOPPED
            else:
                self.state = FAILED
                if not self.error_message:
                    self.error_message = self._guess_error()
            self._finish()
            return False
        return True

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05,
             idle: Optional[Callable[[], None]] = None) -> str:
        """Block until the process ends (``idle`` is called between polls, e.g. to process GUI events)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            if idle is not None:
                idle()
            time.sleep(interval)
        return self.state

    def stop(self, grace_s: float = 120.0, stop_file: Optional[str] = None) -> None:
        """Ask the worker to stop and kill it after ``grace_s``.

        With ``stop_file`` (what the trainers watch: ``<out>/STOP``) the request is that file, which works on
        every OS: on Windows no signal reaches a windowless child of a GUI process. Without it, the worker gets
        one SIGINT (POSIX only)."""
        if self.state != RUNNING or self._process is None:
            return
        self.state = STOPPING
        self._stop_deadline = time.monotonic() + grace_s
        if stop_file is not None:
            try:
                with open(stop_file, "w", encoding="utf-8") as handle:
                    handle.write("stop requested by LoGoNet\n")
                return
            except OSError:
                pass  # cannot write there: fall back to the signal, or to the kill after grace_s
        if os.name == "posix":
            kill_tree(self._process, signal.SIGINT)

    def cancel(self) -> None:
        """Kill the whole process tree now; the task ends as cancelled (outputs must be discarded)."""
        if not self.running or self._process is None:
            return
        self.state = CANCELLING
        kill_tree(self._process)

    # -------------------------------------------------------------------------------------------------- output
    def _handle_line(self, line: str) -> None:
        event = parse_event_line(line)
        if event is not None:
            self.events.append(event)
            if event.get("event") == "error" and event.get("message"):
                self.error_message = str(event["message"])
            if self.on_event is not None:
                self.on_event(event)
            text = describe_event(event)  # a sentence, or None for the per-window progress lines
        else:
            self.log_tail = (self.log_tail + [line])[-40:]
            text = line
        if self.on_log is not None and text is not None:
            self.on_log(text)

    def _guess_error(self) -> str:
        """The most useful line of a failed run: the CLI's 'error:' line, else the last line printed."""
        for line in reversed(self.log_tail):
            if "error:" in line.lower() or line.startswith(("UserError", "RuntimeError", "ValueError")):
                return line.strip()
        lines = [line for line in self.log_tail if line.strip()]
        if lines:
            return lines[-1].strip()
        return f"the worker process exited with code {self.returncode}"

    def _finish(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            try:
                self._process.stdout.close()
            except OSError:
                pass
        if self.on_finished is not None:
            self.on_finished(self)


class Task:
    """One run of a worker as a logic reports it: ``state``, ``error_message`` and its :class:`BackgroundProcess`.

    Segmentation, sample download and training runs subclass it and add what they produce; running, polling,
    waiting (with Slicer's events pumped, so the GUI stays alive), cancelling and stopping are the same for all.
    """

    #: How often the GUI's timer polls the worker (ms).
    poll_interval_ms = 200

    def __init__(self) -> None:
        self.process: Optional[BackgroundProcess] = None
        self.state = IDLE
        self.error_message: Optional[str] = None
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def poll(self) -> bool:
        """Handle the worker's queued output; True while it runs."""
        return self.process.poll() if self.process is not None else False

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the run ends (cancelled after ``timeout``); Slicer's events are processed meanwhile."""
        app = getattr(sys.modules.get("slicer"), "app", None)
        idle = getattr(app, "processEvents", None)
        if self.process is not None:
            self.process.wait(timeout=timeout, idle=idle)
        return self.state

    def cancel(self) -> None:
        """Kill the worker and its children now; the run ends as cancelled."""
        if self.process is not None:
            self.process.cancel()

    def stop(self, grace_s: float = 120.0, stop_file: Optional[str] = None) -> None:
        """Ask the worker to stop (``stop_file``, else SIGINT) and kill it after ``grace_s``."""
        if self.process is not None:
            self.process.stop(grace_s=grace_s, stop_file=stop_file)


def schedule_polling(task, interval_ms: Optional[int] = None) -> None:
    """Inside Slicer a QTimer keeps calling ``task.poll()`` (every ``task.poll_interval_ms``) until it returns
    False; headless callers poll (or ``wait()``) themselves."""
    if interval_ms is None:
        interval_ms = getattr(task, "poll_interval_ms", 200)
    try:
        import qt
    except ImportError:
        return
    if not hasattr(qt, "QTimer"):  # a test stub
        return

    def tick():
        if task.poll():
            qt.QTimer.singleShot(interval_ms, tick)

    qt.QTimer.singleShot(interval_ms, tick)


def describe_command(command: Sequence[str]) -> str:
    """A copy-pasteable version of a command line for the log."""
    import shlex

    if os.name == "posix":
        return " ".join(shlex.quote(str(c)) for c in command)
    return subprocess.list2cmdline([str(c) for c in command])  # pragma: no cover


__all__ = ["BackgroundProcess", "Task", "kill_tree", "describe_command", "schedule_polling", "USER_CANCELLED", "DID_NOT_RUN",
           "IDLE", "RUNNING", "STOPPING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED", "STOPPED"]
