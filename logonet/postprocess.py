"""``logonet postprocess CARD --val-data DIR [DIR ...]``: choose, per organ, whether to keep only its largest
connected component, on validation cases, and record the choice in the model card.

nnU-Net v2 decides its post-processing the same way (``determine_postprocessing``): segment the validation cases,
score each organ with and without removing all but its largest component, and keep the removal for the organs
whose mean Dice it raises. A stray island of "liver" on the far side of the abdomen is removed where that helps,
while an organ that a thin slab cuts into two pieces (the pancreas, say) keeps both when that scores better.
``segment`` applies the card's choice by default (``--largest-component`` / ``--no-largest-component`` override).

Choose on validation cases only: the organs chosen on a test scan would make its Dice a training figure.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np


def choose_largest_component(cases: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> Dict[str, Any]:
    """The choice from scored cases: ``cases`` = [{"without": score rows, "with": score rows}] (rows of
    :func:`logonet.evaluate.score` on the same case without and with the largest-component step).

    Returns ``{"largest_component": [values], "val_dice_without": {name: mean}, "val_dice_with": {name: mean},
    "mean_dice_without", "mean_dice_chosen"}``; an organ is chosen when its mean Dice over the cases that hold it
    rises (strictly)."""
    def per_organ(key: str) -> Dict[int, float]:
        collected: Dict[int, List[float]] = {}
        for case in cases:
            for row in case[key]:
                if not np.isnan(row["dice"]):
                    collected.setdefault(int(row["value"]), []).append(float(row["dice"]))
        return {value: float(np.mean(scores)) for value, scores in collected.items()}

    without, with_ = per_organ("without"), per_organ("with")
    chosen = sorted(v for v in without if with_.get(v, -1.0) > without[v])
    chosen_scores = [with_[v] if v in chosen else without[v] for v in without]
    return {
        "largest_component": chosen,
        "val_dice_without": {names.get(v, str(v)): round(d, 4) for v, d in sorted(without.items())},
        "val_dice_with": {names.get(v, str(v)): round(d, 4) for v, d in sorted(with_.items())},
        "mean_dice_without": round(float(np.mean(list(without.values()))), 4) if without else None,
        "mean_dice_chosen": round(float(np.mean(chosen_scores)), 4) if chosen_scores else None,
    }


def determine_postprocessing(card: Any, val_data: Sequence[Any], device: str = "auto", engine: str = "torch",
                             reporter: Any = None) -> Dict[str, Any]:
    """Segment every labelled case of the ``val_data`` folders with ``card`` and choose the organs for the
    largest-component step (:func:`choose_largest_component`), plus where it was chosen (``chosen_on``)."""
    import SimpleITK as sitk

    from .data import datasets, volumes
    from .evaluate import score
    from .events import ProgressReporter
    from .infer import Predictor, keep_largest_component

    reporter = reporter or ProgressReporter("none")
    # validate refuses an empty folder and labels off their image's grid, every problem before any segmenting
    cases = [case for folder in val_data
             for case in datasets.validate(folder, require_labels=True, tol=volumes.GEOMETRY_TOL).labeled()]
    predictor = Predictor(card, device=device, engine=engine, reporter=reporter)
    organs = list(predictor.card.label_values[1:])
    scored = []
    for case in reporter.iterate(cases, total=len(cases), desc="postprocess"):
        image = volumes.read_image(case["image"])
        reference = volumes.read_image(case["label"])
        labels, _ = predictor.predict(image, largest_component=False, name=str(case["image"]))
        pred = sitk.GetArrayFromImage(labels)
        ref = sitk.GetArrayFromImage(reference)
        spacing = tuple(reversed(image.GetSpacing()))
        scored.append({"without": score(pred, ref, organs, spacing, hausdorff=False),
                       "with": score(keep_largest_component(pred, organs), ref, organs, spacing, hausdorff=False)})
    choice = choose_largest_component(scored, predictor.label_names)
    choice["chosen_on"] = f"{', '.join(Path(str(f)).name for f in val_data)} ({len(cases)} validation cases)"
    return choice


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("card", metavar="CARD", help="model card folder to choose for (its model.json is updated)")
    parser.add_argument("--val-data", nargs="+", required=True, metavar="DIR",
                        help="labelled validation folders (never a test scan)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--engine", default="auto", choices=["auto", "torch", "openvino", "onnxruntime"],
                        help="CPU engine for the windows, as for segment (default auto)")
    parser.add_argument("--dry-run", action="store_true", help="print the choice, leave the card as it is")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def run(args: argparse.Namespace) -> int:
    from . import modelcard
    from .events import reporter_for

    reporter = reporter_for(args.progress)
    start = time.perf_counter()
    choice = determine_postprocessing(args.card, args.val_data, device=args.device, engine=args.engine,
                                      reporter=reporter)
    folder: Optional[Path] = None
    if not args.dry_run:
        folder = modelcard.update_meta(modelcard.load_model(args.card).path, postprocessing=choice)
    reporter.emit("done", outputs=[str(folder)] if folder else [], postprocessing=choice,
                  seconds=round(time.perf_counter() - start, 2))
    if reporter.mode != "jsonl":
        print(format_choice(choice))
        print(f"written to {folder}/model.json" if folder else "dry run: the card was not changed")
    return 0


def format_choice(choice: Mapping[str, Any]) -> str:
    """The per-organ table: Dice without and with the largest-component step, and the decision."""
    lines = [f"largest connected component only, chosen on {choice.get('chosen_on', 'the validation cases')}:",
             f"{'organ':<34}{'without':>9}{'with':>9}  keeps"]
    for name, without in choice["val_dice_without"].items():
        with_ = choice["val_dice_with"].get(name, float("nan"))
        lines.append(f"{name:<34}{without:>9.4f}{with_:>9.4f}  {'largest only' if with_ > without else 'all'}")
    lines.append(f"mean Dice {choice['mean_dice_without']} -> {choice['mean_dice_chosen']} "
                 f"({len(choice['largest_component'])} organs kept to their largest component)")
    return "\n".join(lines)
