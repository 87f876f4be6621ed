"""``logonet bench gpu``: the prepared one-GPU run (under 8 minutes on one H100-class GPU).

1. Per-case time and peak memory of LoGoNet-S and SwinUNETR-48 on a BTCV-sized CT (512 x 512 x 120 voxels at
   0.8 x 0.8 x 2.5 mm, resampled to the paper's 1.5 x 1.5 x 2.0 mm): sliding window 96^3, overlap 0.5, batch 4,
   in float32, AMP float16, AMP bfloat16, channels_last_3d (+ float16) and torch.compile (+ float16). The
   paper's anchor: 5.38 s/case for LoGoNet-S, 6.16 s for SwinUNETR on one GPU.
2. The out-of-memory fallback of :class:`logonet.infer.Predictor`, forced with a small
   ``torch.cuda.set_per_process_memory_fraction``: which path finished, and its time.
3. The training step time (forward, backward, AdamW) of LoGoNet-S on one 96^3 crop, AMP.

``--tiny`` runs the same code with LoGoNet-T/SwinUNETR-12, a small volume and 64^3 windows: the CPU check
that keeps the script working where no GPU is lent.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import common

#: (name, autocast dtype, channels_last_3d, torch.compile)
VARIANTS: Tuple[Tuple[str, Optional[torch.dtype], bool, bool], ...] = (
    ("fp32", None, False, False), ("fp16", torch.float16, False, False), ("bf16", torch.bfloat16, False, False),
    ("fp16 + channels_last_3d", torch.float16, True, False), ("fp16 + torch.compile", torch.float16, False, True),
)
PARTS = ("cases", "oom", "train")
BTCV_SHAPE, BTCV_SPACING, PAPER_SPACING = (512, 512, 120), (0.8, 0.8, 2.5), (1.5, 1.5, 2.0)
PAPER_SECONDS = {"logonet:S": 5.38, "swinunetr": 6.16}

CASE_COLUMNS: List[common.Column] = [
    ("model", "model", ""), ("variant", "variant", ""), ("case_s", "s / case (median)", ".2f"),
    ("first_call_s", "first call s", ".1f"), ("peak_mib", "peak MiB", ".0f"), ("paper_s", "paper s / case", ".2f"),
    ("status", "status", "")]
OOM_COLUMNS: List[common.Column] = [
    ("memory_fraction", "memory fraction", ".3f"), ("path", "path that finished", ""), ("seconds", "s", ".1f"),
    ("status", "status", "")]
TRAIN_COLUMNS: List[common.Column] = [
    ("model", "model", ""), ("crop", "crop", ""), ("amp", "AMP", ""), ("step_s", "s / step (median)", ".3f"),
    ("peak_mib", "peak MiB", ".0f"), ("status", "status", "")]


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.set_defaults(device="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="LoGoNet-T / SwinUNETR-12, an 80x72x64 volume and 64^3 windows (CPU check of the script)")
    parser.add_argument("--runs", type=int, default=2, help="timed cases per variant after one warm-up (median)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS))
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of the plan's models (default both: logonet:S,swinunetr; "
                             "--tiny: logonet:T,swinunetr)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of: " + ", ".join(PARTS) + " (split a run across calls of a "
                             "time-limited lease: torch.compile's first calls take minutes)")


def paper_grid() -> Tuple[int, int, int]:
    """The BTCV-sized volume's grid after resampling to the paper's spacing (273 x 273 x 150)."""
    return tuple(int(round(n * s / t)) for n, s, t in zip(BTCV_SHAPE, BTCV_SPACING, PAPER_SPACING))  # type: ignore


def _plan(tiny: bool) -> Dict[str, Any]:
    if tiny:
        return {"models": {"logonet:T": {}, "swinunetr": {"feature_size": 12}}, "shape": (80, 72, 64), "roi": 64,
                "train_model": "logonet:T"}
    return {"models": {"logonet:S": {}, "swinunetr": {"feature_size": 48}}, "shape": paper_grid(), "roi": 96,
            "train_model": "logonet:S"}


def _build(spec: str, kwargs: Dict[str, Any], device: torch.device) -> torch.nn.Module:
    from ..nets import build_model, parse_spec

    name, preset = parse_spec(spec)
    torch.manual_seed(0)
    return build_model(name, out_channels=14, preset=preset, **kwargs).to(device).eval()


def case_row(spec: str, kwargs: Dict[str, Any], variant: Tuple[str, Optional[torch.dtype], bool, bool],
             shape: Sequence[int], roi: int, device: torch.device, runs: int) -> Dict[str, Any]:
    """Median seconds of whole-volume sliding-window inference (one warm-up first) and the peak memory."""
    from ..infer import sliding_window_logits

    name, dtype, channels_last, compiled = variant
    row: Dict[str, Any] = {"model": spec, "variant": name, "paper_s": PAPER_SECONDS.get(spec)}
    if dtype is not None and device.type == "cpu" and dtype == torch.float16:
        row["status"] = "skipped (float16 autocast is for CUDA)"
        return row
    common.release_memory()
    try:
        with common.PeakMemory(device) as memory:
            net = _build(spec, kwargs, device)
            if channels_last:
                net = net.to(memory_format=torch.channels_last_3d)
            if compiled:
                net = torch.compile(net)
            image = torch.rand(1, 1, *shape)

            def one_case() -> Any:
                return sliding_window_logits(net, image, (roi,) * 3, device=device, overlap=0.5, sw_batch_size=4,
                                             amp_dtype=dtype)

            start = time.perf_counter()
            one_case()
            common.synchronize(device)
            row["first_call_s"] = time.perf_counter() - start
            row["case_s"] = common.median(common.time_calls(one_case, device, 0, runs))
        row["peak_mib"], row["status"] = memory.peak_mib - memory.baseline_mib, "ok"
    except Exception as error:  # a variant this torch/GPU cannot run is a row, not the end of the run
        row["status"] = common.failure_status(error)
    return row


def oom_shape(roi: int) -> Tuple[int, int, int]:
    """The out-of-memory row's volume, 2 x 2 x 1 windows: its fallback may run the whole inference on the CPU,
    which for the BTCV-sized grid took the second lease's last 4 minutes without finishing."""
    return (2 * roi, 2 * roi, roi)


def oom_fallback_row(spec: str, shape: Sequence[int], roi: int, device: torch.device,
                     fraction: Optional[float] = None) -> Dict[str, Any]:
    """Segment with :class:`Predictor` while the GPU may use only ``fraction`` of its memory (default: 1 GiB's
    worth, so that a 141 GB card runs short as a 16 GB one would not): the warnings name the fallback taken
    (stitch on the CPU, or the whole inference on the CPU)."""
    from .. import modelcard
    from ..infer import Predictor
    from ..nets import parse_spec

    if device.type != "cuda":
        return {"memory_fraction": fraction, "path": "-", "status": "skipped (no CUDA device)"}
    # set_per_process_memory_fraction wants an index: a bare "cuda" device has none (the first lease's crash)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if fraction is None:
        fraction = min(0.02, 2 ** 30 / torch.cuda.get_device_properties(index).total_memory)
    row: Dict[str, Any] = {"memory_fraction": fraction, "path": "-"}
    name, preset = parse_spec(spec)
    recorder = common.WarningRecorder()
    limited = False
    try:  # any failure is this row's status, never the end of the run (it cost the first lease its tables)
        with tempfile.TemporaryDirectory(prefix="logonet-bench-gpu-") as tmp:
            net = _build(spec, {}, torch.device("cpu"))
            labels = [{"value": v, "name": f"organ {v}"} for v in range(1, 14)]
            modelcard.save(Path(tmp) / "card", net, name="bench", labels=labels,
                           architecture={"name": name, "preset": preset, "in_channels": 1, "out_channels": 14,
                                         "kwargs": {}},
                           preprocessing={"spacing": list(PAPER_SPACING), "roi_size": [roi] * 3,
                                          "intensity_window": [-175.0, 250.0]})
            predictor = Predictor(Path(tmp) / "card", device=str(device), reporter=recorder)
            common.release_memory()
            torch.cuda.set_per_process_memory_fraction(fraction, index)
            limited = True
            start = time.perf_counter()
            predictor.logits(torch.rand(1, 1, *shape))
            row["seconds"] = time.perf_counter() - start
            row["path"] = recorder.messages[-1] if recorder.messages else "GPU (no fallback needed)"
            row["status"] = "ok"
    except Exception as error:
        row.update(path="; ".join(recorder.messages) or "-", status=common.failure_status(error))
    finally:
        if limited:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    return row


def train_row(spec: str, roi: int, device: torch.device, runs: int) -> Dict[str, Any]:
    """Median seconds of one training step (DiceCE, AdamW) on a (1, 1, roi^3) crop with AMP where it applies."""
    from monai.losses import DiceCELoss

    from ..runtime import autocast

    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    row: Dict[str, Any] = {"model": spec, "crop": f"{roi}^3", "amp": str(amp).replace("torch.", "") if amp else "off"}
    common.release_memory()
    try:
        with common.PeakMemory(device) as memory:
            net = _build(spec, {}, device).train()
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            image = torch.rand(1, 1, roi, roi, roi, device=device)
            label = torch.randint(0, 14, (1, 1, roi, roi, roi), device=device)

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, amp):
                    loss = loss_fn(net(image).float(), label)
                loss.backward()
                optimizer.step()

            row["step_s"] = common.median(common.time_calls(step, device, 1, runs))
        row["peak_mib"], row["status"] = memory.peak_mib - memory.baseline_mib, "ok"
    except Exception as error:
        row["status"] = common.failure_status(error)
    return row


def _subset(text: str, choices: Sequence[str], option: str) -> List[str]:
    """The comma-separated names of ``text``, each one of ``choices`` (else a UserError naming the option)."""
    wanted = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(wanted) - set(choices))
    if unknown:
        from ..errors import UserError

        raise UserError(f"unknown {option} {unknown}; choose from {list(choices)}")
    return wanted


def run(args: argparse.Namespace) -> int:
    reporter, device = common.setup(args)
    plan = _plan(args.tiny)
    wanted = _subset(args.variants, [v[0] for v in VARIANTS], "--variants")
    parts = _subset(args.parts, PARTS, "--parts")
    models = _subset(args.models or ",".join(plan["models"]), list(plan["models"]), "--models")
    variants = [v for v in VARIANTS if v[0] in wanted]
    # variant by variant, both models in turn: a run cut short still holds same-variant pairs
    jobs = [(spec, kwargs, variant) for variant in variants
            for spec, kwargs in plan["models"].items() if spec in models]
    sections: List[common.Section] = []
    title = "GPU run: per-case time, memory, OOM fallback, training step"
    machine = common.describe_machine(device)

    def keep_rows_so_far() -> None:  # a lease or time limit that ends the run mid-way keeps the finished rows
        common.write_report(args.out, "gpu", title + " (partial)", common.command_line(args, "gpu"), machine,
                            sections)

    if "cases" in parts:
        shape = "x".join(str(n) for n in plan["shape"])
        sections.append(common.Section(
            f"Whole-volume segmentation, {shape} voxels, {plan['roi']}^3 windows, overlap 0.5, batch 4",
            [], CASE_COLUMNS, "gpu_cases.csv"))
        cases = sections[-1].rows  # filled row by row (Section keeps its own list)
        for _, (spec, kwargs, variant) in common.iterate_jobs(reporter, jobs, "cases"):
            cases.append(case_row(spec, kwargs, variant, plan["shape"], plan["roi"], device, args.runs))
            keep_rows_so_far()
    else:
        cases = []
    if "oom" in parts:
        sections.append(common.Section(
            "Out-of-memory fallback (Predictor, memory fraction forced low)",
            [oom_fallback_row(plan["train_model"], oom_shape(plan["roi"]), plan["roi"], device)], OOM_COLUMNS,
            "gpu_oom.csv"))
        keep_rows_so_far()
    if "train" in parts:
        training = [train_row(plan["train_model"], plan["roi"], device, args.runs)]
        sections.append(common.Section("Training step", training, TRAIN_COLUMNS, "gpu_train.csv"))
    best = {spec: min((r["case_s"] for r in cases if r["model"] == spec and r.get("case_s")), default=None)
            for spec in plan["models"]}
    notes = [f"{spec}: best {value:.2f} s/case" + (f" (paper {PAPER_SECONDS[spec]} s; goal < 2 s: "
                                                    f"{common.verdict(value < 2.0)})" if spec in PAPER_SECONDS else "")
             for spec, value in best.items() if value is not None]
    return common.finish(args, reporter, "gpu", title, machine, sections, notes)
