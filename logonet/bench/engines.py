"""``logonet bench engines``: is there a faster CPU engine than torch for LoGoNet? One sliding window through torch
(float32, bfloat16 autocast), ONNX Runtime and OpenVINO (float32, bfloat16), per preset at the model card's window:
median milliseconds per window, the speed-up over torch float32, and how far the logits and labels are from torch
float32's; with ``--sample-ct`` also the sample CT segmented through each engine (voxel agreement of the labels).

Issue 14's bar for adopting an engine: at least 1.5x faster than torch float32 with >= 99.9% voxel agreement on
the sample CT. Every engine runs in this one process, at ``--threads`` threads (torch, ONNX Runtime's intra-op
pool and OpenVINO's inference threads alike). An engine whose package is missing is a row saying so.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..events import ProgressReporter
from . import common

#: (engine, precision) in table order; the first is the reference.
VARIANTS: Tuple[Tuple[str, str], ...] = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"),
                                         ("onnxruntime", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"))
#: Issue 14's bar for adopting an engine.
MIN_SPEEDUP, MIN_AGREEMENT = 1.5, 0.999
ONNXRUNTIME_BF16 = ("not offered: ONNX Runtime's CPU provider has no bf16 mode (no precision hint, no bf16 "
                    "convolutions)")
SEGMENT_TORCH_BF16 = "not run: segment keeps torch at float32 on the CPU (--amp bf16 applies to the other engines)"

WINDOW_COLUMNS: List[common.Column] = [
    ("network", "network", ""), ("window", "window", ""), ("engine", "engine", ""), ("precision", "precision", ""),
    ("runs_as", "ran as", ""), ("ms_per_window", "ms per window (median)", ".1f"),
    ("speedup", "speed-up vs torch fp32", ".2f"), ("max_abs_diff", "max abs logit diff vs torch fp32", ".2e"),
    ("label_agreement", "window label agreement vs torch fp32", ".5f"), ("prepare_s", "export + load + first call s", ".1f"),
    ("status", "status", "")]
SAMPLE_COLUMNS: List[common.Column] = [
    ("model", "model", ""), ("engine", "engine", ""), ("precision", "precision", ""),
    ("inference_s", "inference s", ".2f"), ("speedup", "speed-up vs torch fp32", ".2f"),
    ("agreement", "voxel agreement vs torch fp32", ".5f"),
    ("organ_agreement", "agreement on organ voxels", ".5f"), ("status", "status", "")]


@dataclass
class EngineBenchConfig:
    """What ``logonet bench engines`` measures (the command's options, typed)."""

    presets: Sequence[str] = ("T", "S")
    #: window side(s); None: the window of ``model``'s card
    roi: Optional[Sequence[int]] = None
    #: the card whose window (and class count) the presets take, and that ``sample_ct`` segments
    model: str = "demo"
    out_channels: Optional[int] = None
    repeats: int = 5
    warmup: int = 1
    #: None: every usable core
    threads: Optional[int] = None
    engines: Sequence[str] = ("torch", "onnxruntime", "openvino")
    #: None: no whole-CT part; "sample": the sample CT (fetched); else a volume file
    sample_ct: Optional[str] = None
    out: Optional[str] = None
    progress: Optional[str] = None
    command: str = "logonet bench engines (API call)"
    seed: int = 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="T,S", help="comma-separated LoGoNet presets (default T,S)")
    parser.add_argument("--roi", type=int, default=None, help="window side (default: the --model card's window)")
    parser.add_argument("--model", default="demo", help="model card: its window and classes; segments --sample-ct")
    parser.add_argument("--out-channels", type=int, default=None, help="classes of the presets (default: the card's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant, median reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed windows after the first call (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads of every engine (default: all cores)")
    parser.add_argument("--engines", default="torch,onnxruntime,openvino", help="comma-separated engines to time")
    parser.add_argument("--sample-ct", nargs="?", const="sample", default=None, metavar="CT",
                        help="also segment the sample CT (or the CT file given) with --model through every engine "
                             "and report the voxel agreement of the labels with torch's")
    parser.add_argument("--out", default=None, help="write engines.md, engines*.csv and engines_machine.json here")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    for name, low in (("repeats", 1), ("threads", 1), ("roi", 1), ("warmup", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    config = EngineBenchConfig(
        presets=[p.strip().upper() for p in args.presets.split(",") if p.strip()],
        roi=None if args.roi is None else (args.roi,) * 3, model=args.model, out_channels=args.out_channels,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        engines=[e.strip().lower() for e in args.engines.split(",") if e.strip()], sample_ct=args.sample_ct,
        out=args.out, progress=args.progress, command=common.command_line(args, "engines"))
    bench_engines(config)
    return 0


# ----------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------
def bench_engines(config: EngineBenchConfig) -> Dict[str, Any]:
    """Time every engine on one window per preset (and segment ``sample_ct``); print the tables, write them to
    ``config.out`` when given. Returns ``{"windows": rows, "sample": rows, "machine": ..., "notes": ...}``."""
    from .. import modelcard
    from ..events import reporter_for

    _check(config)
    threads = int(config.threads or common.usable_cores())
    torch.set_num_threads(threads)
    reporter = reporter_for(config.progress)
    card = modelcard.load_model(config.model)
    roi = tuple(int(r) for r in config.roi) if config.roi else card.roi_size
    classes = int(config.out_channels or card.out_channels)
    machine = common.describe_machine(torch.device("cpu"))
    machine["engine_versions"] = engine_versions()
    reporter.emit("start", total=len(config.presets), benchmark="engines", threads=threads)
    windows: List[Dict[str, Any]] = []
    for _, preset in common.iterate_jobs(reporter, list(config.presets), "presets"):
        windows += preset_rows(preset, roi, classes, config, threads, reporter)
    sample = sample_rows(config, reporter) if config.sample_ct else []
    notes = [f"Engines: {machine['engine_versions']}; {threads} thread(s) each; input = uniform noise in [0, 1] "
             f"(a windowed CT's range), seed {config.seed}."] + verdicts(windows, sample)
    machine["load_average_end"] = common.load_average()
    sections = [common.Section(f"One window (1x1x{'x'.join(map(str, roi))}, {classes} classes) per engine", windows,
                               WINDOW_COLUMNS, "engines.csv",
                               note=f"Median of {config.repeats} windows after the first call and {config.warmup} "
                                    "warm-up; random weights (seed 0); speed-up = torch fp32 ms / the row's ms.")]
    if sample:
        sections.append(common.Section(f"The sample CT segmented with {config.model} through each engine", sample,
                                       SAMPLE_COLUMNS, "engines_sample.csv",
                                       note="Labels on the CT's grid against torch fp32's; organ voxels = voxels "
                                            "either run labels as an organ; inference s = the whole sliding window."))
    with tempfile.TemporaryDirectory(prefix="logonet-bench-engines-") as tmp:
        path = common.write_report(config.out or tmp, "engines", "CPU engines", config.command, machine, sections,
                                   notes)
        text = path.read_text()
    reporter.emit("done", outputs=[str(path)] if config.out else [])
    if reporter.mode != "jsonl":
        print(text)
    return {"windows": windows, "sample": sample, "machine": machine, "notes": notes}


def _check(config: EngineBenchConfig) -> None:
    from .. import engines
    from ..errors import UserError
    from ..nets import PRESETS

    bad = [e for e in config.engines if e not in engines.ENGINES]
    if bad:
        raise UserError(f"--engines: unknown {', '.join(bad)}; choose from {', '.join(engines.ENGINES)}")
    bad = [p for p in config.presets if p.upper() not in PRESETS]
    if bad or not config.presets:
        raise UserError(f"--presets: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(PRESETS)}")


def engine_versions() -> str:
    """``torch 2.x, onnxruntime 1.x, openvino 2026.x`` (the optional ones only where installed)."""
    from .. import engines

    parts = [f"torch {torch.__version__}"]
    for name in ("onnxruntime", "openvino"):
        try:
            module = engines.import_engine(name)
        except ImportError:
            parts.append(f"{name} not installed")
            continue
        version = getattr(module, "__version__", None) or module.get_version()
        parts.append(f"{name} {str(version).split('-')[0]}")
    return ", ".join(parts)


def _wanted(config: EngineBenchConfig) -> List[Tuple[str, str]]:
    """The variants to run: torch fp32 always (the reference), the others of ``config.engines``."""
    return [v for v in VARIANTS if v == ("torch", "fp32") or v[0] in config.engines]


def _unavailable(engine: str, precision: str) -> Optional[str]:
    """Why a variant cannot run here, or None."""
    from .. import engines

    if engine == "onnxruntime" and precision == "bf16":
        return ONNXRUNTIME_BF16
    if not engines.installed(engine):
        return f"not installed ({engines.INSTALL_HINT})"
    return None


def preset_rows(preset: str, roi: Sequence[int], classes: int, config: EngineBenchConfig, threads: int,
                reporter: ProgressReporter) -> List[Dict[str, Any]]:
    """One row per variant for LoGoNet-``preset`` (random weights) on one window of ``roi``."""
    from ..nets import build_model

    torch.manual_seed(config.seed)
    net = build_model("logonet", out_channels=classes, preset=preset).eval()
    x = torch.rand(1, 1, *roi, generator=torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        reference = net(x).float()
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="logonet-bench-engines-") as tmp:  # random weights: nothing to cache
        for engine, precision in _wanted(config):
            reporter.emit("stage", stage="measure", network=f"LoGoNet-{preset}", engine=engine, precision=precision)
            row: Dict[str, Any] = {"network": f"LoGoNet-{preset}", "window": "x".join(map(str, roi)),
                                   "engine": engine, "precision": precision}
            row.update(measure_variant(net, engine, precision, roi, Path(tmp), x, reference, config, threads))
            rows.append(row)
    del net
    common.release_memory()
    base = rows[0].get("ms_per_window")  # torch fp32
    for row in rows:
        row["speedup"] = common.ratio(base, row.get("ms_per_window"))
    return rows


def measure_variant(net: torch.nn.Module, engine: str, precision: str, roi: Sequence[int], folder: Path,
                    x: torch.Tensor, reference: torch.Tensor, config: EngineBenchConfig,
                    threads: int) -> Dict[str, Any]:
    """Milliseconds per window (median), logit and label distance to ``reference``; a variant that cannot run
    or fails is a status, not the end of the benchmark."""
    from .. import engines

    why = _unavailable(engine, precision)
    if why:
        return {"status": why}
    try:
        start = time.perf_counter()
        forward = engines.window_forward(net, engine, roi, folder, precision=precision, threads=threads)
        out = forward(x)
        prepare_s = time.perf_counter() - start
        times = common.time_calls(lambda: forward(x), torch.device("cpu"), config.warmup, config.repeats)
    except Exception as error:  # noqa: BLE001 - a variant that fails here is a result
        return {"status": common.failure_status(error, width=160)}
    return {"runs_as": getattr(forward, "runs_as", precision), "ms_per_window": common.median(times) * 1000.0,
            "runs_ms": " ".join(f"{t * 1000.0:.1f}" for t in times), "prepare_s": prepare_s,
            "max_abs_diff": float((out.float() - reference).abs().max()),
            "label_agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()), "status": "ok"}


def sample_rows(config: EngineBenchConfig, reporter: ProgressReporter) -> List[Dict[str, Any]]:
    """The CT segmented by ``config.model`` through each engine, labels compared with torch fp32's (the first)."""
    import numpy as np
    import SimpleITK as sitk

    from ..data import volumes
    from ..infer import Predictor

    if config.sample_ct == "sample":
        from ..data.sample import fetch_sample

        path = fetch_sample()["ct"]
    else:
        path = str(config.sample_ct)
    image = volumes.read_image(path)
    rows: List[Dict[str, Any]] = []
    reference: Optional[np.ndarray] = None
    for engine, precision in _wanted(config):
        reporter.emit("stage", stage="segment", engine=engine, precision=precision)
        row: Dict[str, Any] = {"model": config.model, "engine": engine, "precision": precision}
        why = SEGMENT_TORCH_BF16 if (engine, precision) == ("torch", "bf16") else _unavailable(engine, precision)
        notices = common.WarningRecorder()
        predictor = None if why else Predictor(config.model, device="cpu", amp="bf16" if precision == "bf16" else "off",
                                               engine=engine, reporter=notices)
        if predictor is not None and predictor.engine != engine:
            why = "fell back to torch: " + " ".join(notices.messages)
        if why:
            rows.append({**row, "status": why})
            continue
        labels, timings = predictor.predict(image)
        array = sitk.GetArrayFromImage(labels)
        reference = array if reference is None else reference
        organs = (array > 0) | (reference > 0)
        row.update(inference_s=timings["inference"], agreement=float((array == reference).mean()),
                   organ_agreement=float((array == reference)[organs].mean()) if organs.any() else 1.0, status="ok")
        rows.append(row)
    base = rows[0].get("inference_s")
    for row in rows:
        row["speedup"] = common.ratio(base, row.get("inference_s"))
    return rows


def verdicts(windows: Sequence[Dict[str, Any]], sample: Sequence[Dict[str, Any]]) -> List[str]:
    """Issue 14's bar, stated against this run: per network the fastest other variant's speed-up, per engine the
    sample CT's voxel agreement."""
    notes: List[str] = []
    for network in dict.fromkeys(r["network"] for r in windows):
        others = [r for r in windows if r["network"] == network and r.get("status") == "ok"
                  and (r["engine"], r["precision"]) != ("torch", "fp32")]
        best = max(others, key=lambda r: r.get("speedup", 0.0), default=None)
        if best is not None:
            notes.append(f"{network}: fastest other variant {best['engine']} {best['precision']} at "
                         f"{best['speedup']:.2f}x torch fp32: target >= {MIN_SPEEDUP}x "
                         f"{common.verdict(best['speedup'] >= MIN_SPEEDUP)}.")
    for row in sample:
        if row.get("status") == "ok" and (row["engine"], row["precision"]) != ("torch", "fp32"):
            notes.append(f"Sample CT, {row['engine']} {row['precision']}: {100 * row['agreement']:.3f}% of the voxels "
                         f"labelled as torch fp32 labels them: target >= {100 * MIN_AGREEMENT:.1f}% "
                         f"{common.verdict(row['agreement'] >= MIN_AGREEMENT)}.")
    return notes
