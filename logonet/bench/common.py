"""What every ``logonet bench`` sub-command shares: its common options, the machine description, peak-memory and
timing measurement, and the writer of ``<name>.md`` (markdown tables + the command + the machine) and CSV files.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..events import ProgressReporter, reporter_for

#: (row key, column header, format) of one table column; format "" = str(), else a format spec such as ".3f".
Column = Tuple[str, str, str]
MIB = 1024.0 * 1024.0


def add_common_arguments(parser: argparse.ArgumentParser, thread_list: bool = False) -> None:
    """``thread_list``: ``--threads`` may be a comma-separated list (kept as text; the benchmark parses it)."""
    parser.add_argument("--out", default="docs/bench", help="folder for <name>.md, <name>*.csv and <name>_machine.json")
    parser.add_argument("--quick", action="store_true", help="the few-minute variant (2 CPU cores)")
    if thread_list:
        parser.add_argument("--threads", default="2", metavar="N[,N...]",
                            help="torch threads (default 2); a list such as 1,2 measures each count in a fresh process")
    else:
        parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def setup(args: argparse.Namespace) -> Tuple[ProgressReporter, torch.device]:
    """Pin torch's threads, pick the device, make the reporter."""
    from ..errors import UserError
    from ..runtime import select_device

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    return reporter_for(args.progress), select_device(args.device)


def command_line(args: argparse.Namespace, sub: str) -> str:
    """The command as typed (``logonet bench ...``, recorded by the CLI); under the API, the sub-command with a
    marker."""
    typed = getattr(args, "command_line", None)
    return typed if typed else f"logonet bench {sub} (API call)"


def describe_machine(device: torch.device) -> Dict[str, Any]:
    """CPU/GPU, cores, threads, memory, load and library versions: what the numbers depend on."""
    import monai
    import psutil

    from .. import process_setup

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu": cpu, "cpu_cores_usable": usable_cores(), "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 1024 ** 3, 1),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "load_average_start": load_average(),
        "os": platform.platform(terse=True), "python": platform.python_version(),
        "torch": torch.__version__, "monai": monai.__version__, "device": str(device),
        # how OpenMP's idle threads wait (spin or sleep) changes timings on a loaded machine; None = the default
        # (logonet's CLI sets GOMP_SPINCOUNT unless the user chose: process_setup.OPENMP_DEFAULTS)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        # glibc malloc keeping freed memory (process_setup.retain_freed_memory) removes page faults that cost up to 45%
        "malloc_retains_freed": process_setup.malloc_retains_freed,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 1024 ** 3, 1)
    return info


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except AttributeError:
        return os.cpu_count() or 1


def failure_status(error: BaseException, width: int = 120) -> str:
    """A row's status for a variant that failed on this machine: the type and the first line of the message."""
    message = str(error).splitlines()[0][:width] if str(error) else ""
    return f"failed: {type(error).__name__}: {message}"


class WarningRecorder(ProgressReporter):
    """A silent reporter that keeps the ``warning`` messages (a Predictor's fallback notices)."""

    def __init__(self) -> None:
        super().__init__("none")
        self.messages: List[str] = []

    def emit(self, event: str, step: Optional[int] = None, total: Optional[int] = None, **metrics: Any) -> None:
        if event == "warning":
            self.messages.append(str(metrics.get("message", "")))


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_line(info: Mapping[str, Any]) -> str:
    gpu = f"; GPU {info['gpu']} ({info['gpu_memory_gib']} GiB)" if "gpu" in info else ""
    end = info.get("load_average_end")
    end_load = f", {end[0]} at end" if end else ""
    wait = "".join(f", {name.upper()}={info[name]}" for name in ("omp_wait_policy", "gomp_spincount") if info.get(name))
    wait += ", malloc keeps freed memory" if info.get("malloc_retains_freed") else ""
    return (f"{info['date_utc']} UTC; {info['cpu']}, {info['cpu_cores_usable']} usable cores, torch threads "
            f"{info['torch_threads']}{wait}, {info['ram_gib']} GiB RAM, load average {info['load_average_1min']} at start"
            f"{end_load}{gpu}; device {info['device']}; {info['os']}, Python {info['python']}, torch {info['torch']}, "
            f"MONAI {info['monai']}")


# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next RSS baseline is honest."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory while the block runs, per named stage: the process RSS sampled by a thread (CPU), or
    ``torch.cuda.max_memory_allocated`` (CUDA). ``stage(name)`` switches the stage being charged.

    ``peak_mib`` / ``stage_peaks_mib``: absolute peaks; ``baseline_mib``: RSS (or allocated) at entry.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        import psutil

        self.device, self.interval_s = device, interval_s
        self._process = psutil.Process()
        self._current = "all"
        self._peaks: Dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.baseline_mib = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return self._process.memory_info().rss / MIB

    def _record(self) -> None:
        value = self._now()
        if value > self._peaks.get(self._current, 0.0):
            self._peaks[self._current] = value

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def stage(self, name: str) -> None:
        self._record()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._current = name
        self._record()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / MIB
        else:
            self.baseline_mib = self._now()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._record()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._record()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def stage_peaks_mib(self) -> Dict[str, float]:
        return dict(self._peaks)

    @property
    def peak_mib(self) -> float:
        return max(self._peaks.values(), default=0.0)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, runs: int) -> List[float]:
    """Seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(value: Any, reference: Any) -> float:
    """``value / reference``; NaN when either is missing or the reference is 0."""
    try:
        value, reference = float(value), float(reference)
    except (TypeError, ValueError):
        return float("nan")
    return value / reference if reference and math.isfinite(reference) else float("nan")


def verdict(met: bool) -> str:
    """How a note states a target: ``met`` or ``MISSED``."""
    return "met" if met else "MISSED"


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "/").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Rows as CSV (full float precision, empty for missing), written atomically."""
    from ..atomic import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else
                             (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    with atomic_write(path) as tmp:
        tmp.write_text(buffer.getvalue())


class Section:
    """One table of a benchmark: a title, rows, the columns shown in markdown, the CSV file name."""

    def __init__(self, title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], csv_name: str,
                 note: str = "") -> None:
        self.title, self.rows, self.columns, self.csv_name, self.note = title, list(rows), list(columns), csv_name, note

    def csv_columns(self) -> List[str]:
        keys = [key for key, _, _ in self.columns]
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        return keys


def write_report(out: Any, name: str, title: str, command: str, machine: Mapping[str, Any],
                 sections: Sequence[Section], notes: Sequence[str] = ()) -> Path:
    """``OUT/<name>.md`` (title, command, machine, tables, notes), one CSV per section, ``<name>_machine.json``."""
    from ..atomic import atomic_write, write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"### {title}", "", f"Command: `{command}`", "", f"Machine: {machine_line(machine)}", ""]
    for section in sections:
        write_csv(section.rows, section.csv_columns(), out / section.csv_name)
        parts += [f"**{section.title}** (`{section.csv_name}`)", "", markdown_table(section.rows, section.columns), ""]
        if section.note:
            parts += [section.note, ""]
    parts += [f"- {note}" for note in notes]
    write_json_atomic(dict(machine), out / f"{name}_machine.json")
    path = out / f"{name}.md"
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(parts).rstrip() + "\n")
    return path


def finish(args: argparse.Namespace, reporter: ProgressReporter, name: str, title: str, machine: Mapping[str, Any],
           sections: Sequence[Section], notes: Sequence[str] = ()) -> int:
    """Write the report (:func:`write_report`), emit ``done`` and show the markdown to a human; exit code 0.

    The machine description gets the load average at the end (1, 5, 15 min) next to the one at the start."""
    machine = {**machine, "load_average_end": load_average()}
    path = write_report(args.out, name, title, command_line(args, name), machine, sections, notes)
    reporter.emit("done", outputs=[str(path)])
    if reporter.mode != "jsonl":
        print(path.read_text())
    return 0


def read_csv(path: Any) -> List[Dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none)."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return float("nan"), float("nan")
    return float(statistics.mean(values)), (float(statistics.stdev(values)) if len(values) > 1 else 0.0)


def iterate_jobs(reporter: ProgressReporter, jobs: Sequence[Any], stage: str) -> Iterator[Tuple[int, Any]]:
    """Jobs with one ``progress`` event each (``stage`` = the benchmark) before the job starts."""
    for index, job in enumerate(jobs):
        reporter.emit("progress", step=index, total=len(jobs), stage=stage, job=str(job))
        yield index, job
    reporter.emit("progress", step=len(jobs), total=len(jobs), stage=stage)

