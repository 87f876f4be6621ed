"""Scratch vs SSL-initialised default-model runs as markdown tables (REPRODUCE.md, docs/benchmarks.md).

Reads RUNS/default-ARM-sSEED/eval/{unseen,training}_dice.csv (written by ``scripts/default_model.sh evaluate``;
a run evaluated again after ``postprocess`` keeps its earlier figures in ``eval.nopost/``, and one evaluated again
after the anti-aliasing step came in keeps them in ``eval.noaa/``, each shown as an extra column) and each run's best card (synthetic-validation Dice, the only figure that
chose the checkpoint, and wall time). Usage: ``python scripts/arm_table.py [RUNS]``;
``python scripts/arm_table.py --synthval DIR`` prints the mean Dice of the ``evaluate`` CSVs in DIR (one per
synthetic validation case).
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List


#: scratch and SSL-initialised (the comparison); demo, demo3: stages 2, 3 of the curriculum from the one-scan model;
#: demo4: stage 3 again with resized-organ synthetic CTs instead of demo3's second synthetic set; demo5: with synthetic CTs of
#: another patient (the sample MR slab's anatomy); demo6: with demo3's second synthetic set redrawn with veins in the liver
ARMS = ("scratch", "ssl", "demo", "demo3", "demo4", "demo5", "demo6")


def read_dice(path: Path) -> Dict[str, float]:
    with path.open() as handle:
        return {row["name"]: float(row["dice"]) for row in csv.DictReader(handle)}


def runs_of(root: Path) -> List[Path]:
    found = [p for arm in ARMS for p in sorted(root.glob(f"default-{arm}-s*"))
             if (p / "eval" / "unseen_dice.csv").is_file()]
    if not found:
        raise SystemExit(f"no evaluated runs under {root} (run scripts/default_model.sh evaluate ARM SEED)")
    return found


#: evaluation folders of a run -> column suffix ("eval" holds the run's figures with its card's default settings)
EVALS = (("eval.nopost", " without post-processing"), ("eval.noaa", " without anti-aliasing"), ("eval", ""))


def table(runs: List[Path], which: str) -> str:
    columns = [(run, folder, run.name.replace("default-", "") + suffix) for run in runs for folder, suffix in EVALS
               if (run / folder / f"{which}_dice.csv").is_file()]
    dice = {column: read_dice(run / folder / f"{which}_dice.csv") for run, folder, column in columns}
    organs = [name for name in next(iter(dice.values())) if name != "mean"]
    arms = {arm: [r.name.replace("default-", "") for r in runs if r.name.startswith(f"default-{arm}-")]
            for arm in ARMS}
    head = ["organ"] + [column for _, _, column in columns] + [f"{a} mean" for a in arms if arms[a]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for organ in organs + ["mean"]:
        cells = [f"{dice[column].get(organ, float('nan')):.3f}" for _, _, column in columns]
        cells += [f"{statistics.mean(dice[n][organ] for n in names):.3f}" for names in arms.values() if names]
        label = f"**mean of {len(organs)}**" if organ == "mean" else organ
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def run_facts(runs: List[Path]) -> str:
    lines = ["| run | synthetic-val mean Dice (selects the checkpoint) | best epoch | wall time (min) |",
             "|---|---|---|---|"]
    for run in runs:
        meta = json.loads((run / "best" / "model.json").read_text())
        metrics, training = meta.get("metrics", {}), meta.get("training", {})
        lines.append(f"| {run.name.replace('default-', '')} | {metrics.get('val_mean_dice', float('nan')):.3f} | "
                     f"{training.get('epochs', '?')} | {training.get('wall_time_s', 0) / 60:.0f} |")
    return "\n".join(lines)


def synthetic_validation(folder: Path) -> str:
    means = [read_dice(csv_path)["mean"] for csv_path in sorted(folder.glob("*.csv"))]
    if not means:
        raise SystemExit(f"no evaluate CSVs in {folder}")
    return f"synthetic-validation mean Dice {statistics.mean(means):.4f} over {len(means)} cases"


def main(argv: List[str]) -> int:
    if argv[:1] == ["--synthval"] and len(argv) == 2:
        print(synthetic_validation(Path(argv[1])))
        return 0
    runs = runs_of(Path(argv[0] if argv else "runs"))
    print("Unseen DICOM series (never trained on, never used to choose anything), Dice per organ:\n")
    print(table(runs, "unseen"))
    print("\nTraining scan (seen in training: proves the pipeline, not the model), Dice per organ:\n")
    print(table(runs, "training"))
    print("\nModel selection and time:\n")
    print(run_facts(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
