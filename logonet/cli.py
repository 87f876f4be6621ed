"""The ``logonet`` command line: ``logonet segment | finetune | pretrain | evaluate | sample | phantom | synth | bench | demo``.

Each sub-command lives in the module that does its work and exposes two functions:
``configure(parser)`` adds its arguments and ``run(args) -> int`` does the job (for training, ``run`` maps the
arguments to a typed config and calls the API). This file only dispatches, imports lazily (so ``logonet --help``
is instant) and is the one error boundary: a :class:`~logonet.errors.UserError` (or an environment ``OSError``)
becomes one line and exit code 2; anything else is a bug and keeps its traceback, printed and written to a log.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import __version__, process_setup
from .errors import UserError

#: command -> (module, one-line help)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "segment": ("logonet.infer", "segment a CT (file, DICOM folder, or folder of volumes) with a model card"),
    "finetune": ("logonet.train.finetune", "supervised fine-tuning on a labelled dataset folder"),
    "pretrain": ("logonet.ssl.pretrain", "masked self-supervised pre-training on unlabelled volumes"),
    "evaluate": ("logonet.evaluate", "per-organ Dice and 95th-percentile Hausdorff distance of a prediction against a reference"),
    "sample": ("logonet.data.sample", "fetch the sample CTs (offline-safe, via pip) and print where they are"),
    "phantom": ("logonet.data.phantom", "write synthetic abdominal CT phantoms in MSD layout"),
    "postprocess": ("logonet.postprocess", "choose per organ, on validation cases, whether segment keeps only its "
                                           "largest connected component"),
    "synth": ("logonet.data.synth", "synthetic labelled CTs from real TotalSegmentator label maps (MSD layout)"),
    "bench": ("logonet.bench", "speed, size and accuracy benchmarks against the paper's peers"),
    "demo": ("logonet.demo", "fetch the sample CT, segment it with the demo model, report Dice and time"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: command names and one-line help only; no command module is imported."""
    parser = argparse.ArgumentParser(prog="logonet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"logonet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> Tuple[argparse.ArgumentParser, object]:
    """``(parser, module)`` for one command, importing only that command's module."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"logonet {name}", description=help_text)
    module.configure(parser)  # type: ignore[attr-defined]
    return parser, module


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    process_setup.apply_openmp_defaults()  # before a command module imports torch
    process_setup.retain_freed_memory()  # before the first large tensor
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help, --version, or an unknown command (exits with argparse's message)
        parser.print_help()
        return 0
    parser, module = command_parser(argv[0])
    args = parser.parse_args(argv[1:])
    args.command_line = "logonet " + " ".join(shlex.quote(a) for a in argv)  # what a model card records
    try:
        return int(module.run(args) or 0)  # type: ignore[attr-defined]
    except UserError as error:
        return _fail(argv[0], args, str(error))
    except OSError as error:
        # The machine or the paths, not a bug: a full disk, a read-only mount, a missing permission.
        from .atomic import USER_OS_ERRNOS, os_reason

        if error.errno not in USER_OS_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        return _fail(argv[0], args, f"{where}{os_reason(error)}")
    except KeyboardInterrupt:
        print("logonet: interrupted", file=sys.stderr)
        return 130
    except Exception:
        _log_crash(args.command_line)
        raise  # a bug: the traceback is printed as usual (exit code 1)


def _fail(command: str, args: argparse.Namespace, message: str) -> int:
    """The one boundary for expected failures: one line on stderr, a JSON ``error`` event, exit code 2.

    Anything else (a bug) keeps its traceback.
    """
    message = " ".join(message.split()) or "failed"
    if getattr(args, "progress", None) == "jsonl":  # a driving program (Slicer) reads the reason from here
        from .events import ProgressReporter

        ProgressReporter("jsonl").emit("error", message=message)
    print(f"logonet {command}: error: {message}", file=sys.stderr)
    return 2


def crash_log_dir() -> Path:
    """Where tracebacks of unexpected errors are kept: ``$LOGONET_LOG_DIR``, else ``<user cache>/logonet/logs``."""
    import os

    if os.environ.get("LOGONET_LOG_DIR"):
        return Path(os.environ["LOGONET_LOG_DIR"]).expanduser()
    from .data.sample import default_cache_dir

    return default_cache_dir().parent / "logs"


def _log_crash(command_line: str) -> None:
    """Write the current exception's traceback to a log file and say where (never raises)."""
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / time.strftime("crash-%Y%m%d-%H%M%S.log")
        path.write_text(f"{command_line}\nlogonet {__version__}, Python {sys.version.split()[0]}\n\n"
                        f"{traceback.format_exc()}", encoding="utf-8")
        print(f"logonet: unexpected error (a bug, please report it); the traceback is also in {path}",
              file=sys.stderr)
    except Exception:  # the log is a courtesy: never hide the original error behind a failing write
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
