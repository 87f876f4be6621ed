"""``logonet bench ssl``: the paper's SSL claim in miniature. ``logonet pretrain`` on unlabelled phantoms, then
``logonet finetune --init`` with 2 and with 4 labelled phantoms, against the same fine-tuning from scratch, over
several seeds (mean and spread of held-out Dice); ablations: masking off (``--phi2 0``: the slices are chosen
but nothing is zeroed) and one clusterer instead of many.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import common
from .accuracy import TEST_SEED, add_budget_arguments, finetune, held_out_dice

UNLABELED_SEED = 2000
#: variant -> PretrainConfig fields that differ from the benchmark's pre-training (None: no pre-training)
VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "scratch": None,
    "ssl": {},
    "ssl, masking off": {"phi2": 0.0},
    "ssl, 1 clusterer": {"clusterers": 1},
}
ABLATIONS = ("ssl, masking off", "ssl, 1 clusterer")

COLUMNS: List[common.Column] = [
    ("variant", "initialisation", ""), ("labeled", "labelled cases", ""), ("seeds", "seeds", ""),
    ("mean_dice", "mean Dice", ".3f"), ("std_dice", "std", ".3f"), ("per_seed", "per seed", ""),
    ("gain_vs_scratch", "gain vs scratch", "+.3f"), ("spread", "seed spread", ".3f"),
    ("beyond_spread", "gain > spread", "")]


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.add_argument("--model", default="logonet:T", help="MODEL[:PRESET] pre-trained and fine-tuned")
    parser.add_argument("--unlabeled", type=int, default=8, help="unlabelled phantoms for pre-training")
    parser.add_argument("--labeled", default="2,4", help="comma-separated labelled-case counts")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3; quick 2)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="pre-training epochs (default 10; quick 3)")
    parser.add_argument("--clusterers", type=int, default=8, help="clusterers for the 'many' setting")
    parser.add_argument("--k-min", type=int, default=8)
    parser.add_argument("--k-max", type=int, default=32)
    parser.add_argument("--no-ablations", action="store_true", help="skip masking-off and 1-clusterer")
    add_budget_arguments(parser, epochs=20)


def pretrain(data: Path, out: Path, spec: str, args: argparse.Namespace, epochs: int,
             extra: Mapping[str, Any]) -> Path:
    """:func:`logonet.ssl.pretrain.pretrain` with the benchmark's settings (``extra`` overrides them); returns
    its last model card."""
    from ..nets import parse_spec
    from ..ssl.pretrain import PretrainConfig, pretrain as run_pretrain

    name, preset = parse_spec(spec)
    settings: Dict[str, Any] = dict(roi=[args.roi], samples=args.samples, lr=args.lr, warmup=0,
                                    clusterers=args.clusterers, k_min=args.k_min, k_max=args.k_max, seed=0)
    settings.update(extra)
    config = PretrainConfig(data=str(data), out=str(out), model=name, preset=preset or "S", epochs=epochs,
                            device=str(args.device), progress="none",
                            command=f"{common.command_line(args, 'ssl')} (pre-training {spec})", **settings)
    if run_pretrain(config) != 0:
        raise RuntimeError(f"pre-training {spec} stopped early")
    return out / "last"


def summarize(results: Dict[Tuple[str, int], List[float]]) -> List[Dict[str, Any]]:
    """Rows per (variant, labelled count): mean, std, gain over scratch and whether it exceeds the seed spread
    (the larger of the two standard deviations)."""
    rows = []
    for (variant, labeled), values in results.items():
        mean, std = common.mean_std(values)
        row: Dict[str, Any] = {"variant": variant, "labeled": labeled, "seeds": len(values), "mean_dice": mean,
                               "std_dice": std, "per_seed": " ".join(f"{v:.3f}" for v in values)}
        scratch = results.get(("scratch", labeled))
        if variant != "scratch" and scratch:
            s_mean, s_std = common.mean_std(scratch)
            row["gain_vs_scratch"] = mean - s_mean
            row["spread"] = max(std, s_std)
            row["beyond_spread"] = "yes" if abs(mean - s_mean) > row["spread"] else "no"
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from ..data.phantom import write_phantom_dataset
    from ..errors import UserError

    reporter, device = common.setup(args)
    counts = sorted({int(n) for n in args.labeled.split(",") if n.strip()})
    if not counts or min(counts) < 1:
        raise UserError(f"--labeled {args.labeled!r}: give positive case counts such as 2,4")
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 3)))
    epochs = args.epochs if args.epochs is not None else (6 if args.quick else 20)
    pre_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (3 if args.quick else 10)
    variants = [v for v in VARIANTS if not (args.no_ablations and v in ABLATIONS)]
    jobs = [(v, n, s) for v in variants for n in counts for s in seeds
            if not (args.quick and v in ABLATIONS and n != counts[0])]  # quick: ablations at the smallest count
    machine = common.describe_machine(device)
    reporter.emit("start", total=len(jobs), benchmark="ssl", device=str(device))
    results: Dict[Tuple[str, int], List[float]] = {}
    with tempfile.TemporaryDirectory(prefix="logonet-bench-ssl-") as tmp:
        work = Path(tmp)
        unlabeled = write_phantom_dataset(work / "unlabeled", args.unlabeled, size=args.size, seed=UNLABELED_SEED,
                                          unlabeled=True)
        test = write_phantom_dataset(work / "test", args.test_cases, size=args.size, seed=TEST_SEED)
        # The first n phantoms of a seed are the same for every n: 2 labelled cases are a subset of 4.
        train = {n: write_phantom_dataset(work / f"train{n}", n, size=args.size, seed=0) for n in counts}
        cards: Dict[str, Optional[Path]] = {}
        for index, (variant, n, seed) in common.iterate_jobs(reporter, jobs, "runs"):
            if variant not in cards:
                extra = VARIANTS[variant]
                reporter.emit("stage", stage="pretrain", variant=variant)
                cards[variant] = None if extra is None else pretrain(
                    unlabeled, work / f"pre{len(cards)}", args.model, args, pre_epochs, extra)
            reporter.emit("stage", stage="finetune", variant=variant, labeled=n, seed=seed)
            # Same number of steps for every labelled count: fewer cases are repeated within an epoch.
            card = finetune(train[n], work / f"ft{index}", args.model, args, epochs, seed, init=cards[variant],
                            repeats=max(counts) // n)
            results.setdefault((variant, n), []).append(held_out_dice(card, test, device)["mean"])
            common.release_memory()
    rows = summarize(results)
    section = common.Section(
        "Held-out mean Dice after fine-tuning", rows, COLUMNS, "ssl.csv",
        note=f"{args.model}; pre-training: {args.unlabeled} unlabelled phantoms of {args.size}^3, {pre_epochs} epochs, "
             f"{args.clusterers} clusterers (K {args.k_min}-{args.k_max}) unless stated; fine-tuning: "
             f"{epochs} epochs x {max(counts)} steps of {args.samples} crops of {args.roi}^3, lr {args.lr}, seeds "
             f"{', '.join(map(str, seeds))}; Dice on {args.test_cases} held-out phantoms. Seed spread = the larger "
             "standard deviation of the two compared rows.")
    notes = []
    for row in rows:
        if row["variant"] == "ssl":
            verdict = "larger" if row["beyond_spread"] == "yes" else "NOT larger"
            direction = "better" if row["gain_vs_scratch"] > 0 else "worse"
            notes.append(f"{row['labeled']} labelled cases: SSL - scratch = {row['gain_vs_scratch']:+.3f} Dice (SSL "
                         f"{direction}), a difference {verdict} than the seed spread ({row['spread']:.3f}).")
    return common.finish(args, reporter, "ssl", "Self-supervised pre-training in miniature (phantoms)", machine,
                         [section], notes)
