"""``logonet bench volume``: whole-volume segmentation wall time and peak memory per stage (load model, read,
resample, infer, resample back, write) with :class:`logonet.infer.Predictor`, on the sample CT and on a
BTCV-sized synthetic volume (512x512x120 at 0.8x0.8x2.5 mm), for the demo model and LoGoNet-S with random
weights, at sliding-window overlaps 0.25 and 0.5. ``logonet-S-paper`` and ``swinunetr-paper`` are random-weight
cards at the paper's setting (1.5x1.5x2 mm, 96^3 windows): issue 14's BTCV-volume comparison,
``--models logonet-S-paper,swinunetr-paper --cases btcv --overlaps 0.25``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..events import ProgressReporter
from . import common

#: Predictor stage -> the benchmark's name for it
STAGES = [("load_model", "load model"), ("read", "read"), ("preprocess", "resample"), ("inference", "infer"),
          ("postprocess", "resample back"), ("write", "write")]
RANDOM_S = "logonet-S-random"
#: The paper's preprocessing for BTCV (paper-facts: 1.5x1.5x2 mm, 96^3 crops, HU window -175..250)
PAPER_PREPROCESSING = {"spacing": [1.5, 1.5, 2.0], "roi_size": [96, 96, 96], "intensity_window": [-175.0, 250.0]}
#: ``--models`` names of random-weight cards -> (registry name, preset, preprocessing; None = the demo card's)
RANDOM_CARDS: Dict[str, Tuple[str, Optional[str], Optional[Dict[str, Any]]]] = {
    RANDOM_S: ("logonet", "S", None),
    "logonet-S-paper": ("logonet", "S", PAPER_PREPROCESSING),
    "swinunetr-paper": ("swinunetr", None, PAPER_PREPROCESSING),
}
BTCV_SHAPE, BTCV_SPACING = (512, 512, 120), (0.8, 0.8, 2.5)

TIME_COLUMNS: List[common.Column] = (
    [("model", "model", ""), ("case", "case", ""), ("overlap", "overlap", ".2f"),
     ("window_batches", "window batches", "")]
    + [(f"{key}_s", f"{label} s", ".2f") for key, label in STAGES]
    + [("total_s", "total s (incl. load)", ".2f"), ("peak_mib", "peak MiB", ".0f")])
MEMORY_COLUMNS: List[common.Column] = (
    [("model", "model", ""), ("case", "case", ""), ("overlap", "overlap", ".2f")]
    + [(f"{key}_peak_mib", f"{label} peak MiB", ".0f") for key, label in STAGES])


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated model cards: 'demo', '{RANDOM_S}', "
                             f"{', '.join(repr(m) for m in RANDOM_CARDS if m != RANDOM_S)} (random weights at the "
                             f"paper's 1.5x1.5x2 mm and 96^3) or a card folder (default: demo,{RANDOM_S})")
    parser.add_argument("--cases", default="sample,btcv",
                        help="comma-separated: 'sample' (the sample CT), 'btcv' (synthetic, --synthetic-shape) "
                             "or a volume file")
    parser.add_argument("--overlaps", default="0.25,0.5", help="comma-separated sliding-window overlaps")
    parser.add_argument("--synthetic-shape", default="512,512,120", help="x,y,z voxels of the synthetic volume")
    parser.add_argument("--synthetic-spacing", default="0.8,0.8,2.5", help="x,y,z mm of the synthetic volume")
    parser.add_argument("--sw-batch", type=int, default=None,
                        help="windows per forward pass (default: segment's, 1 on the CPU and 4 on a GPU)")


def _floats(text: str, n: int, what: str, kind: type = float) -> Tuple[Any, ...]:
    from ..errors import UserError

    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise UserError(f"--{what} {text!r}: expected {n} comma-separated numbers")
    return values


def synthetic_volume(shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> Any:
    """A phantom abdomen stretched over the whole field of view of a ``shape`` (x, y, z) grid at ``spacing``."""
    import SimpleITK as sitk

    from ..data.phantom import make_phantom, phantom_image

    side = 96
    hu, _ = make_phantom(side, seed=seed)
    extent = [n * s for n, s in zip(shape, spacing)]
    small = phantom_image(hu, spacing=[e / side for e in extent])
    reference = sitk.Image([int(n) for n in shape], sitk.sitkInt16)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([-(n - 1) * s / 2.0 for n, s in zip(shape, spacing)])
    return sitk.Resample(small, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)


def random_card(folder: Path, name: str, model_name: str, preset: Optional[str],
                preprocessing: Optional[Dict[str, Any]] = None, like: str = "demo") -> Path:
    """A model card with random weights and the ``like`` card's labels; its preprocessing unless given."""
    import torch

    from .. import modelcard
    from ..nets import build_model

    card = modelcard.load_model(like)
    torch.manual_seed(0)
    model = build_model(model_name, out_channels=card.out_channels, preset=preset)
    return modelcard.save(folder, model, name=name, labels=card.labels,
                          preprocessing=preprocessing or card.preprocessing,
                          architecture={"name": model_name, "preset": preset, "in_channels": 1,
                                        "out_channels": card.out_channels, "kwargs": {}},
                          description=f"{name}: random weights (bench volume)")


def model_card(model: str, work: Path) -> Path:
    """The card a ``--models`` entry names: a random-weight one (:data:`RANDOM_CARDS`) made in ``work``, or a
    card folder / 'demo'."""
    if model not in RANDOM_CARDS:
        return Path(model)
    model_name, preset, preprocessing = RANDOM_CARDS[model]
    return random_card(work / model, name=model, model_name=model_name, preset=preset, preprocessing=preprocessing)


class StageRecorder(ProgressReporter):
    """Forwards events to ``outer`` and switches the memory meter's stage on every ``stage`` event."""

    def __init__(self, outer: ProgressReporter, memory: common.PeakMemory) -> None:
        super().__init__("none")
        self.outer, self.memory = outer, memory
        self.window_batches: Optional[int] = None

    def emit(self, event: str, step: Optional[int] = None, total: Optional[int] = None, **metrics: Any) -> None:
        if event == "stage" and "stage" in metrics:
            self.memory.stage(str(metrics["stage"]))
        if event == "progress" and metrics.get("stage") == "inference":
            self.window_batches = total
        self.outer.emit(event, step=step, total=total, **metrics)


def segment_case(card: Path, source: Path, out_file: Path, overlap: float, device: Any, sw_batch: Optional[int],
                 reporter: ProgressReporter) -> Dict[str, Any]:
    """One Predictor lifetime (load + segment_file): seconds and peak memory per stage."""
    from ..infer import Predictor

    common.release_memory()
    with common.PeakMemory(device) as memory:
        recorder = StageRecorder(reporter, memory)
        memory.stage("load_model")
        t0 = time.perf_counter()
        predictor = Predictor(card, device=str(device), overlap=overlap, sw_batch_size=sw_batch, reporter=recorder)
        load_s = time.perf_counter() - t0
        result = predictor.segment_file(source, out_file)
        total_s = time.perf_counter() - t0
    row: Dict[str, Any] = {"load_model_s": load_s, **{f"{k}_s": v for k, v in result["timings"].items()},
                           "total_s": total_s, "window_batches": recorder.window_batches,
                           "sw_batch": predictor.sw_batch_size, "peak_mib": memory.peak_mib}
    row.update({f"{k}_peak_mib": v for k, v in memory.stage_peaks_mib.items() if k != "all"})
    del predictor
    return row


def plan(args: argparse.Namespace) -> List[Tuple[str, str, float]]:
    """(model, case, overlap) runs. ``--quick`` keeps LoGoNet-S (random) to the sample CT at the first overlap."""
    models = [m.strip() for m in (args.models or f"demo,{RANDOM_S}").split(",") if m.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    overlaps = [float(o) for o in args.overlaps.split(",") if o.strip()]
    jobs = []
    for model in models:
        for case in cases:
            for index, overlap in enumerate(overlaps):
                if args.quick and model == RANDOM_S and (case != cases[0] or index > 0):
                    continue
                jobs.append((model, case, overlap))
    return jobs


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from ..data import volumes
    from ..errors import UserError

    reporter, device = common.setup(args)
    shape = _floats(args.synthetic_shape, 3, "synthetic-shape", int)
    spacing = _floats(args.synthetic_spacing, 3, "synthetic-spacing")
    jobs = plan(args)
    if not jobs:
        raise UserError("nothing to run: give at least one model, case and overlap")
    machine = common.describe_machine(device)
    reporter.emit("start", total=len(jobs), benchmark="volume", device=str(device))
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="logonet-bench-volume-") as tmp:
        work = Path(tmp)
        sources: Dict[str, Path] = {}
        cards: Dict[str, Path] = {}
        for _, (model, case, overlap) in common.iterate_jobs(reporter, jobs, "runs"):
            if case not in sources:
                if case == "sample":
                    from ..data.sample import fetch_sample

                    sources[case] = Path(fetch_sample()["ct"])
                elif case == "btcv":
                    sources[case] = work / "btcv_synthetic.nii.gz"
                    volumes.write_image(synthetic_volume(shape, spacing), sources[case])
                else:
                    sources[case] = Path(case)
            if model not in cards:
                cards[model] = model_card(model, work)
            reporter.emit("stage", stage="run", model=model, case=case, overlap=overlap)
            row: Dict[str, Any] = {"model": model, "case": case, "overlap": overlap}
            row.update(segment_case(cards[model], sources[case], work / "seg.nii.gz", overlap, device,
                                    args.sw_batch, reporter))
            image = sitk.ReadImage(str(sources[case]))
            row["input_size"] = "x".join(str(n) for n in image.GetSize())
            rows.append(row)
            common.release_memory()
    sizes = ", ".join(sorted({f"{r['case']} = {r['input_size']} voxels" for r in rows}))
    sections = [
        common.Section("Wall time per stage (s)", rows, TIME_COLUMNS, "volume.csv",
                       note=f"Inputs: {sizes}. Window batches = sliding-window batches of "
                            f"{'/'.join(str(b) for b in sorted({r['sw_batch'] for r in rows}))} "
                            "windows of the model card's roi_size at its spacing; total = model load + read + resample + infer + resample back + write."),
        common.Section("Peak memory per stage (MiB, whole process)", rows, MEMORY_COLUMNS, "volume_memory.csv",
                       note="Process RSS on CPU (max allocated on CUDA), highest value seen while the stage ran."),
    ]
    notes = []
    demo = [r for r in rows if r["model"] == "demo" and r["case"] == "sample"]
    for row in demo:
        notes.append(f"Demo model on the sample CT at overlap {row['overlap']}: {row['total_s']:.1f} s wall "
                     f"including model load: target < 20 s {common.verdict(row['total_s'] < 20.0)}.")
    notes += paper_notes(rows)
    return common.finish(args, reporter, "volume", "Whole-volume segmentation", machine, sections, notes)


def paper_notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Issue 14's BTCV-volume targets, where a run has both paper cards on the same case and overlap: LoGoNet-S
    at most 0.5x SwinUNETR-48's total time, and a peak RSS under 6 GB."""
    notes = []
    for row in rows:
        if row["model"] != "logonet-S-paper":
            continue
        swin = next((r for r in rows if r["model"] == "swinunetr-paper" and r["case"] == row["case"]
                     and r["overlap"] == row["overlap"]), None)
        if swin is None:
            continue
        ratio = row["total_s"] / swin["total_s"]
        notes.append(f"{row['case']}, overlap {row['overlap']}: LoGoNet-S / SwinUNETR-48 total time {ratio:.2f} "
                     f"({row['total_s']:.1f} s / {swin['total_s']:.1f} s): target <= 0.5 "
                     f"{common.verdict(ratio <= 0.5)}; LoGoNet-S peak RSS {row['peak_mib'] * 2 ** 20 / 1e9:.2f} GB "
                     f"({row['peak_mib']:.0f} MiB): target < 6 GB {common.verdict(row['peak_mib'] * 2 ** 20 < 6e9)}.")
    return notes
