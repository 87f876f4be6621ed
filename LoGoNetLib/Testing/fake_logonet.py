"""A stand-in for ``python -m logonet`` used by the modules' self-tests and the fast pytest checks.

It speaks the same command line and ``--progress jsonl`` protocol as the real CLI, needs only SimpleITK and
numpy (no torch, no GPU, no download) and runs in well under a second:

- ``segment IN OUT --model DIR ...``: writes a label map on IN's grid with one box per model label (the
  model's label values), or fails like the real CLI (exit 2, ``error:`` line) when ``model.json`` is broken.
- ``finetune DATA --out DIR --epochs N ...``: prints ``epoch`` events, writes ``checkpoint.pt`` every epoch,
  stops cleanly on SIGINT or when ``DIR/STOP`` appears (exit 130, like the real engine) and writes ``best/`` +
  ``last/`` model cards at the end. ``FAKE_LOGONET_IGNORE_STOP=1`` makes it ignore both (a hung worker).
- ``sample --json``: writes a tiny CT (``FAKE_LOGONET_SAMPLE_DIR``, else a temp folder) and prints its paths.

``FAKE_LOGONET_DELAY`` (seconds per step, default 0) slows it down so a test can cancel or stop it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

DELAY = float(os.environ.get("FAKE_LOGONET_DELAY", "0"))
_stop = []


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def fail(command, message):
    print(f"logonet {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


def segment(args) -> int:
    import numpy as np
    import SimpleITK as sitk

    try:
        meta = json.loads((Path(args.model) / "model.json").read_text(encoding="utf-8"))
        labels = meta["labels"]
    except (OSError, ValueError, KeyError) as error:
        return fail("segment", f"{args.model}/model.json: is not a valid model card ({error})")
    emit("start", total=1, model=args.model, device=args.device)
    image = sitk.ReadImage(args.input)
    size = image.GetSize()
    labelmap = np.zeros(size[::-1], dtype=np.uint8)
    steps = 4
    for step in range(1, steps + 1):
        time.sleep(DELAY)
        emit("progress", step=step, total=steps, stage="inference")
    # one slab per label along k (the slowest axis), inside the ROI when one is given
    i0, j0, k0, i1, j1, k1 = [int(v) for v in args.roi.split(",")] if args.roi else (0, 0, 0) + tuple(size)
    depth = max(1, (k1 - k0) // (len(labels) + 1))
    for n, label in enumerate(labels):
        labelmap[k0 + n * depth:k0 + (n + 1) * depth, j0:j1, i0:(i0 + i1) // 2] = label["value"]
    out = sitk.GetImageFromArray(labelmap)
    out.CopyInformation(image)
    sitk.WriteImage(out, args.output)
    emit("done", outputs=[args.output], device="cpu")
    return 0


def finetune(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    start = 0
    if args.resume:
        if not checkpoint.is_file():
            return fail("finetune", f"nothing to resume in {out}")
        start = json.loads(checkpoint.read_text(encoding="utf-8"))["epoch"]
        emit("stage", stage="resume", epoch=start, path=str(checkpoint))
    ignore_stop = os.environ.get("FAKE_LOGONET_IGNORE_STOP") == "1"
    if not ignore_stop:
        signal.signal(signal.SIGINT, lambda *a: _stop.append(1))
    (out / "STOP").unlink(missing_ok=True)
    emit("start", step=start, total=args.epochs, device="cpu")
    best = 0.0
    for epoch in range(start + 1, args.epochs + 1):
        time.sleep(DELAY)
        dice = min(0.95, 0.1 * epoch)
        best = max(best, dice)
        emit("epoch", step=epoch, total=args.epochs, loss=1.0 / epoch, dice=dice, best_dice=best, lr=args.lr)
        checkpoint.write_text(json.dumps({"epoch": epoch}))
        emit("checkpoint", step=epoch, total=args.epochs, path=str(checkpoint))
        if (_stop or (out / "STOP").exists()) and not ignore_stop:
            emit("warning", message="stopped on request; resume with --resume")
            return 130
    labels = [{"value": 1, "name": "liver", "color": [221, 130, 101]}]
    for kind in ("best", "last"):
        (out / kind).mkdir(exist_ok=True)
        (out / kind / "weights.safetensors").write_bytes(b"fake")
        (out / kind / "model.json").write_text(json.dumps({
            "format": "logonet-model", "format_version": 1, "name": args.name or out.name,
            "architecture": {"name": "logonet", "preset": args.preset, "in_channels": 1, "out_channels": 2},
            "labels": labels, "preprocessing": {"spacing": [1.5, 1.5, 2.0], "intensity_window": [-175.0, 250.0],
                                                "roi_size": [96, 96, 96]}}))
    emit("done", outputs={"best": str(out / "best"), "last": str(out / "last")})
    return 0


def sample(args) -> int:
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    folder = Path(os.environ.get("FAKE_LOGONET_SAMPLE_DIR") or tempfile.mkdtemp(prefix="fake-sample-"))
    folder.mkdir(parents=True, exist_ok=True)
    array = np.zeros((12, 16, 16), dtype=np.int16)
    array[3:9, 4:12, 4:12] = 200
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((3.0, 3.0, 3.0))
    path = folder / "example_ct.nii.gz"
    sitk.WriteImage(image, str(path))
    if os.environ.get("FAKE_LOGONET_SAMPLE_FAIL"):
        print("logonet sample: error: no network and no cached copy", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"root": str(folder), "ct": str(path)}) if args.json else str(path), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fake_logonet")
    sub = parser.add_subparsers(dest="command")
    seg = sub.add_parser("segment")
    seg.add_argument("input")
    seg.add_argument("output")
    for name in ("--model", "--device", "--stats", "--progress", "--overlap"):
        seg.add_argument(name, default=None)
    seg.add_argument("--box", "--roi", dest="roi", default=None)  # --roi: the real CLI's deprecated name
    seg.add_argument("--fast", action="store_true")
    ft = sub.add_parser("finetune")
    ft.add_argument("data")
    ft.add_argument("--out", required=True)
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--roi", type=int, nargs="+")
    ft.add_argument("--lr", type=float, default=1e-4)
    for name in ("--preset", "--device", "--progress", "--name", "--init", "--model"):
        ft.add_argument(name, default=None)
    ft.add_argument("--resume", action="store_true")
    sm = sub.add_parser("sample")
    sm.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return {"segment": segment, "finetune": finetune, "sample": sample}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
