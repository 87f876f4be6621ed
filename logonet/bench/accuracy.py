"""``logonet bench accuracy``: every model fine-tuned with the same budget (same phantoms, crops, steps, learning
rate and seed) by ``logonet finetune``, then scored per organ (Dice) on held-out phantoms. LoGoNet vs ULKANet is
the paper's local+global ablation (ULKANet = LoGoNet's global branch alone).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import common

FULL_MODELS = ["logonet:T", "ulkanet:T", "logonet:S", "ulkanet:S", "swinunetr", "unetr", "segresnetvae", "dynunet",
               "unetplusplus", "attentionunet"]
QUICK_MODELS = ["logonet:T", "ulkanet:T"]
TEST_SEED = 1000  # held-out phantoms are drawn with their own seed: never seen in training


def add_budget_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--size", type=int, default=64, help="phantom side in voxels (default 64)")
    parser.add_argument("--roi", type=int, default=64, help="training crop / sliding window (multiple of 32)")
    parser.add_argument("--test-cases", type=int, default=2, help="held-out phantoms")
    parser.add_argument("--epochs", type=int, default=None, help=f"fine-tuning epochs (default {epochs}; quick: fewer)")
    parser.add_argument("--samples", type=int, default=2, help="crops per volume per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (the same for every model)")


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.add_argument("--models", default=None, help=f"comma-separated MODEL[:PRESET] (default: "
                                                       f"{','.join(FULL_MODELS)}; quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--train-cases", type=int, default=4, help="labelled training phantoms")
    parser.add_argument("--seed", type=int, default=0)
    add_budget_arguments(parser, epochs=30)


def finetune(data: Path, out: Path, spec: str, args: argparse.Namespace, epochs: int, seed: int,
             init: Optional[Path] = None, repeats: int = 1) -> Path:
    """:func:`logonet.train.finetune.finetune` with the benchmark's budget; returns the last epoch's model card."""
    from ..nets import parse_spec
    from ..train.finetune import FinetuneConfig, finetune as run_finetune

    name, preset = parse_spec(spec)
    config = FinetuneConfig(data=[str(data)], out=str(out), model=name, preset=preset or "S", epochs=epochs,
                            repeats=[repeats], roi=[args.roi], samples=args.samples, lr=args.lr, warmup=0,
                            val_fraction=0.0, val_every=epochs, seed=seed, device=str(args.device), progress="none",
                            init=str(init) if init is not None else None,
                            command=f"{common.command_line(args, 'accuracy')} (fine-tuning {spec}, seed {seed})")
    if run_finetune(config) != 0:
        raise RuntimeError(f"fine-tuning {spec} stopped early")
    return out / "last"


def held_out_dice(card: Path, test_data: Path, device: Any) -> Dict[str, float]:
    """Mean Dice per organ over the held-out phantoms (``{organ: dice, "mean": ...}``), via the Predictor."""
    import SimpleITK as sitk

    from ..data import datasets, volumes
    from ..evaluate import score
    from ..infer import Predictor

    predictor = Predictor(card, device=str(device), overlap=0.5)
    names = predictor.label_names
    per_organ: Dict[str, List[float]] = {names[v]: [] for v in sorted(names)}
    for case in datasets.discover(test_data).labeled():
        image = volumes.read_image(case["image"])
        pred, _ = predictor.predict(image)
        ref = sitk.GetArrayFromImage(volumes.read_image(case["label"]))
        for row in score(sitk.GetArrayFromImage(pred), ref, sorted(names), image.GetSpacing()[::-1], names,
                         hausdorff=False):
            per_organ[row["name"]].append(row["dice"])
    result = {organ: common.mean_std(values)[0] for organ, values in per_organ.items()}
    result["mean"] = common.mean_std(list(result.values()))[0]
    return result


def run(args: argparse.Namespace) -> int:
    from ..data.labels import BTCV_NAMES
    from ..data.phantom import write_phantom_dataset
    from ..errors import UserError
    from ..nets import build_model, model_info, parse_spec
    from ..nets.complexity import count_parameters

    reporter, device = common.setup(args)
    specs = [s.strip() for s in (args.models or ",".join(QUICK_MODELS if args.quick else FULL_MODELS)).split(",")
             if s.strip()]
    epochs = args.epochs if args.epochs is not None else (8 if args.quick else 30)
    machine = common.describe_machine(device)
    reporter.emit("start", total=len(specs), benchmark="accuracy", device=str(device))
    rows: List[Dict[str, Any]] = []
    organs = [BTCV_NAMES[v] for v in sorted(BTCV_NAMES)]
    with tempfile.TemporaryDirectory(prefix="logonet-bench-accuracy-") as tmp:
        work = Path(tmp)
        train = write_phantom_dataset(work / "train", args.train_cases, size=args.size, seed=args.seed)
        test = write_phantom_dataset(work / "test", args.test_cases, size=args.size, seed=TEST_SEED)
        for index, spec in common.iterate_jobs(reporter, specs, "models"):
            reporter.emit("stage", stage="finetune", model=spec)
            name, preset = parse_spec(spec)
            kwargs = model_info(name).size_kwargs(args.roi)
            params = count_parameters(build_model(name, out_channels=len(organs) + 1, preset=preset, **kwargs))
            row: Dict[str, Any] = {"model": spec, "params_m": params / 1e6}
            t = time.perf_counter()
            try:
                card = finetune(train, work / f"run{index}", spec, args, epochs, args.seed)
            except (UserError, RuntimeError, ValueError) as error:  # e.g. a net too deep for --roi: a result
                rows.append({**row, "status": f"failed: {str(error).splitlines()[0][:100]}"})
                reporter.emit("warning", message=f"{spec}: {error}")
                continue
            row["train_s"] = time.perf_counter() - t
            dice = held_out_dice(card, test, device)
            rows.append({**row, "mean_dice": dice.pop("mean"), "status": "ok",
                         **{f"dice_{o.replace(' ', '_')}": d for o, d in dice.items()}})
            common.release_memory()
    columns: List[common.Column] = [("model", "model", ""), ("params_m", "params (M)", ".2f"),
                                    ("train_s", "train s", ".0f"), ("mean_dice", "mean Dice", ".3f")]
    columns += [(f"dice_{o.replace(' ', '_')}", o, ".2f") for o in organs] + [("status", "status", "")]
    steps = epochs * args.train_cases
    section = common.Section(
        "Held-out Dice per organ", rows, columns, "accuracy.csv",
        note=f"Budget for every model: {args.train_cases} phantoms of {args.size}^3, {epochs} epochs = {steps} steps "
             f"of {args.samples} crops of {args.roi}^3, AdamW lr {args.lr}, no warm-up, seed {args.seed}; "
             f"scored on {args.test_cases} held-out phantoms (seed {TEST_SEED}) by sliding window, overlap 0.5.")
    notes = _ablation_notes(rows)
    return common.finish(args, reporter, "accuracy", "Accuracy with an equal training budget (phantoms)", machine,
                         [section], notes)


def _ablation_notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """LoGoNet vs ULKANet (same preset): the local branch's contribution."""
    by_model = {r["model"]: r for r in rows}
    notes = []
    for preset in ("T", "S", "L"):
        a, b = by_model.get(f"logonet:{preset}"), by_model.get(f"ulkanet:{preset}")
        if a and b and a.get("status") == b.get("status") == "ok":
            notes.append(f"Local+global ablation ({preset}): LoGoNet mean Dice {a['mean_dice']:.3f} vs ULKANet "
                         f"{b['mean_dice']:.3f} (difference {a['mean_dice'] - b['mean_dice']:+.3f}).")
    return notes
