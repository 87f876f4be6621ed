"""``logonet bench speed``: size, multiply-adds, forward time and peak memory per 96^3 patch for LoGoNet, ULKANet
and the MONAI baselines, as ratios to LoGoNet-S; the batched local branch against the one-by-one loop; LoGoNet-S
in float32, bfloat16 autocast and under ``torch.compile``.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Sequence

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
VARIANT_COLUMNS: List[common.Column] = [
    ("variant", "variant", ""), ("median_s", "forward s (median)", ".3f"), ("speedup", "speed-up vs float32", ".2f"),
    ("max_abs_diff", "max abs diff vs float32", ".2e"), ("first_call_s", "first call s", ".1f"),
    ("status", "status", "")]


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
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
        row["gmacs"] = count_macs(model, size) / 1e9
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
            row["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
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


def run(args: argparse.Namespace) -> int:
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
    rows: List[Dict[str, Any]] = []
    for index, spec in common.iterate_jobs(reporter, specs, "models"):
        reporter.emit("stage", stage="model", model=spec)
        try:
            rows.append(measure_model(spec, args.size, args.out_channels, device, args.warmup, runs))
        except (RuntimeError, ValueError, MemoryError) as error:  # e.g. CUDA out of memory: reported, not fatal
            rows.append({"model": spec, "size": args.size, "status": f"failed: {type(error).__name__}: {error}"[:160]})
            reporter.emit("warning", message=f"{spec}: {error}")
        common.release_memory()
    ref = add_ratios(rows)
    sections = [common.Section(f"Networks at 1x1x{args.size}^3, {args.out_channels} classes", rows, MODEL_COLUMNS,
                               "speed.csv",
                               note=f"Median of {runs} timed forward passes after {args.warmup} warm-up; "
                                    "peak memory = weights + activations ("
                                    + ("max allocated" if device.type == "cuda" else "process RSS") + ").")]
    if not args.no_variants and any(s.startswith("logonet") for s in specs):
        reporter.emit("stage", stage="variants")
        model = _build(REFERENCE, args.out_channels, args.size).to(device)
        sections.append(common.Section("LoGoNet-S local branch: batched vs loop", local_branch_rows(
            model, args.size, device, args.warmup, runs), LOCAL_COLUMNS, "speed_local.csv"))
        sections.append(common.Section("LoGoNet-S forward time by part", profile_rows(
            model, args.size, device, args.warmup, runs), PROFILE_COLUMNS, "speed_profile.csv"))
        variants = variant_rows(model, args.size, device, args.warmup, runs, with_compile)
        del model
        common.release_memory()
        if "swinunetr" in specs:  # the same precisions for the transformer peer: a like-for-like bf16 ratio
            reporter.emit("stage", stage="variants", model="swinunetr")
            swin_model = _build("swinunetr", args.out_channels, args.size).to(device)
            variants += variant_rows(swin_model, args.size, device, args.warmup, runs, None, label="SwinUNETR-48")
            del swin_model
        sections.append(common.Section("Precision and compilation", variants, VARIANT_COLUMNS, "speed_variants.csv",
                                       note="Speed-up against the same network's float32 row."))
    notes = []
    swin = next((r for r in rows if r["model"] == "swinunetr" and r.get("status") == "ok"), None)
    if ref and swin:
        value = ref["forward_s"] / swin["forward_s"]
        notes.append(f"LoGoNet-S / SwinUNETR-48 forward time: {value:.2f}x: target <= 0.6x "
                     f"{common.verdict(value <= 0.6)} (the paper reports 0.87x on a GPU).")
    if len(sections) > 1:
        local = sections[1].rows[0]
        notes.append(f"Batched local branch speed-up over the loop: {local['speedup_vs_loop']:.2f}x: target >= 1.3x "
                     f"{common.verdict(local['speedup_vs_loop'] >= 1.3)}.")
    if len(sections) > 3:
        by_variant = {r["variant"]: r.get("median_s") for r in sections[3].rows}
        bf16 = common.ratio(by_variant.get("LoGoNet-S bfloat16 autocast"),
                            by_variant.get("SwinUNETR-48 bfloat16 autocast"))
        if bf16 == bf16:  # not NaN
            notes.append(f"Both in bfloat16 autocast: LoGoNet-S / SwinUNETR-48 = {bf16:.2f}x.")
    return common.finish(args, reporter, "speed", "Speed and size", machine, sections, notes)
