"""``logonet finetune``: supervised fine-tuning on a labelled dataset folder (paper section 3).

DiceCE loss (1:1), AdamW + warmup + cosine, the paper's augmentations (from :mod:`logonet.data.transforms`),
label-balanced random crops, sliding-window validation with per-class Dice, best and last model cards
(``OUT/best``, ``OUT/last``), resume, metrics CSV + plot, AMP on CUDA and torchrun/DDP. The API is
:func:`finetune` with a :class:`FinetuneConfig`; everything it shares with ``pretrain`` is in
:mod:`logonet.train.session`.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..events import ProgressReporter
from .session import TrainingConfig, TrainingSession, add_training_arguments, config_from_args


@dataclasses.dataclass
class FinetuneConfig(TrainingConfig):
    """``logonet finetune`` as a value: the shared :class:`~logonet.train.session.TrainingConfig` plus the
    options below (same names and defaults as the command line)."""

    data: Sequence[str] = ()
    init: Optional[str] = None
    crop_by: str = "foreground"
    repeats: Sequence[int] = (1,)
    grad_clip: float = 12.0
    val_data: Optional[str] = None
    val_fraction: float = 0.2
    val_every: int = 1
    overlap: float = 0.5
    augment: str = "nnunet"
    slab_prob: float = 0.0
    fp16_weights: bool = False


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="dataset folder(s) (MSD dataset.json, nnU-Net imagesTr/labelsTr, or images/ + labels/); "
                             "several folders are mixed, e.g. real scans and 'logonet synth' cases")
    add_training_arguments(parser, samples=4, cache="memory", window="-175 250")
    parser.add_argument("--init", default=None, metavar="CARD",
                        help="initialise from a model card (SSL pre-training or an earlier fine-tune)")
    parser.add_argument("--crop-by", default="foreground", choices=["foreground", "classes"],
                        help="where crops are centred: foreground (half on labelled voxels, half anywhere in the "
                             "body) or classes (each class equally often, so small organs are seen as often as "
                             "the liver)")
    parser.add_argument("--repeats", type=int, nargs="+", default=[1],
                        help="passes over the training cases per epoch: one number, or one per DATA folder (weights "
                             "a few real scans against many synthetic ones)")
    parser.add_argument("--grad-clip", type=float, default=12.0,
                        help="clip the gradient's global norm to this (nnU-Net's 12; 0: no clipping)")
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
    parser.add_argument("--slab-prob", type=float, default=0.0,
                        help="with --augment nnunet: share of crops cut to a thin axial slab (30-60 mm, the rest "
                             "padding), as a 20-slice series is (default 0)")
    parser.add_argument("--fp16-weights", action="store_true", help="store the model cards' weights in fp16")


def run(args: argparse.Namespace) -> int:
    """``logonet finetune``: the parsed arguments as a :class:`FinetuneConfig`."""
    return finetune(config_from_args(FinetuneConfig, args, augment="none" if args.no_augment else args.augment))


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
    from ..data.volumes import normalize_label_spec
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
@dataclasses.dataclass
class Cases:
    """The cases of a fine-tuning run: training and validation, label names, passes per epoch per case."""

    train: List[Dict[str, Any]]
    val: List[Dict[str, Any]]
    names: Dict[int, str]
    repeats: List[int]
    #: "held_out"; "synthetic" when --val-data was written by logonet synth/phantom; "training_scan" when validation
    #: reuses the training cases
    val_source: str

    @property
    def values(self) -> List[int]:
        return sorted(v for v in self.names if v != 0)


def gather_cases(config: FinetuneConfig) -> Cases:
    """Discover and check DATA (and ``val_data``), split off validation, and name every label value."""
    cases, names, weights = discover_folders(list(config.data), list(config.repeats))
    if config.val_data:
        from ..data.datasets import is_synthetic

        val_cases, val_names = discover_cases(config.val_data)
        train_cases, names = cases, {**val_names, **names}
        val_source = "synthetic" if is_synthetic(config.val_data) else "held_out"
    else:
        train_cases, val_cases = split_cases(cases, config.val_fraction, config.seed)
        val_source = "training_scan" if val_cases == train_cases else "held_out"
    weight_of = {str(c["id"]): w for c, w in zip(cases, weights)}
    found = Cases(train_cases, val_cases, names, [weight_of[str(c["id"])] for c in train_cases], val_source)
    if not found.values:
        raise UserError(f"{list(config.data)}: no label names found; add a dataset.json with a \"labels\" map")
    return found


def dice_ce_step():
    """The engine's ``step_fn``: DiceCE (1:1) of the network's logits against the label crops."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=1.0)

    def step(net: torch.nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        image = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
        label = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
        return loss_fn(net(image).float(), label)

    return step


def finetune(config: FinetuneConfig) -> int:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``: 0 when done, 130 when stopped by a
    signal or the STOP file (``resume=True`` continues). User mistakes raise :class:`~logonet.errors.UserError`."""
    if config.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0: off), got {config.grad_clip}")
    session = TrainingSession(config, what="training run", function="logonet.train.finetune.finetune")
    cases = gather_cases(config)
    n_classes = len(cases.values) + 1
    entries = label_entries(cases.names, cases.values)
    cfg = session.preprocessing("btcv", crop_by=config.crop_by, augment=config.augment, slab_prob=config.slab_prob)
    architecture = session.architecture(n_classes)
    with session.running() as run:
        run.reporter.emit("stage", stage="data", train_cases=len(cases.train), val_cases=len(cases.val),
                          classes=n_classes)
        train_tf, val_tf = build_transforms(cfg, cases.values)
        loader = run.loader(cases.train, train_tf, cases.repeats)
        # Small: kept in memory, reused at every validation (rank 0 validates).
        val_items = [val_tf(dict(c)) for c in cases.val] if run.context.is_main else []
        model = run.build(architecture)
        if config.init and not config.resume:
            _initialise(model, config.init, run.reporter)
        validator = make_validator(val_items, run.roi, n_classes, [e["name"] for e in entries], config.overlap,
                                   run.amp_dtype, run.reporter)
        save = run.card_saver(_card_writer(config, run, architecture, entries, cfg, cases.val_source),
                              _training_summary(config, cases, cfg))
        result = run.fit(model, loader, step=dice_ce_step(), save=save, validate=validator,
                         random_transforms=train_tf, grad_clip=config.grad_clip or None, val_every=config.val_every)
        code = run.finish(result, "best_dice")
        if code == 0:
            best = result.best_value if result.best_value is not None else float("nan")
            run.tell(f"best mean Dice {best:.4f} at epoch {result.best_epoch}; model card: {run.out / 'best'}")
        return code


def _initialise(model: torch.nn.Module, card: str, reporter: ProgressReporter) -> None:
    """``--init``: copy the matching tensors of another model card and say how many."""
    from .warmstart import init_from_card

    report = init_from_card(model, card)
    reporter.emit("stage", stage="init", message=report.summary(), loaded=report.loaded, total=report.total)
    print(f"[logonet] {report.summary()}", file=sys.stderr)


def _training_summary(config: FinetuneConfig, cases: Cases, cfg: Any) -> Dict[str, Any]:
    """The card's ``training`` block, as far as it is known before the first epoch."""
    return {"data": [str(Path(d).resolve()) for d in config.data],
            "val_data": str(Path(config.val_data).resolve()) if config.val_data else None,
            "train_cases": [str(c["id"]) for c in cases.train], "val_cases": [str(c["id"]) for c in cases.val],
            "epochs_planned": config.epochs, "lr": config.lr, "init": config.init, "seed": config.seed,
            "augmentation": cfg.augmentation_dict()}


def _card_writer(config: FinetuneConfig, run: TrainingSession, architecture: Mapping[str, Any],
                 entries: List[Dict[str, Any]], cfg: Any, val_source: str):
    """The task's part of each model card: weights, labels, preprocessing, description and Dice metrics."""
    preset = architecture["preset"]
    description = f"{config.model} {preset or ''} fine-tuned with logonet finetune".replace("  ", " ")

    def card(kind: str, net: torch.nn.Module, epochs_done: int, metrics: Mapping[str, float]) -> Dict[str, Any]:
        per_class = {e["name"]: metrics.get(f"dice_{e['name'].replace(' ', '_')}") for e in entries}
        return {"model": net, "name": config.name or run.out.name, "architecture": architecture, "labels": entries,
                "preprocessing": cfg.card_dict(), "description": f"{description} ({kind} epoch)",
                "metrics": {"val_dice": per_class, "val_mean_dice": metrics.get("dice"), "val_source": val_source,
                            "val_overlap": config.overlap, "loss": metrics.get("loss")},
                "dtype": torch.float16 if config.fp16_weights else None}

    return card

