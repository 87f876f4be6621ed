"""``logonet bench speed``: size, multiply-adds, forward time and peak memory per 96^3 patch for LoGoNet, ULKANet
and the MONAI baselines, as ratios to LoGoNet-S; the batched local branch against the one-by-one loop; LoGoNet-S
in float32, bfloat16 autocast and under ``torch.compile``; LoGoNet-S's operators by self CPU time (torch.profiler).

``--threads 1,2`` (a list), ``--busy-core`` or ``--rounds R`` measure a *series*: every thread count (idle, and
with one CPU-burning process when ``--busy-core``) in a fresh ``logonet bench speed`` process of its own, ``R``
rounds in turns, and a table of time at N threads / time at the first count per model. One process per
measurement because torch's intra-op (OpenMP) pool is sized when it starts and does not reliably shrink or
re-grow under ``torch.set_num_threads`` (idle pool threads may keep spinning), and because allocator and cache
state would otherwise carry from one measurement into the next; the child is also started with
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = N so every library's pool has N threads from the start.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import common

REFERENCE = "logonet:S"
FULL_MODELS = ["logonet:S", "logonet:L", "logonet:T", "ulkanet:S", "ulkanet:L", "ulkanet:T", "swinunetr", "unetr",
               "segresnetvae", "dynunet", "unetplusplus", "attentionunet"]
QUICK_MODELS = ["logonet:S", "logonet:T", "ulkanet:S", "swinunetr"]

MODEL_COLUMNS: List[common.Column] = [
    ("model", "model", ""), ("params_m", "params (M)", ".2f"), ("gmacs", "GMACs", ".1f"),
    ("forward_s", "forward s (median)", ".3f"), ("peak_mib", "peak MiB", ".0f"),
    ("params_ratio", "params / LoGoNet-S", ".2f"), ("macs_ratio", "MACs / LoGoNet-S", ".2f"),
    ("time_ratio", "time / LoGoNet-S", ".2f"), ("mem_ratio", "memory / LoGoNet-S", ".2f"), ("status", "status", "")]
LOCAL_COLUMNS: List[common.Column] = [
    ("path", "local branch", ""), ("median_s", "median s", ".3f"), ("speedup_vs_loop", "speed-up vs loop", ".2f"),
    ("max_abs_diff", "max abs difference", ".2e")]
PROFILE_COLUMNS: List[common.Column] = [
    ("part", "LoGoNet-S part", ""), ("median_s", "median s", ".3f"), ("share", "share of the parts", ".2f")]
OPS_COLUMNS: List[common.Column] = [
    ("threads", "threads", ""), ("load", "load", ""), ("rank", "#", ""), ("operator", "operator", ""),
    ("self_ms", "self CPU ms per forward", ".1f"), ("share", "share of self CPU", ".3f"),
    ("calls", "calls per forward", ".0f")]
THREADS_COLUMNS: List[common.Column] = [
    ("model", "model", ""), ("load", "load", ""), ("threads", "threads", ""),
    ("forward_s", "forward s (median over rounds)", ".3f"), ("ratio_vs_base", "time / time at base threads", ".2f"),
    ("busy_vs_idle", "time busy / time idle", ".2f"), ("rounds_s", "per round s", ""), ("status", "status", "")]
VARIANT_COLUMNS: List[common.Column] = [
    ("variant", "variant", ""), ("median_s", "forward s (median)", ".3f"), ("speedup", "speed-up vs float32", ".2f"),
    ("max_abs_diff", "max abs diff vs float32", ".2e"), ("first_call_s", "first call s", ".1f"),
    ("status", "status", "")]


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, thread_list=True)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated MODEL[:PRESET] (default: {','.join(FULL_MODELS)}; "
                             f"--quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--size", type=int, default=96, help="patch side (a multiple of 32; default 96)")
    parser.add_argument("--out-channels", type=int, default=14, help="classes incl. background (BTCV: 14)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--runs", type=int, default=None, help="timed calls, median reported (default 3; quick 2)")
    parser.add_argument("--no-variants", action="store_true", help="skip the local-branch and precision tables")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile (default: on, off with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--op-profile", default=REFERENCE, metavar="SPEC",
                        help=f"network whose operators are profiled by self CPU time (default {REFERENCE}; 'none': skip)")
    parser.add_argument("--top-ops", type=int, default=15, help="operators listed in the profile (default 15)")
    parser.add_argument("--busy-core", action="store_true",
                        help="measure every thread count twice, idle and with one CPU-burning process running "
                             "(each in a fresh process): how much each network loses when a core is busy")
    parser.add_argument("--rounds", type=int, default=1,
                        help="series: repeat every (threads, load) process this many times in turns, report the "
                             "median (default 1)")
    parser.add_argument("--load-label", default="idle", help=argparse.SUPPRESS)  # set by the series for its children


def _build(spec: str, out_channels: int, size: int) -> torch.nn.Module:
    from ..nets import build_model, model_info, parse_spec

    name, preset = parse_spec(spec)
    kwargs: Dict[str, Any] = model_info(name).size_kwargs(size)
    torch.manual_seed(0)
    return build_model(name, out_channels=out_channels, preset=preset, **kwargs).eval()


def measure_model(spec: str, size: int, out_channels: int, device: torch.device, warmup: int,
                  runs: int) -> Dict[str, Any]:
    """Params, MACs (fvcore, CPU), median forward seconds and peak memory of one ``(1, 1, size^3)`` forward pass.

    Peak memory = process RSS (CPU) or max allocated (CUDA) during the timed passes, minus the level before the
    model was built: weights plus activations.
    """
    from ..nets.complexity import count_macs, count_parameters

    common.release_memory()
    row: Dict[str, Any] = {"model": spec, "size": size}
    with common.PeakMemory(device) as memory:
        model = _build(spec, out_channels, size)
        row["params_m"] = count_parameters(model) / 1e6
        try:
            row["gmacs"] = count_macs(model, size) / 1e9
        except ModuleNotFoundError:  # fvcore is the optional 'bench' extra: the times do not need it
            row["gmacs"] = None
        model = model.to(device)
        x = torch.randn(1, 1, size, size, size, device=device)
        with torch.no_grad():
            times = common.time_calls(lambda: model(x), device, warmup, runs)
    row.update(forward_s=common.median(times), forward_runs_s=" ".join(f"{t:.3f}" for t in times),
               peak_mib=memory.peak_mib - memory.baseline_mib, status="ok")
    return row


def local_branch_rows(model: torch.nn.Module, size: int, device: torch.device, warmup: int,
                      runs: int) -> List[Dict[str, Any]]:
    """The eight local networks as one grouped computation vs one by one (same weights, same input)."""
    x = torch.randn(1, 1, size, size, size, device=device)
    networks = model.unpacked_local_networks()
    with torch.no_grad():
        diff = float((model.local_branch(x) - model.local_branch_loop(x, networks)).abs().max())
        batched = common.median(common.time_calls(lambda: model.local_branch(x), device, warmup, runs))
        loop = common.median(common.time_calls(lambda: model.local_branch_loop(x, networks), device, warmup, runs))
    return [{"path": "batched (grouped convolutions)", "median_s": batched, "speedup_vs_loop": loop / batched,
             "max_abs_diff": diff},
            {"path": "loop (8 networks one by one)", "median_s": loop, "speedup_vs_loop": 1.0, "max_abs_diff": 0.0}]


def profile_rows(model: torch.nn.Module, size: int, device: torch.device, warmup: int,
                 runs: int) -> List[Dict[str, Any]]:
    """Where LoGoNet-S's forward time goes: global branch, batched local branch, fusion head."""
    x = torch.randn(1, 1, size, size, size, device=device)
    with torch.no_grad():
        logits = model.global_net(x)
        parts = [("global branch (ULKANet, 4 stages)", lambda: model.global_net(x)),
                 ("local branch (8 x 2-stage, batched)", lambda: model.local_branch(x)),
                 ("fusion head", lambda: model.fusion(logits))]
        rows = [{"part": name, "median_s": common.median(common.time_calls(fn, device, warmup, runs))}
                for name, fn in parts]
    total = sum(r["median_s"] for r in rows)
    for row in rows:
        row["share"] = row["median_s"] / total
    return rows


def variant_rows(model: torch.nn.Module, size: int, device: torch.device, warmup: int, runs: int,
                 with_compile: Optional[bool], label: str = "LoGoNet-S") -> List[Dict[str, Any]]:
    """float32, bfloat16 autocast and (where it works) torch.compile, each against float32's logits."""
    x = torch.randn(1, 1, size, size, size, device=device)
    with torch.no_grad():
        reference = model(x).float()

    def autocast_call() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x)

    candidates: List[Any] = [("float32", lambda: model(x)), ("bfloat16 autocast", autocast_call)]
    if with_compile:
        candidates.append(("torch.compile (inductor)", None))
    elif with_compile is False:
        candidates.append(("torch.compile (inductor)", "skipped (--quick or --no-compile)"))
    rows: List[Dict[str, Any]] = []
    for name, fn in candidates:
        row: Dict[str, Any] = {"variant": f"{label} {name}"}
        if isinstance(fn, str):
            rows.append({**row, "status": fn})
            continue
        try:
            if fn is None:
                compiled = torch.compile(model)
                fn = lambda: compiled(x)  # noqa: E731
            with torch.no_grad():
                t = time.perf_counter()
                out = fn()
                common.synchronize(device)
                row["first_call_s"] = time.perf_counter() - t
                row["max_abs_diff"] = float((out.float() - reference).abs().max())
                row["median_s"] = common.median(common.time_calls(fn, device, max(0, warmup - 1), runs))
            row["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - a variant that fails on this machine is a result, not a crash
            row["status"] = common.failure_status(error)
        rows.append(row)
    fp32 = rows[0].get("median_s")  # the float32 row of this network
    for row in rows:
        row["speedup"] = common.ratio(fp32, row.get("median_s"))
    return rows


def add_ratios(rows: Sequence[Dict[str, Any]], reference: str = REFERENCE) -> Optional[Dict[str, Any]]:
    """Each row's params/MACs/time/memory as a ratio to the reference row (NaN when it was not measured)."""
    ref = next((r for r in rows if r["model"] == reference and r.get("status") == "ok"), None)
    for row in rows:
        for key, value in (("params_ratio", "params_m"), ("macs_ratio", "gmacs"), ("time_ratio", "forward_s"),
                           ("mem_ratio", "peak_mib")):
            row[key] = common.ratio(row.get(value), ref.get(value)) if ref else float("nan")
    return ref


def op_profile_rows(model: torch.nn.Module, size: int, device: torch.device, warmup: int, runs: int,
                    top: int = 15) -> List[Dict[str, Any]]:
    """The ``top`` operators of ``runs`` forward passes by self CPU time (``torch.profiler``), per forward pass.

    ``share`` = the operator's self CPU time / all operators' self CPU time, so the rows show where the time
    goes whatever the thread count; the last row (``(all others)``) holds the rest, so the shares add up to 1.
    """
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 1, size, size, size, device=device)
    runs = max(1, runs)
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        common.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
            common.synchronize(device)
    events = [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages()]
    events.sort(key=lambda e: -e[1])
    total = sum(t for _, t, _ in events) or float("nan")
    rows = [{"rank": index + 1, "operator": name, "self_ms": t / 1000.0 / runs, "share": t / total,
             "calls": count / runs} for index, (name, t, count) in enumerate(events[:max(1, top)])]
    rest = events[max(1, top):]
    if rest:
        t = sum(e[1] for e in rest)
        rows.append({"rank": "", "operator": f"(all others: {len(rest)} operators)", "self_ms": t / 1000.0 / runs,
                     "share": t / total, "calls": sum(e[2] for e in rest) / runs})
    return rows


def parse_threads(text: str) -> List[int]:
    """``--threads 2`` or ``--threads 1,2`` -> ``[2]`` / ``[1, 2]`` (each >= 1, no repeats)."""
    from ..errors import UserError

    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as error:
        raise UserError(f"--threads takes a number or a comma-separated list such as 1,2; got {text!r}") from error
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise UserError(f"--threads takes distinct numbers >= 1 such as 1,2; got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    threads = parse_threads(args.threads) if isinstance(args.threads, str) else (
        list(args.threads) if isinstance(args.threads, (list, tuple)) else [int(args.threads)])
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if len(threads) > 1 or args.busy_core or args.rounds > 1:
        return run_series(args, threads)
    args.threads = threads[0]
    return run_single(args)


def _model_rows(args: argparse.Namespace, specs: Sequence[str], device: torch.device, runs: int,
                reporter: Any) -> List[Dict[str, Any]]:
    """One row per network; a network that fails (e.g. CUDA out of memory) is a reported row, not the end."""
    rows: List[Dict[str, Any]] = []
    for index, spec in common.iterate_jobs(reporter, specs, "models"):
        reporter.emit("stage", stage="model", model=spec)
        try:
            rows.append(measure_model(spec, args.size, args.out_channels, device, args.warmup, runs))
        except (RuntimeError, ValueError, MemoryError) as error:
            rows.append({"model": spec, "size": args.size, "status": f"failed: {type(error).__name__}: {error}"[:160]})
            reporter.emit("warning", message=f"{spec}: {error}")
        common.release_memory()
    return rows


def _single_notes(rows: Sequence[Dict[str, Any]], ref: Optional[Dict[str, Any]],
                  sections: Dict[str, Any]) -> List[str]:
    """The verdict lines under the tables: LoGoNet-S against SwinUNETR-48 and the batched local branch."""
    notes = []
    swin = next((r for r in rows if r["model"] == "swinunetr" and r.get("status") == "ok"), None)
    if ref and swin:
        value = ref["forward_s"] / swin["forward_s"]
        notes.append(f"LoGoNet-S / SwinUNETR-48 forward time: {value:.2f}x: target <= 0.6x "
                     f"{common.verdict(value <= 0.6)} (the paper reports 0.87x on a GPU).")
    if "speed_local.csv" in sections:
        local = sections["speed_local.csv"].rows[0]
        notes.append(f"Batched local branch speed-up over the loop: {local['speedup_vs_loop']:.2f}x: target >= 1.3x "
                     f"{common.verdict(local['speedup_vs_loop'] >= 1.3)}.")
    if "speed_variants.csv" in sections:
        by_variant = {r["variant"]: r.get("median_s") for r in sections["speed_variants.csv"].rows}
        bf16 = common.ratio(by_variant.get("LoGoNet-S bfloat16 autocast"),
                            by_variant.get("SwinUNETR-48 bfloat16 autocast"))
        if bf16 == bf16:  # not NaN
            notes.append(f"Both in bfloat16 autocast: LoGoNet-S / SwinUNETR-48 = {bf16:.2f}x.")
    return notes


def run_single(args: argparse.Namespace) -> int:
    """One thread count in this process: the networks, and unless skipped the variants and the operator profile."""
    from ..errors import UserError

    reporter, device = common.setup(args)
    if args.size < 32 or args.size % 32:
        raise UserError(f"--size must be a positive multiple of 32, got {args.size}")
    specs = [s.strip() for s in (args.models or ",".join(QUICK_MODELS if args.quick else FULL_MODELS)).split(",")
             if s.strip()]
    runs = args.runs if args.runs is not None else (2 if args.quick else 3)
    with_compile = bool(args.compile) if args.compile is not None else not args.quick
    machine = common.describe_machine(device)
    reporter.emit("start", total=len(specs), benchmark="speed", device=str(device))
    rows = _model_rows(args, specs, device, runs, reporter)
    for row in rows:
        row.update(threads=args.threads, load=args.load_label)
    ref = add_ratios(rows)
    sections = {"speed.csv": common.Section(
        f"Networks at 1x1x{args.size}^3, {args.out_channels} classes", rows, MODEL_COLUMNS, "speed.csv",
        note=f"Median of {runs} timed forward passes after {args.warmup} warm-up; peak memory = weights + "
             "activations (" + ("max allocated" if device.type == "cuda" else "process RSS") + ").")}
    if not args.no_variants and any(s.startswith("logonet") for s in specs):
        reporter.emit("stage", stage="variants")
        model = _build(REFERENCE, args.out_channels, args.size).to(device)
        sections["speed_local.csv"] = common.Section("LoGoNet-S local branch: batched vs loop", local_branch_rows(
            model, args.size, device, args.warmup, runs), LOCAL_COLUMNS, "speed_local.csv")
        sections["speed_profile.csv"] = common.Section("LoGoNet-S forward time by part", profile_rows(
            model, args.size, device, args.warmup, runs), PROFILE_COLUMNS, "speed_profile.csv")
        variants = variant_rows(model, args.size, device, args.warmup, runs, with_compile)
        del model
        common.release_memory()
        if "swinunetr" in specs:  # the same precisions for the transformer peer: a like-for-like bf16 ratio
            reporter.emit("stage", stage="variants", model="swinunetr")
            swin_model = _build("swinunetr", args.out_channels, args.size).to(device)
            variants += variant_rows(swin_model, args.size, device, args.warmup, runs, None, label="SwinUNETR-48")
            del swin_model
        sections["speed_variants.csv"] = common.Section("Precision and compilation", variants, VARIANT_COLUMNS,
                                                        "speed_variants.csv",
                                                        note="Speed-up against the same network's float32 row.")
    if args.op_profile and args.op_profile.lower() != "none":
        reporter.emit("stage", stage="op_profile", model=args.op_profile)
        model = _build(args.op_profile, args.out_channels, args.size).to(device)
        ops = op_profile_rows(model, args.size, device, args.warmup, runs, args.top_ops)
        del model
        common.release_memory()
        for row in ops:
            row.update(threads=args.threads, load=args.load_label, model=args.op_profile)
        sections["speed_ops.csv"] = common.Section(
            f"{args.op_profile} operators by self CPU time", ops, OPS_COLUMNS, "speed_ops.csv",
            note=f"torch.profiler over {runs} forward passes after {args.warmup} warm-up; self time per forward.")
    notes = _single_notes(rows, ref, sections)
    return common.finish(args, reporter, "speed", "Speed and size", machine, list(sections.values()), notes)


# ----------------------------------------------------------------------------------------------------------
# a series: several thread counts, idle and with one core busy, each in a fresh process
# ----------------------------------------------------------------------------------------------------------
#: The CPU burner: one busy Python process that ends by itself when its parent (the series) is gone.
_BURNER = ("import os, time\nparent = os.getppid()\nend = time.time() + {limit}\n"
           "while os.getppid() == parent and time.time() < end:\n    sum(range(20000))\n")


class BusyCore:
    """One CPU-burning process (a pure-Python loop: one core, no threads) while the block runs; it also ends by
    itself after ``limit_s`` or when this process dies, so a killed benchmark leaves no burner behind."""

    def __init__(self, limit_s: float = 6 * 3600.0) -> None:
        self.limit_s = limit_s
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "BusyCore":
        self.process = subprocess.Popen([sys.executable, "-c", _BURNER.format(limit=float(self.limit_s))],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        time.sleep(0.2)  # let it reach full speed before the child starts
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def child_argv(args: argparse.Namespace, specs: Sequence[str], runs: int, with_compile: bool, threads: int,
               load: str, out: Path) -> List[str]:
    """The ``logonet bench speed`` arguments of one measurement of a series (everything resolved, nothing left to
    ``--quick``'s defaults)."""
    argv = ["bench", "speed", "--out", str(out), "--threads", str(threads), "--device", args.device,
            "--models", ",".join(specs), "--size", str(args.size), "--out-channels", str(args.out_channels),
            "--warmup", str(args.warmup), "--runs", str(runs), "--op-profile", args.op_profile or "none",
            "--top-ops", str(args.top_ops), "--load-label", load, "--progress", "none",
            "--compile" if with_compile else "--no-compile"]
    if args.no_variants:
        argv.append("--no-variants")
    return argv


def _run_child(argv: Sequence[str], threads: int) -> None:
    from ..errors import UserError

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-m", "logonet", *argv], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise UserError(f"the measurement 'logonet {' '.join(argv)}' failed (exit {result.returncode}): {tail}")


def scaling_rows(measured: Dict[Tuple[str, str, int], List[float]], specs: Sequence[str],
                 threads: Sequence[int], loads: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per (model, load, threads): the median over rounds, its ratio to the same model and load at
    ``threads[0]`` (the base), and with one core busy its ratio to the idle time at the same thread count."""
    rows: List[Dict[str, Any]] = []
    median: Dict[Tuple[str, str, int], float] = {k: common.median(v) for k, v in measured.items() if v}
    for spec in specs:
        for load in loads:
            for n in threads:
                value = median.get((spec, load, n), float("nan"))
                row: Dict[str, Any] = {
                    "model": spec, "load": load, "threads": n, "forward_s": value,
                    "ratio_vs_base": common.ratio(value, median.get((spec, load, threads[0]))),
                    "rounds_s": " ".join(f"{t:.3f}" for t in measured.get((spec, load, n), [])),
                    "status": "ok" if value == value else "failed"}
                if load != "idle":
                    row["busy_vs_idle"] = common.ratio(value, median.get((spec, "idle", n)))
                rows.append(row)
    return rows


def series_notes(rows: Sequence[Dict[str, Any]], threads: Sequence[int]) -> List[str]:
    """The issue's targets, stated against this run's figures."""
    by = {(r["model"], r["load"], r["threads"]): r for r in rows}
    notes: List[str] = []
    base = threads[0]
    for n in threads[1:]:
        own = by.get((REFERENCE, "idle", n), {}).get("ratio_vs_base", float("nan"))
        if own == own and base == 1 and n == 2:
            notes.append(f"LoGoNet-S at 2 threads takes {own:.2f}x its 1-thread time: target <= 0.65x "
                         f"{common.verdict(own <= 0.65)}.")
        elif own == own:
            notes.append(f"LoGoNet-S at {n} threads takes {own:.2f}x its {base}-thread time.")
    for n in threads:
        for load in ("idle", "busy"):
            value = common.ratio(by.get((REFERENCE, load, n), {}).get("forward_s"),
                                 by.get(("swinunetr", load, n), {}).get("forward_s"))
            if value == value:
                notes.append(f"LoGoNet-S / SwinUNETR-48 at {n} thread(s), {load}: {value:.2f}x: target <= 0.6x "
                             f"{common.verdict(value <= 0.6)}.")
        ours = by.get((REFERENCE, "busy", n), {}).get("busy_vs_idle", float("nan"))
        peer = by.get(("swinunetr", "busy", n), {}).get("busy_vs_idle", float("nan"))
        if ours == ours and peer == peer:
            notes.append(f"One core busy at {n} thread(s): LoGoNet-S takes {ours:.2f}x its idle time, SwinUNETR-48 "
                         f"{peer:.2f}x: target LoGoNet-S loses no more {common.verdict(ours <= peer)}.")
    return notes


def _floats(rows: List[Dict[str, Any]], keys: Sequence[str]) -> None:
    """CSV text back to numbers in place (empty cells become None)."""
    for row in rows:
        for key in keys:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None


def run_series(args: argparse.Namespace, threads: List[int]) -> int:
    """Every (round, threads, load) measurement in a fresh process, in turns; the scaling table, each
    measurement's networks table and the operator profiles, all in ``OUT``."""
    from ..errors import UserError

    if args.size < 32 or args.size % 32:
        raise UserError(f"--size must be a positive multiple of 32, got {args.size}")
    args.threads = threads[0]
    reporter, device = common.setup(args)
    specs = [s.strip() for s in (args.models or ",".join(QUICK_MODELS if args.quick else FULL_MODELS)).split(",")
             if s.strip()]
    runs = args.runs if args.runs is not None else (2 if args.quick else 3)
    with_compile = bool(args.compile) if args.compile is not None else not args.quick
    loads = ["idle", "busy"] if args.busy_core else ["idle"]
    machine = common.describe_machine(device)
    machine.update(torch_threads=",".join(str(n) for n in threads), busy_core=bool(args.busy_core), rounds=args.rounds, process_per_measurement=True)
    out = Path(args.out)
    jobs = [(r, n, load) for r in range(args.rounds) for n in threads for load in loads]
    reporter.emit("start", total=len(jobs), benchmark="speed", device=str(device), threads=threads, loads=loads)
    measured: Dict[Tuple[str, str, int], List[float]] = {}
    networks: List[Dict[str, Any]] = []
    ops: List[Dict[str, Any]] = []
    for _, (r, n, load) in common.iterate_jobs(reporter, jobs, "measurements"):
        folder = out / "speed_runs" / f"threads{n}_{load}_round{r + 1}"
        argv = child_argv(args, specs, runs, with_compile, n, load, folder)
        reporter.emit("stage", stage="measure", threads=n, load=load, round=r + 1)
        if load == "busy":
            with BusyCore():
                _run_child(argv, n)
        else:
            _run_child(argv, n)
        for row in common.read_csv(folder / "speed.csv"):
            row.update(round=r + 1, folder=str(folder.relative_to(out)))
            networks.append(row)
            if row.get("status") == "ok" and row.get("forward_s"):
                measured.setdefault((row["model"], load, n), []).append(float(row["forward_s"]))
        if r == 0 and (folder / "speed_ops.csv").is_file():
            ops += common.read_csv(folder / "speed_ops.csv")
    rows = scaling_rows(measured, specs, threads, loads)
    _floats(ops, ("self_ms", "share", "calls"))
    network_columns = [("threads", "threads", ""), ("load", "load", ""), ("round", "round", "")] + \
        [c for c in MODEL_COLUMNS if c[0] in ("model", "forward_s", "peak_mib", "time_ratio", "status")]
    _floats(networks, ("forward_s", "peak_mib", "time_ratio"))
    sections = [
        common.Section(f"Thread scaling at 1x1x{args.size}^3 (base: {threads[0]} thread(s))", rows, THREADS_COLUMNS,
                       "speed_threads.csv",
                       note=f"Each (threads, load) measured in a fresh process, {args.rounds} round(s) in turns; "
                            f"each round the median of {runs} forward passes"
                            + ("; busy = one CPU-burning process running alongside" if args.busy_core else "")
                            + ". The per-measurement tables are in speed_runs/."),
        common.Section("Networks per measurement", networks, network_columns, "speed.csv")]
    if ops:
        sections.append(common.Section(f"{args.op_profile} operators by self CPU time, per thread count and load",
                                       ops, OPS_COLUMNS, "speed_ops.csv",
                                       note="torch.profiler, first round; self CPU time per forward pass."))
    return common.finish(args, reporter, "speed", "Speed: thread scaling", machine, sections,
                         series_notes(rows, threads))
