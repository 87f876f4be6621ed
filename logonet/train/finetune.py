"""``logonet finetune``: supervised fine-tuning on a labelled dataset folder (paper-facts §3).

DiceCE loss (1:1), AdamW + warmup + cosine, the paper's augmentations (from :mod:`logonet.data.transforms`),
label-balanced random crops, sliding-window validation with per-class Dice, best and last model cards
(``OUT/best``, ``OUT/last``), resume, metrics CSV + plot, AMP on CUDA and torchrun/DDP through
:mod:`logonet.train.engine`.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import modelcard
from ..errors import UserError
from ..events import ProgressReporter, reporter_for
from .. import runtime
from . import checkpoints, distributed, options
from . import engine as eng
from . import loader as loading

DEFAULT_ROI = 96


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="dataset folder(s) (MSD dataset.json, nnU-Net imagesTr/labelsTr, or images/ + labels/); "
                             "several folders are mixed, e.g. real scans and 'logonet synth' cases")
    parser.add_argument("--out", required=True, help="output folder: best/ and last/ model cards, checkpoint, metrics")
    parser.add_argument("--model", default="logonet", help="network name (see logonet.nets.available_models)")
    parser.add_argument("--preset", default="S", help="size preset for logonet/ulkanet: T (tiny), S (paper), L")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='extra constructor arguments as JSON, e.g. \'{"channels": [16, 32, 64, 128]}\'')
    parser.add_argument("--init", default=None, metavar="CARD",
                        help="initialise from a model card (SSL pre-training or an earlier fine-tune)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="target spacing in mm (1 or 3 numbers; default 1.5 1.5 2.0)")
    parser.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="HU window mapped to [0, 1] (default -175 250)")
    parser.add_argument("--roi", type=int, nargs="+", default=[DEFAULT_ROI],
                        help="crop / sliding-window size (1 or 3 numbers, multiples of 32)")
    parser.add_argument("--samples", type=int, default=4, help="random crops per volume per step")
    parser.add_argument("--crop-by", default="foreground", choices=["foreground", "classes"],
                        help="where crops are centred: foreground (half on labelled voxels, half anywhere in the "
                             "body) or classes (each class equally often, so small organs are seen as often as "
                             "the liver)")
    parser.add_argument("--repeats", type=int, nargs="+", default=[1],
                        help="passes over the training cases per epoch: one number, or one per DATA folder (weights "
                             "a few real scans against many synthetic ones)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--grad-clip", type=float, default=12.0,
                        help="clip the gradient's global norm to this (nnU-Net's 12; 0: no clipping)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup epochs (default: 10%% of --epochs)")
    parser.add_argument("--batch", type=int, default=1, help="volumes per step (each gives --samples crops)")
    parser.add_argument("--val-data", metavar="DIR", default=None,
                        help="validate (and pick the best epoch) on this labelled folder instead of a split of DATA, "
                             "e.g. synthetic cases of another seed")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of cases held out for validation (0: validate on the training cases)")
    parser.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in validation")
    parser.add_argument("--augment", default="nnunet", choices=["nnunet", "paper", "none"],
                        help="training augmentation: nnunet (default: rotation, scaling, noise, blur, brightness, "
                             "gamma, low resolution; no mirroring), paper (flips, rot90, intensity jitter), none")
    parser.add_argument("--no-augment", action="store_true", help="same as --augment none")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--cache", default="memory", choices=["memory", "disk", "none"],
                        help="cache the deterministic preprocessing (disk: OUT/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="model name written into model.json")
    parser.add_argument("--fp16-weights", action="store_true", help="store the model cards' weights in fp16")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def discover_cases(folder: str) -> Tuple[List[Dict[str, Any]], Dict[int, str]]:
    """Labelled cases ``[{"id", "image", "label"}]`` and ``{value: name}``, after checking every file
    (:func:`logonet.data.datasets.validate` reports all problems at once)."""
    from ..data import datasets

    index = datasets.validate(folder, require_labels=True)
    cases = index.labeled()
    if not cases:
        raise UserError(f"{folder} has no labelled cases (image + label pairs); fine-tuning needs labels")
    return cases, {int(k): str(v) for k, v in index.label_names.items() if int(k) != 0}


def discover_folders(folders: Sequence[str], repeats: Sequence[int]) -> Tuple[List[Dict[str, Any]], Dict[int, str], List[int]]:
    """Cases of several folders (ids prefixed by the folder name when there are several), the union of their
    label names (a value must mean the same organ in each), and each case's passes per epoch."""
    if len(repeats) not in (1, len(folders)):
        raise UserError(f"--repeats takes one number or one per DATA folder ({len(folders)}), got {list(repeats)}")
    if any(r < 1 for r in repeats):
        raise UserError(f"--repeats must be at least 1, got {list(repeats)}")
    per_folder = list(repeats) * len(folders) if len(repeats) == 1 else list(repeats)
    cases: List[Dict[str, Any]] = []
    names: Dict[int, str] = {}
    weights: List[int] = []
    for folder, times in zip(folders, per_folder):
        found, found_names = discover_cases(folder)
        for value, name in found_names.items():
            if value in names and names[value].lower() != name.lower():
                raise UserError(f"label value {value} is '{names[value]}' in one DATA folder and '{name}' in {folder}")
            names[value] = name
        prefix = f"{Path(folder).name}/" if len(folders) > 1 else ""
        cases += [{**case, "id": f"{prefix}{case['id']}"} for case in found]
        weights += [times] * len(found)
    return cases, names, weights


def split_cases(cases: List[Dict[str, Any]], val_fraction: float, seed: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Seeded split; with ``val_fraction`` 0 (or a single case) validation uses the training cases."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = sorted(cases, key=lambda c: str(c["id"]))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(order)))
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(1, n_val), len(order) - 1)
    else:
        n_val = 0
    if n_val == 0:
        return order, list(order)
    return order[n_val:], order[:n_val]


def label_entries(names: Mapping[int, str], values: Sequence[int]) -> List[Dict[str, Any]]:
    """``model.json`` label entries: BTCV colors/terminology where value and name match BTCV, else a color."""
    from ..data.io import normalize_label_spec
    from ..data.labels import BTCV_LABELS

    btcv = {label.value: label for label in BTCV_LABELS}
    entries = normalize_label_spec({v: names.get(v, f"label_{v}") for v in values})
    for entry in entries:
        known = btcv.get(entry["value"])
        if known is not None and entry["name"].replace("_", " ").lower() in (known.name, known.key.replace("_", " ")):
            entry.update(known.to_dict())
    return entries


def build_transforms(cfg: Any, values: Sequence[int]) -> Tuple[Any, Any]:
    """(train, val) MONAI pipelines whose labels are channel indices: foreground ``values`` -> 1..K in order."""
    from ..data.transforms import train_transforms, val_transforms

    return train_transforms(cfg, label_values=values), val_transforms(cfg, label_values=values)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def per_class_dice(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> np.ndarray:
    """Dice per foreground class for one case: pred/label (1, 1, X, Y, Z) channel indices -> (n_classes-1,);
    NaN where the class is absent from both (MONAI DiceMetric, ignore_empty)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    return metric(one_hot(pred, n_classes), one_hot(label, n_classes)).cpu().numpy()[0]


def make_validator(val_items: Sequence[Mapping[str, Any]], roi: Sequence[int], n_classes: int,
                   class_names: Sequence[str], overlap: float, amp_dtype: Optional[torch.dtype],
                   reporter: ProgressReporter):
    """A ``validate_fn`` for the engine: sliding-window inference on each (preprocessed) case, mean Dice over
    the classes present in the references, plus ``dice_<name>`` per class."""
    from ..infer import sliding_window_logits

    def validate(model: torch.nn.Module, device: torch.device) -> Dict[str, float]:
        scores = []
        for item in reporter.iterate(val_items, total=len(val_items), desc="validation"):
            image = torch.as_tensor(item["image"])[None].float()
            label = torch.as_tensor(item["label"])[None].long()
            logits = sliding_window_logits(model, image, roi, device=device, overlap=overlap,
                                           amp_dtype=amp_dtype)
            scores.append(per_class_dice(logits.argmax(1, keepdim=True), label, n_classes))
        table = np.array(scores, dtype=float)
        with np.errstate(all="ignore"):
            per_class = np.nanmean(table, axis=0) if len(table) else np.full(n_classes - 1, np.nan)
        metrics: Dict[str, float] = {"dice": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0}
        for name, value in zip(class_names, per_class):
            metrics[f"dice_{name.replace(' ', '_')}"] = float(value)
        return metrics

    return validate


# ----------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from monai.data import list_data_collate
    from monai.losses import DiceCELoss

    from ..data.transforms import PreprocessConfig
    from ..nets import build_model

    reporter = reporter_for(args.progress)
    out = Path(args.out)
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    if args.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0: off), got {args.grad_clip}")
    roi = options.roi_argument(args.roi, DEFAULT_ROI)
    from ..atomic import prepare_run_folder  # --out usable, stale temps of a killed run gone
    prepare_run_folder(out, "--out")
    checkpoints.check_output_folder(out, args.resume, "training run")

    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except ValueError as error:
        raise UserError(f"--model-kwargs is not valid JSON: {error}") from error
    if not isinstance(model_kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object such as '{\"channels\": [16, 32]}'")
    cases, names, weights = discover_folders(args.data, args.repeats)
    if args.val_data:
        val_cases, val_names = discover_cases(args.val_data)
        train_cases = cases
        names = {**val_names, **names}
        val_source = "held_out"
    else:
        train_cases, val_cases = split_cases(cases, args.val_fraction, args.seed)
        val_source = "training_scan" if val_cases == train_cases else "held_out"
    weight_of = {str(c["id"]): w for c, w in zip(cases, weights)}
    values = sorted(v for v in names if v != 0)
    if not values:
        raise UserError(f"{args.data}: no label names found; add a dataset.json with a \"labels\" map")
    n_classes = len(values) + 1
    entries = label_entries(names, values)

    defaults = PreprocessConfig()
    cfg = PreprocessConfig(
        spacing=options.triple_argument(args.spacing, "spacing", defaults.spacing),
        intensity_window=tuple(args.window) if args.window else defaults.intensity_window,
        roi_size=roi, num_samples=args.samples, crop_by=args.crop_by, cache_dir=None,
        augment="none" if args.no_augment else args.augment)

    dist = distributed.setup_distributed(args.device)
    try:
        if not dist.is_main:
            reporter = ProgressReporter("none")
        runtime.seed_everything(args.seed + dist.rank)
        reporter.emit("stage", stage="data", train_cases=len(train_cases), val_cases=len(val_cases),
                      classes=n_classes)
        train_tf, val_tf = build_transforms(cfg, values)
        cached = loading.training_dataset(train_cases, train_tf, args.cache, out / "cache", args.workers)
        train_ds = loading.RepeatDataset(cached, [weight_of[str(c["id"])] for c in train_cases])
        loader = loading.make_loader(train_ds, batch_size=args.batch, shuffle=True, dist=dist, seed=args.seed,
                                 num_workers=args.workers, collate_fn=list_data_collate)
        val_items: List[Dict[str, Any]] = []
        if dist.is_main:
            val_items = [val_tf(dict(c)) for c in val_cases]  # small: kept in memory, reused every validation
        # Presets only mean something for the ULKA family; baselines record none.
        preset = args.preset if args.model.lower() in ("logonet", "ulkanet") else None
        architecture = {"name": args.model, "preset": preset, "in_channels": 1, "out_channels": n_classes,
                        "kwargs": model_kwargs}
        try:
            model = build_model(args.model, in_channels=1, out_channels=n_classes, preset=preset, **model_kwargs)
        except (TypeError, ValueError) as error:
            raise UserError(str(error)) from error
        if args.init and not args.resume:
            from .init import init_from_card

            report = init_from_card(model, args.init)
            reporter.emit("stage", stage="init", message=report.summary(), loaded=report.loaded, total=report.total)
            print(f"[logonet] {report.summary()}", file=sys.stderr)

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=1.0)

        def step(net: torch.nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
            image = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
            label = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
            return loss_fn(net(image).float(), label)

        warmup = args.warmup if args.warmup is not None else max(0, int(round(0.1 * args.epochs)))
        config = eng.TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                 grad_clip=args.grad_clip or None,
                                 warmup_epochs=warmup, amp=args.amp, seed=args.seed, val_every=args.val_every)
        validator = make_validator(val_items, roi, n_classes, [e["name"] for e in entries], args.overlap,
                                   runtime.resolve_amp(args.amp, dist.device), reporter)
        preprocessing = cfg.to_dict()
        for key in ("cache_dir",):
            preprocessing.pop(key, None)
        command = "logonet finetune " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 1 and sys.argv[1] == "finetune" else "logonet finetune (API)"
        started = time.time()

        def save(kind: str, net: torch.nn.Module, epochs_done: int, metrics: Mapping[str, float]) -> None:
            per_class = {e["name"]: metrics.get(f"dice_{e['name'].replace(' ', '_')}") for e in entries}
            modelcard.save(
                out / kind, net, name=args.name or out.name, architecture=architecture, labels=entries,
                preprocessing=preprocessing,
                description=f"{args.model} {preset or ''} fine-tuned with logonet finetune ({kind} epoch)".replace("  ", " "),
                training={"command": command, "data": [str(Path(d).resolve()) for d in args.data],
                          "val_data": str(Path(args.val_data).resolve()) if args.val_data else None,
                          "train_cases": [str(c["id"]) for c in train_cases],
                          "val_cases": [str(c["id"]) for c in val_cases],
                          "epochs": epochs_done, "epochs_planned": args.epochs, "lr": args.lr,
                          "init": args.init, "seed": args.seed, "world_size": dist.world_size,
                          "wall_time_s": round(time.time() - started, 1)},
                metrics={"val_dice": per_class, "val_mean_dice": metrics.get("dice"), "val_source": val_source,
                         "loss": metrics.get("loss")},
                dtype=torch.float16 if args.fp16_weights else None)

        trainer = eng.Engine(model, config, out, step_fn=step, train_loader=loader, validate_fn=validator,
                             save_fn=save, reporter=reporter, dist=dist, random_transforms=train_tf)
        result = trainer.fit(resume=args.resume)
        if result.interrupted:
            return 130
        reporter.emit("done", outputs={"best": str(out / "best"), "last": str(out / "last"),
                                       "metrics": str(out / eng.METRICS_CSV)},
                      best_dice=result.best_value, best_epoch=result.best_epoch,
                      time_s=round(time.time() - started, 1))
        if reporter.mode != "jsonl" and dist.is_main:
            print(f"best mean Dice {result.best_value if result.best_value is not None else float('nan'):.4f} at "
                  f"epoch {result.best_epoch}; model card: {out / 'best'}")
        return 0
    finally:
        distributed.cleanup_distributed(dist)
