"""``logonet bench speed | volume | accuracy | ssl | gpu | engines | report``: benchmarks against the paper's peers,
and of the CPU engines that can run LoGoNet.

Each measuring sub-command writes ``OUT/<name>.md`` (its tables, the exact command, the machine), one CSV per
table and ``OUT/<name>_machine.json``; ``--quick`` is the few-minute variant. ``report`` pastes the ``.md`` files
verbatim into ``docs/benchmarks.md`` between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Dict, Tuple

#: sub-command -> (module in this package, one-line help)
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "speed": ("speed", "params, MACs, forward time and peak memory per patch; local branch; bf16; torch.compile"),
    "volume": ("volume", "whole-volume segmentation time and peak memory per stage"),
    "accuracy": ("accuracy", "Dice per organ on held-out phantoms, every model trained with the same budget"),
    "ssl": ("selfsup", "SSL pre-training vs training from scratch with 2 and 4 labelled phantoms, several seeds"),
    "gpu": ("gpu", "the prepared one-GPU run: per-case time and memory (fp32/fp16/bf16/channels_last/compile), "
                   "out-of-memory fallback, training step"),
    "engines": ("engines", "CPU engines per window: torch vs ONNX Runtime vs OpenVINO, fp32 and bf16; with "
                           "--sample-ct the labels each gives on the sample CT"),
    "report": ("report", "paste the benchmark .md files into docs/benchmarks.md"),
}


def _module(name: str):
    return importlib.import_module(f"{__name__}.{SUBCOMMANDS[name][0]}")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        _module(name).configure(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return int(_module(args.bench).run(args) or 0)
