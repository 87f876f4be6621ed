"""Parameter and multiply-add counts, with fvcore's counter (the paper's "FLOPs" are multiply-adds on 1x1x96^3).

``python -m logonet.nets.complexity [--size 96] [--out-channels 14] [MODEL[:PRESET] ...]`` prints a table.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch import nn

from .registry import build_model, parse_spec


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, size: int = 96, in_channels: int = 1) -> int:
    """Multiply-adds of one forward pass on ``(1, in_channels, size, size, size)`` (fvcore counts one per MAC)."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, in_channels, size, size, size))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        return int(analysis.total())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logonet.nets.complexity", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["ulkanet:S", "logonet:S"], help="MODEL[:PRESET] ...")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out-channels", type=int, default=14)
    args = parser.parse_args(argv)
    print(f"| model | params (M) | GMACs @{args.size}^3 |\n|---|---|---|", flush=True)
    for spec in args.models:
        name, preset = parse_spec(spec)
        model = build_model(name, out_channels=args.out_channels, preset=preset)
        print(f"| {spec} | {count_parameters(model) / 1e6:.2f} | {count_macs(model, args.size) / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
