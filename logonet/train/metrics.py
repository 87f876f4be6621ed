"""The per-epoch metrics of a run: ``metrics.csv`` (one row per epoch) and ``metrics.png`` (loss and Dice curves)."""
from __future__ import annotations

import csv
from io import StringIO
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from ..atomic import atomic_write

METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"


def write_metrics(history: List[Dict[str, Any]], out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """Write ``metrics.csv`` (one row per epoch, union of keys) and ``metrics.png`` (loss and Dice curves)."""
    out_dir = Path(out_dir)
    keys: List[str] = []
    for row in history:
        for key in row:
            if key not in keys:
                keys.append(key)
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path = out_dir / METRICS_CSV
    with atomic_write(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())

    # Figure + Agg canvas directly: no pyplot global state, works headless and inside other GUIs.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    epochs = [row.get("epoch") for row in history]
    for key in ("loss", "val_loss"):
        pts = [(e, row[key]) for e, row in zip(epochs, history) if isinstance(row.get(key), (int, float))]
        if pts:
            ax_loss.plot(*zip(*pts), marker=".", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend(loc="best")
    pts = [(e, row["dice"]) for e, row in zip(epochs, history) if isinstance(row.get("dice"), (int, float))]
    if pts:
        ax_dice.plot(*zip(*pts), marker=".", color="tab:green", label="val mean Dice")
        ax_dice.set_ylim(0, 1)
        ax_dice.legend(loc="best")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_title("validation Dice")
    fig.tight_layout()
    png_path = out_dir / METRICS_PNG
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return csv_path, png_path
