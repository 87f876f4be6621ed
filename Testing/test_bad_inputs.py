"""Issue 15: every bad input gives one clear line, exit code 2, and writes nothing; faults never lose data.

The table ``CASES`` drives ``logonet segment | evaluate | finetune | pretrain`` in-process (``cli.main``) on tiny
volumes (12^3) and a tiny model card. For each case it asserts the exit code, a message that names the problem,
no traceback, a one-line reason, and that the workspace is byte-for-byte unchanged. Cases marked ``early``
must fail before any model card or volume is read (counted by wrapping ``modelcard.load`` and
``volumes.read_image``). docs/interfaces.md ("Bad inputs") lists the same table for users and the Slicer side.

Also here: a full disk (a small tmpfs; skipped where it cannot be mounted), property-based tests of model-card
validation and of reading mutated/truncated volumes, and the faults (SIGKILL during a checkpoint write then
resume, SIGINT during segment, two concurrent segments into one folder).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logonet import cli, infer, modelcard
from logonet.data import volumes
from logonet.data.labels import btcv_label_dicts
from logonet.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SIZE = 12


# ------------------------------------------------------------------------------------------------ helpers
def ct_array(size: int = SIZE) -> np.ndarray:
    """Air around a soft-tissue block: a CT in HU that the tiny card segments as liver."""
    array = np.full((size, size, size), -1000, np.int16)
    array[2:-2, 2:-2, 2:-2] = 60
    return array


def ct_image(spacing=(1.5, 1.5, 2.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(ct_array())
    image.SetSpacing(spacing)
    return image


def label_image(values: Optional[np.ndarray] = None, spacing=(1.5, 1.5, 2.0)) -> sitk.Image:
    if values is None:
        values = np.zeros((SIZE,) * 3, np.uint8)
        values[3:9, 3:9, 3:9] = 6
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    return image


def save_card(folder: Path, state=None, **meta_changes) -> Path:
    """A tiny LoGoNet-T card predicting liver everywhere; ``meta_changes`` ("a.b" -> value) edit model.json
    afterwards (as a hand-edited or foreign card would be), bypassing the validation ``save`` makes."""
    arch = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
    if state is None:
        torch.manual_seed(0)
        state = modelcard.build_network(arch).state_dict()
        last_bias = [k for k in state if k.endswith("bias") and state[k].shape == (3,)][-1]
        state[last_bias] = torch.tensor([0.0, -50.0, 50.0])
    modelcard.save(folder, state, name="tiny", architecture=arch, labels=btcv_label_dicts([1, 6]),
                   preprocessing={"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175.0, 250.0],
                                  "roi_size": [32, 32, 32]})
    if meta_changes:
        meta = json.loads((folder / "model.json").read_text())
        for dotted, value in meta_changes.items():
            node = meta
            *parents, last = dotted.split(".")
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[int(last) if isinstance(node, list) else last] = value
        (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    return save_card(tmp_path_factory.mktemp("card") / "tiny")


def write_dicom(image: sitk.Image, folder: Path, series: str = "1.2.826.0.1.3680043.2.1125.2",
                description: str = "abdomen") -> Path:
    """A DICOM CT series, one file per slice (``slice000.dcm`` ...), with positions and a series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        tags = [("0008|0060", "CT"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0008|103e", description),
                ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", series),
                ("0008|0018", f"{series}.{z + 1}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z)))),
                ("0020|0013", str(z + 1)), ("0028|1052", "0"), ("0028|1053", "1")]
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    return folder


def snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    """Every entry under ``folder`` (links not followed) with its size and mtime: 'nothing written' = equal."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            # A folder's mtime moves when a write check creates and removes its probe file: not a write.
            out[os.path.relpath(path, folder)] = (0, 0) if is_dir else (st.st_size, st.st_mtime_ns)
    return out


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs at ``folder`` (root on Linux only; the test is skipped elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def read_only_folder(ws: Path, stack: contextlib.ExitStack) -> Path:
    """A folder nobody may write into: a read-only tmpfs for root (permission bits do not stop root),
    mode 0555 for anyone else."""
    folder = ws / "readonly"
    if can_mount():
        stack.enter_context(tmpfs(folder, "ro,size=64k"))
    elif hasattr(os, "geteuid"):
        folder.mkdir()
        folder.chmod(0o555)
        stack.callback(folder.chmod, 0o755)
    else:  # pragma: no cover
        pytest.skip("no way to make a read-only folder here")
    return folder


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    """One bad input: ``setup(ws, card, stack)`` writes what it needs into the workspace and returns argv."""

    id: str
    command: str
    setup: Callable[[Path, Path, contextlib.ExitStack], List[str]]
    message: str  # regex that names the problem
    early: bool = False  # must fail before any model card or volume is read
    doc: str = ""  # the line in docs/interfaces.md


def seg(ws: Path, card: Path, source, output, *extra) -> List[str]:
    return ["segment", str(source), str(output), "--model", str(card), "--device", "cpu", *map(str, extra)]


def good_ct(ws: Path) -> Path:
    path = ws / "ct.nii.gz"
    if not path.exists():
        volumes.write_image(ct_image(), path)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def truncated(ws: Path, name: str, keep: float) -> Path:
    full = volumes.write_image(ct_image(), ws / f"full_{name}")
    raw = full.read_bytes()
    full.unlink()
    return write_bytes(ws / name, raw[: int(len(raw) * keep)])


def bad_crc(ws: Path) -> Path:
    raw = bytearray(volumes.write_image(ct_image(), ws / "c.nii.gz").read_bytes())
    raw[-6] ^= 0xFF  # the gzip trailer's CRC-32: ITK reads the data without noticing
    return write_bytes(ws / "c.nii.gz", bytes(raw))


def array_image(ws: Path, name: str, array: np.ndarray, spacing=None, vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing:
        image.SetSpacing(spacing)
    return volumes.write_image(image, ws / name)


def with_values(value: float) -> np.ndarray:
    array = ct_array().astype(np.float32)
    array[5, 5, 5] = value
    return array


def two_series(ws: Path) -> Path:
    write_dicom(ct_image(), ws / "dicom", series="1.2.3.100", description="abdomen")
    write_dicom(ct_image(), ws / "other", series="1.2.3.200", description="scout")
    for item in (ws / "other").iterdir():
        item.rename(ws / "dicom" / f"b_{item.name}")
    (ws / "other").rmdir()
    return ws / "dicom"


def corrupt_slice(ws: Path) -> Path:
    folder = write_dicom(ct_image(), ws / "dicom")
    raw = (folder / "slice004.dcm").read_bytes()
    (folder / "slice004.dcm").write_bytes(raw[:132] + bytes(len(raw) - 132))  # header gone, magic kept
    return folder


def missing_slice(ws: Path) -> Path:
    folder = write_dicom(ct_image(), ws / "dicom")
    (folder / "slice004.dcm").unlink()
    return folder


def non_utf8(ws: Path, name: bytes, content: Optional[Path] = None) -> str:
    path = os.path.join(os.fsencode(str(ws)), name)
    if content is not None:
        with open(path, "wb") as handle:
            handle.write(content.read_bytes())
    return os.fsdecode(path)


def linked(ws: Path, hard: bool) -> Path:
    target, link = good_ct(ws), ws / "link.nii.gz"
    if hard:
        os.link(target, link)
    else:
        link.symlink_to(target)
    return link


def card_with(ws: Path, state=None, **changes) -> Path:
    return save_card(ws / "badcard", state=state, **changes)


def nan_weights(ws: Path) -> Path:
    torch.manual_seed(0)
    arch = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
    state = modelcard.build_network(arch).state_dict()
    first = [k for k, v in state.items() if v.is_floating_point()][0]
    state[first] = torch.full_like(state[first], float("nan"))
    return card_with(ws, state=state)


def pickled_weights(ws: Path, card: Path) -> Path:
    folder = card_with(ws)
    torch.save(modelcard.load(card).state_dict(), folder / "weights.safetensors")
    return folder


def tampered_weights(ws: Path) -> Path:
    folder = card_with(ws)
    raw = bytearray((folder / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(raw))
    return folder


def other_grid(ws: Path) -> List[str]:
    volumes.write_image(label_image(), ws / "ref.nii.gz")
    volumes.write_image(label_image(spacing=(1.5, 1.5, 2.5)), ws / "pred.nii.gz")
    return ["evaluate", str(ws / "pred.nii.gz"), str(ws / "ref.nii.gz")]


def evaluate_ref(ws: Path, values: np.ndarray) -> List[str]:
    volumes.write_image(label_image(), ws / "pred.nii.gz")
    volumes.write_image(label_image(values), ws / "ref.nii.gz")
    return ["evaluate", str(ws / "pred.nii.gz"), str(ws / "ref.nii.gz")]


def evaluate_ok(ws: Path, *extra) -> List[str]:
    volumes.write_image(label_image(), ws / "pred.nii.gz")
    volumes.write_image(label_image(), ws / "ref.nii.gz")
    return ["evaluate", str(ws / "pred.nii.gz"), str(ws / "ref.nii.gz"), *map(str, extra)]


def a_file(ws: Path, name: str = "afile") -> Path:
    path = ws / name
    path.write_text("not a folder")
    return path


def train(command: str, ws: Path, out, *extra) -> List[str]:
    (ws / "data").mkdir(exist_ok=True)
    return [command, str(ws / "data"), "--out", str(out), "--device", "cpu", "--epochs", "1", *map(str, extra)]


def with_checkpoint(ws: Path) -> Path:
    (ws / "run").mkdir()
    (ws / "run" / "checkpoint.pt").write_bytes(b"old run")
    return ws / "run"


OUT = "out/seg.nii.gz"
CASES: List[Case] = [
    # --- segment: the input volume
    Case("missing-input", "segment", lambda ws, c, s: seg(ws, c, ws / "nope.nii.gz", ws / OUT),
         "does not exist", early=True, doc="INPUT does not exist"),
    Case("empty-file", "segment", lambda ws, c, s: seg(ws, c, write_bytes(ws / "e.nii.gz", b""), ws / OUT),
         "empty file", doc="a 0-byte file"),
    Case("not-a-volume", "segment", lambda ws, c, s: seg(ws, c, write_bytes(ws / "t.nii.gz", b"hello"), ws / OUT),
         "cannot read .* corrupt", doc="a text file named .nii.gz"),
    Case("truncated-nii-gz", "segment", lambda ws, c, s: seg(ws, c, truncated(ws, "t.nii.gz", 0.6), ws / OUT),
         "truncated or corrupt", doc="a truncated .nii.gz (ITK fills the rest with zeros)"),
    Case("truncated-nii", "segment", lambda ws, c, s: seg(ws, c, truncated(ws, "t.nii", 0.8), ws / OUT),
         "truncated: its header promises", doc="a truncated .nii"),
    Case("gzip-crc", "segment", lambda ws, c, s: seg(ws, c, bad_crc(ws), ws / OUT),
         "truncated or corrupt|cannot read .* corrupt", doc="a .nii.gz whose gzip checksum fails"),
    Case("truncated-nrrd", "segment", lambda ws, c, s: seg(ws, c, truncated(ws, "t.nrrd", 0.7), ws / OUT),
         "cannot read .* corrupt", doc="a truncated .nrrd"),
    Case("2d-image", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "flat.nii.gz", np.zeros((9, 9), np.int16)), ws / OUT),
         "2-D", doc="a 2-D image"),
    Case("4d-image", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "t.nii.gz", np.zeros((3, 6, 6, 6), np.int16)), ws / OUT),
         "is 4-D", doc="a 4-D image (time series, overlapping segments)"),
    Case("rgb-image", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "rgb.nrrd", np.zeros((6, 6, 6, 3), np.uint8), vector=True),
                              ws / OUT),
         "3 components per voxel", doc="an RGB/vector image"),
    Case("nan-voxels", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "n.nrrd", with_values(np.nan)), ws / OUT),
         "1 NaN or infinite voxel", doc="NaN voxels"),
    Case("inf-voxels", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "i.nrrd", with_values(np.inf)), ws / OUT),
         "NaN or infinite voxel", doc="infinite voxels"),
    Case("extreme-spacing", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "s.nii.gz", ct_array(), spacing=(500.0, 500.0, 500.0)),
                              ws / OUT),
         r"spacing \(500.0, 500.0, 500.0\) mm, outside", doc="a voxel spacing of hundreds of mm"),
    Case("air-only", "segment",
         lambda ws, c, s: seg(ws, c, array_image(ws, "air.nii.gz", np.full((SIZE,) * 3, -2000, np.int16)), ws / OUT),
         "Hounsfield", doc="no voxel inside the model's intensity window (not HU)"),
    Case("empty-folder", "segment", lambda ws, c, s: (ws / "empty").mkdir() or seg(ws, c, ws / "empty", ws / "o"),
         "holds no volumes", early=True, doc="an empty folder (batch mode finds nothing)"),
    Case("dicom-two-series", "segment", lambda ws, c, s: seg(ws, c, two_series(ws), ws / OUT),
         r"(?=.*1\.2\.3\.100 \(CT abdomen)(?=.*1\.2\.3\.200 \(CT scout)holds 2 DICOM series: .*--series UID",
         doc="a DICOM folder with several series (all listed; choose with --series UID)"),
    Case("dicom-unknown-series", "segment",
         lambda ws, c, s: seg(ws, c, two_series(ws), ws / OUT, "--series", "9.9.9"),
         "has no DICOM series 9.9.9; it has: .*1.2.3.100", doc="--series naming a series that is not there"),
    Case("dicom-corrupt-slice", "segment", lambda ws, c, s: seg(ws, c, corrupt_slice(ws), ws / OUT),
         "corrupt or unreadable DICOM slice.* slice004.dcm", doc="a corrupt DICOM slice (named)"),
    Case("dicom-missing-slice", "segment", lambda ws, c, s: seg(ws, c, missing_slice(ws), ws / OUT),
         "slice.s. missing between slice003.dcm and slice005.dcm", doc="a missing DICOM slice (its neighbours named)"),
    Case("series-on-a-file", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), ws / OUT, "--series", "1.2"),
         "--series picks a series of a DICOM folder", doc="--series with a volume file"),
    Case("input-not-utf8", "segment",
         lambda ws, c, s: seg(ws, c, non_utf8(ws, b"ct\xff.nii.gz", good_ct(ws)), ws / OUT),
         "not valid UTF-8", early=True, doc="an input name that is not valid UTF-8 (ITK aborted)"),
    # --- segment: outputs, all before any model or volume is read
    Case("output-suffix", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), ws / "seg.txt"),
         "must end in one of", early=True, doc="OUTPUT without a volume suffix"),
    Case("output-is-input", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), good_ct(ws)),
         "is the input image itself", early=True, doc="OUTPUT is INPUT"),
    Case("output-symlink-to-input", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), linked(ws, hard=False)),
         "is the input image itself", early=True, doc="OUTPUT is a symbolic link to INPUT"),
    Case("output-hardlink-to-input", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), linked(ws, hard=True)),
         "is the input image itself", early=True, doc="OUTPUT is a hard link to INPUT"),
    Case("output-is-folder", "segment",
         lambda ws, c, s: (ws / "d.nii.gz").mkdir() or seg(ws, c, good_ct(ws), ws / "d.nii.gz"),
         "is a folder; give a file name", early=True, doc="OUTPUT is an existing folder"),
    Case("output-under-a-file", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), a_file(ws) / "seg.nii.gz"),
         "afile is a file, not a folder", early=True, doc="OUTPUT's folder is a file"),
    Case("output-not-utf8", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), non_utf8(ws, b"s\xfe.nii.gz")),
         "not valid UTF-8", early=True, doc="an OUTPUT name that is not valid UTF-8"),
    Case("output-read-only", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), read_only_folder(ws, s) / "seg.nii.gz"),
         "cannot write into .*(read-only file system|permission denied)", early=True,
         doc="OUTPUT in a folder that cannot be written (read-only, no permission)"),
    Case("stats-is-folder", "segment",
         lambda ws, c, s: (ws / "st").mkdir() or seg(ws, c, good_ct(ws), ws / OUT, "--stats", ws / "st"),
         "--stats .* is a folder", early=True, doc="--stats is a folder"),
    Case("stats-under-a-file", "segment",
         lambda ws, c, s: seg(ws, c, good_ct(ws), ws / OUT, "--stats", a_file(ws) / "v.csv"),
         "--stats .* is a file, not a folder", early=True, doc="--stats in a folder that is a file"),
    Case("batch-output-is-file", "segment",
         lambda ws, c, s: (ws / "cases").mkdir() or volumes.write_image(ct_image(), ws / "cases" / "a.nii.gz") and
         seg(ws, c, ws / "cases", a_file(ws, "out.nii.gz")),
         "batch mode: OUTPUT .* must be a folder", early=True, doc="batch mode with OUTPUT a file"),
    # --- segment: the model card and options
    Case("model-missing", "segment", lambda ws, c, s: seg(ws, ws / "nomodel", good_ct(ws), ws / OUT),
         "model .* not found", doc="--model that does not exist"),
    Case("card-huge-window", "segment",
         lambda ws, c, s: seg(ws, card_with(ws, **{"preprocessing.roi_size": [100000, 100000, 100000]}), good_ct(ws),
                              ws / OUT),
         r'"preprocessing.roi_size" must be three integers from 1 to 512', doc="a card window of 100000^3 voxels"),
    Case("card-tiny-spacing", "segment",
         lambda ws, c, s: seg(ws, card_with(ws, **{"preprocessing.spacing": [0.001, 0.001, 0.001]}), good_ct(ws),
                              ws / OUT),
         r'"preprocessing.spacing" must be three numbers from 0.1 to 20', doc="a card spacing of 0.001 mm"),
    Case("card-label-value", "segment",
         lambda ws, c, s: seg(ws, card_with(ws, **{"labels.0.value": 70000}), good_ct(ws), ws / OUT),
         'integer "value" from 1 to 65535', doc="a card label value above 65535"),
    Case("card-channels", "segment",
         lambda ws, c, s: seg(ws, card_with(ws, **{"architecture.out_channels": 10 ** 6}), good_ct(ws), ws / OUT),
         '"architecture.out_channels" must be an integer from 1 to 1024', doc="a card with a million channels"),
    Case("card-window-nan", "segment",
         lambda ws, c, s: seg(ws, card_with(ws, **{"preprocessing.intensity_window": [float("nan"), 250]}),
                              good_ct(ws), ws / OUT),
         '"preprocessing.intensity_window" must be', doc="a card intensity window with NaN"),
    Case("card-nan-weights", "segment", lambda ws, c, s: seg(ws, nan_weights(ws), good_ct(ws), ws / OUT),
         "NaN or infinite values", doc="a card whose weights hold NaN"),
    Case("card-pickle", "segment", lambda ws, c, s: seg(ws, pickled_weights(ws, c), good_ct(ws), ws / OUT),
         "pickle", doc="a card whose weights are a pickle (never loaded)"),
    Case("card-tampered", "segment", lambda ws, c, s: seg(ws, tampered_weights(ws), good_ct(ws), ws / OUT),
         "modified since", doc="a card whose weights changed after it was written"),
    Case("box-outside", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), ws / OUT, "--box", "0,0,0,99,5,5"),
         "--box .* outside the volume", doc="--box outside the volume"),
    Case("sw-batch-zero", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), ws / OUT, "--sw-batch", "0"),
         "--sw-batch must be at least 1", doc="--sw-batch 0"),
    Case("overlap-one", "segment", lambda ws, c, s: seg(ws, c, good_ct(ws), ws / OUT, "--overlap", "1.5"),
         r"--overlap must be in \[0, 1\)", doc="--overlap outside [0, 1)"),
    # --- evaluate
    Case("eval-other-grid", "evaluate", lambda ws, c, s: other_grid(ws),
         "is not on the grid of .*--resample", doc="PRED on another grid than REF (--resample to allow)"),
    Case("eval-negative", "evaluate", lambda ws, c, s: evaluate_ref(ws, np.full((SIZE,) * 3, -3, np.int16)),
         "negative values", doc="a label map with negative values"),
    Case("eval-ct-as-reference", "evaluate",
         lambda ws, c, s: evaluate_ref(ws, np.arange(SIZE ** 3, dtype=np.int16).reshape((SIZE,) * 3)),
         "1728 distinct values: it looks like an image", doc="a CT given as the reference"),
    Case("eval-fractional", "evaluate",
         lambda ws, c, s: evaluate_ref(ws, np.full((SIZE,) * 3, 0.5, np.float32)),
         "fractional values", doc="a label map with fractional values"),
    Case("eval-all-background", "evaluate", lambda ws, c, s: evaluate_ref(ws, np.zeros((SIZE,) * 3, np.uint8)),
         "contains no labels", doc="a reference without labels"),
    Case("eval-truncated", "evaluate",
         lambda ws, c, s: ["evaluate", str(truncated(ws, "p.nii.gz", 0.5)), str(good_ct(ws))],
         "truncated or corrupt|cannot read .* corrupt", doc="a truncated prediction"),
    Case("eval-csv-under-a-file", "evaluate", lambda ws, c, s: evaluate_ok(ws, "--csv", a_file(ws) / "d.csv"),
         "--csv .* is a file, not a folder", early=True, doc="--csv in a folder that is a file"),
    Case("eval-csv-is-folder", "evaluate", lambda ws, c, s: (ws / "c").mkdir() or evaluate_ok(ws, "--csv", ws / "c"),
         "--csv .* is a folder", early=True, doc="--csv is a folder"),
    Case("eval-csv-is-input", "evaluate", lambda ws, c, s: evaluate_ok(ws, "--csv", ws / "ref.nii.gz"),
         "is the input image itself", early=True, doc="--csv would overwrite PRED or REF"),
    Case("eval-csv-read-only", "evaluate",
         lambda ws, c, s: evaluate_ok(ws, "--csv", read_only_folder(ws, s) / "d.csv"),
         "cannot write into", early=True, doc="--csv in a folder that cannot be written"),
    # --- finetune / pretrain: the output folder, before any data is read
    Case("finetune-out-is-file", "finetune", lambda ws, c, s: train("finetune", ws, a_file(ws)),
         "--out .* is an existing file", early=True, doc="--out is an existing file"),
    Case("finetune-out-under-file", "finetune", lambda ws, c, s: train("finetune", ws, a_file(ws) / "run"),
         "afile is a file, not a folder", early=True, doc="--out cannot be created (a file in the way)"),
    Case("finetune-out-read-only", "finetune", lambda ws, c, s: train("finetune", ws, read_only_folder(ws, s) / "run"),
         "cannot write into", early=True, doc="--out in a folder that cannot be written"),
    Case("finetune-out-not-utf8", "finetune", lambda ws, c, s: train("finetune", ws, non_utf8(ws, b"r\xff")),
         "not valid UTF-8", early=True, doc="--out name that is not valid UTF-8"),
    Case("finetune-existing-run", "finetune", lambda ws, c, s: train("finetune", ws, with_checkpoint(ws)),
         "already holds a training run .* --resume", early=True, doc="--out holds a run and no --resume"),
    Case("pretrain-out-is-file", "pretrain", lambda ws, c, s: train("pretrain", ws, a_file(ws)),
         "--out .* is an existing file", early=True, doc="--out is an existing file"),
    Case("pretrain-out-under-file", "pretrain", lambda ws, c, s: train("pretrain", ws, a_file(ws) / "run"),
         "afile is a file, not a folder", early=True, doc="--out cannot be created (a file in the way)"),
]


@pytest.fixture
def counted(monkeypatch) -> Dict[str, int]:
    """Counts model-card and volume reads, to prove that output checks come first."""
    counts = {"card": 0, "volume": 0}
    real_load, real_read = modelcard.load, volumes.read_image

    def load(*args, **kwargs):
        counts["card"] += 1
        return real_load(*args, **kwargs)

    def read_image(*args, **kwargs):
        counts["volume"] += 1
        return real_read(*args, **kwargs)

    monkeypatch.setattr(modelcard, "load", load)
    monkeypatch.setattr(volumes, "read_image", read_image)
    return counts


def test_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == {"segment", "evaluate", "finetune", "pretrain"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, card, counted, capsys):
    ws = tmp_path / "ws dir é"  # a space and a non-ASCII letter in every path
    ws.mkdir()
    with contextlib.ExitStack() as stack:
        argv = case.setup(ws, card, stack)
        before = snapshot(ws)
        counted.update(card=0, volume=0)
        code = cli.main(argv)
        captured = capsys.readouterr()
        after = snapshot(ws)
    err = captured.err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"logonet {case.command}: error: ")]
    assert len(lines) == 1 and err.rstrip("\n").splitlines()[-1] == lines[0], err  # one line, the last one
    assert re.search(case.message, lines[0]), (case.message, lines[0])
    assert after == before, "the failed command wrote or changed files"
    if case.early:
        assert counted == {"card": 0, "volume": 0}, f"read {counted} before refusing a bad output/input name"


def test_docs_table_lists_every_case():
    """docs/interfaces.md carries the same table, so users and the Slicer side know what to expect."""
    text = (ROOT / "docs" / "interfaces.md").read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/interfaces.md lacks rows for {missing}"


# ------------------------------------------------------------------------------------------------ boundary
def test_error_event_under_jsonl(tmp_path, card, capsys):
    code = cli.main(seg(tmp_path, card, tmp_path / "nope.nii.gz", tmp_path / "o.nii.gz", "--progress", "jsonl"))
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert code == 2 and events[-1]["event"] == "error" and "does not exist" in events[-1]["message"]


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, card):
    """Only UserError (and environment OSErrors) become one line: a programming error must stay visible."""
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(infer, "plan_jobs", broken)
    monkeypatch.setenv("LOGONET_LOG_DIR", str(tmp_path / "logs"))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(seg(tmp_path, card, good_ct(tmp_path), tmp_path / "o.nii.gz"))
    (log,) = (tmp_path / "logs").glob("crash-*.log")  # and the traceback is kept in a log file
    assert "ValueError: a bug, not a user mistake" in log.read_text()


def test_environment_oserror_is_one_line(monkeypatch, tmp_path, card, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(infer, "plan_jobs", full)
    assert cli.main(seg(tmp_path, card, good_ct(tmp_path), tmp_path / "o.nii.gz")) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ checks
def test_output_problem_found_before_the_model_is_loaded(tmp_path, card, counted, monkeypatch, capsys):
    """Acceptance: write problems are reported before inference; the model is never loaded."""
    built = []
    monkeypatch.setattr(modelcard.ModelCard, "build_model", lambda self, *a, **k: built.append(1))
    with contextlib.ExitStack() as stack:
        target = read_only_folder(tmp_path, stack) / "seg.nii.gz"
        assert cli.main(seg(tmp_path, card, good_ct(tmp_path), target)) == 2
    assert "cannot write into" in capsys.readouterr().err
    assert built == [] and counted == {"card": 0, "volume": 0}


def test_memory_estimate_refuses_before_resampling(tmp_path, card, monkeypatch, capsys):
    from logonet.data import transforms

    resampled = []
    monkeypatch.setattr(infer, "available_memory", lambda: 1 << 20)  # 1 MiB left
    real = transforms.preprocess_for_inference
    monkeypatch.setattr(transforms, "preprocess_for_inference", lambda *a: resampled.append(1) or real(*a))
    assert cli.main(seg(tmp_path, card, good_ct(tmp_path), tmp_path / "o.nii.gz")) == 2
    err = capsys.readouterr().err
    assert re.search(r"needs about [\d.]+ GiB of memory .* GiB are available; segment a box with --box", err), err
    assert resampled == [] and not (tmp_path / "o.nii.gz").exists()


def test_memory_estimate_scales_with_the_grid():
    small, big = ct_image(), ct_image(spacing=(15.0, 15.0, 20.0))
    assert infer.resampled_shape(small, (3.0, 3.0, 3.0), (32, 32, 32)) == (32, 32, 32)  # padded to the window
    assert infer.resampled_shape(big, (3.0, 3.0, 3.0), (32, 32, 32)) == (60, 60, 80)
    assert infer.memory_estimate(big, (3.0,) * 3, (32,) * 3, 3) > infer.memory_estimate(small, (3.0,) * 3, (32,) * 3, 3)


def test_dicom_series_option_picks_one(tmp_path, card, capsys):
    folder = two_series(tmp_path)
    out = tmp_path / "seg.nii.gz"
    assert cli.main(seg(tmp_path, card, folder, out, "--series", "1.2.3.200")) == 0, capsys.readouterr().err
    assert volumes.read_image(out).GetSize() == (SIZE,) * 3


def test_batch_goes_on_past_a_bad_case_and_fails_at_the_end(tmp_path, card, capsys):
    cases = tmp_path / "cases"
    volumes.write_image(ct_image(), cases / "a.nii.gz")
    (cases / "b.nii.gz").write_text("not a volume")
    volumes.write_image(ct_image(), cases / "c.nii.gz")
    code = cli.main(seg(tmp_path, card, cases, tmp_path / "out", "--stats", tmp_path / "v.csv"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(r"error: 1 of 3 cases failed \(2 written\): b.nii.gz: cannot read", err), err
    assert "warning: case" in err  # said when it happened, too
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    assert (tmp_path / "v.csv").read_text().count("a.nii.gz") and "b.nii.gz" not in (tmp_path / "v.csv").read_text()


def test_warnings_reach_stderr_off_a_terminal(tmp_path, card, capsys):
    """The MR-like input warning is printed although stderr is not a terminal and no --progress was given."""
    mr = np.full((SIZE,) * 3, 0, np.int16)
    mr[2:-2, 2:-2, 2:-2] = 200
    src = array_image(tmp_path, "mr.nii.gz", mr)
    assert cli.main(seg(tmp_path, card, src, tmp_path / "o.nii.gz")) == 0
    assert "warning: the lowest value is 0" in capsys.readouterr().err


def test_a_thin_slab_is_segmented_with_a_field_of_view_warning(tmp_path, card, capsys):
    """A scan that covers little of the body's long axis (12 slices of 2 mm) is segmented, with a warning that
    names its extent; 12 slices of 10 mm (120 mm) get none. The extent is taken along the image axis closest to
    head-feet, whatever the axis order."""
    from logonet.infer import body_axis_extent_mm

    thin = tmp_path / "thin.nii.gz"
    volumes.write_image(ct_image(), thin)
    assert cli.main(seg(tmp_path, card, thin, tmp_path / "o.nii.gz")) == 0
    assert "warning: the scan covers only 24 mm along the body axis" in capsys.readouterr().err
    long = tmp_path / "long.nii.gz"
    volumes.write_image(ct_image(spacing=(1.5, 1.5, 10.0)), long)
    assert cli.main(seg(tmp_path, card, long, tmp_path / "o2.nii.gz")) == 0
    assert "covers only" not in capsys.readouterr().err
    image = sitk.Image([100, 20, 10], sitk.sitkInt16)
    image.SetSpacing((1.0, 2.0, 5.0))
    assert body_axis_extent_mm(image) == 50.0
    image.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # image axis 0 runs head-feet (LPS z)
    assert body_axis_extent_mm(image) == 100.0


def test_stale_temps_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    from logonet.atomic import clean_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.pt.{int(dead.stdout)}.abc123.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.def456.tmp"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    (tmp_path / "checkpoint.pt").write_bytes(b"keep")
    assert clean_stale_temps(tmp_path) == [stale]
    assert live.exists() and (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------------------ full disk
def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system holding ``folder``, then give ``leave`` bytes back."""
    filler = folder / "filler"
    fd = os.open(str(filler), os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\1" * 4096)
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root on Linux")
@pytest.mark.parametrize("leave", [0, 4096], ids=["no-byte-left", "one-page-left"])
def test_full_disk_never_replaces_a_good_output(tmp_path, card, capsys, leave):
    """Acceptance: a full disk never replaces a good output with a bad one, and never exits 0.

    With one page left the small label sidecar fits but the label map does not: SimpleITK writes a
    truncated .nii.gz without an error, and only the read-back catches it."""
    src = good_ct(tmp_path)
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        out = disk / "seg.nii.gz"
        assert cli.main(seg(tmp_path, card, src, out)) == 0
        capsys.readouterr()
        old = {p.name: p.read_bytes() for p in disk.iterdir()}
        fill(disk, leave)
        code = cli.main(seg(tmp_path, card, src, out, "--largest-component"))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert re.search(r"no space left|disk is full", err), err
        assert {p.name: p.read_bytes() for p in disk.iterdir() if p.name != "filler"} == old
        assert volumes.read_image(out).GetSize() == (SIZE,) * 3


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root on Linux")
def test_full_disk_write_image_is_verified(tmp_path):
    """Unit level: a noisy label map that cannot fit is refused by the read-back; the old file stays."""
    with tmpfs(tmp_path / "disk", "size=128k") as disk:
        reference = sitk.Image([48, 48, 48], sitk.sitkInt16)
        good = volumes.write_labelmap(np.zeros((48, 48, 48), np.uint8), reference, disk / "l.nii.gz", {1: "spleen"})
        old = good.read_bytes()
        fill(disk, 16384)
        noisy = np.random.default_rng(0).integers(0, 14, (48, 48, 48)).astype(np.uint8)
        with pytest.raises(UserError, match="writing .*l.nii.gz failed: the written file .*disk is full"):
            volumes.write_labelmap(noisy, reference, disk / "l.nii.gz", {1: "spleen"})
        assert good.read_bytes() == old
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "l.nii.gz", "l.nii.gz.labels.json"]


# ------------------------------------------------------------------------------------------------ properties
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12)
                           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)
CARD_FIELDS = ["format", "format_version", "architecture", "architecture.name", "architecture.out_channels",
               "architecture.in_channels", "architecture.kwargs", "labels", "labels.0", "labels.0.value",
               "labels.0.name", "labels.0.color", "preprocessing", "preprocessing.spacing",
               "preprocessing.spacing.1", "preprocessing.intensity_window", "preprocessing.intensity_window.0",
               "preprocessing.roi_size", "preprocessing.roi_size.2"]


def _valid_meta() -> dict:
    return {"format": modelcard.FORMAT, "format_version": 1,
            "architecture": {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}},
            "labels": [{"value": 1, "name": "spleen", "color": [1, 2, 3]}, {"value": 6, "name": "liver"}],
            "preprocessing": {"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175, 250], "roi_size": [32, 32, 32]}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(CARD_FIELDS), JSON_VALUES), min_size=1, max_size=3))
def test_card_validation_accepts_only_cards_within_bounds(edits):
    """Any edit of model.json is either refused with a UserError naming model.json, or the card is within
    every bound that sizes work."""
    meta = _valid_meta()
    for dotted, value in edits:
        node = meta
        *parents, last = dotted.split(".")
        try:
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[int(last) if isinstance(node, list) else last] = value
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    try:
        modelcard.validate_meta(meta, Path("card"))
    except UserError as error:
        assert "model.json" in str(error)
        return
    pre, arch = meta["preprocessing"], meta["architecture"]
    assert all(isinstance(r, int) and 1 <= r <= 512 for r in pre["roi_size"])
    assert all(0.1 <= s <= 20 for s in pre["spacing"])
    assert pre["intensity_window"][0] < pre["intensity_window"][1]
    assert 1 <= arch["out_channels"] <= 1024
    assert not meta["labels"] or len(meta["labels"]) == arch["out_channels"] - 1
    assert all(1 <= e["value"] <= 65535 for e in meta["labels"])


FORMATS = [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"]
_EXAMPLE = iter(range(10 ** 9))  # a fresh file name per example: no reader may see a previous example's file


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Dict[str, bytes]:
    folder = tmp_path_factory.mktemp("originals")
    array = np.random.default_rng(1).integers(-1000, 1000, (8, 8, 8)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    return {suffix: volumes.write_image(image, folder / f"v{suffix}").read_bytes() for suffix in FORMATS}


def _read_or_refuse(path: Path):
    try:
        return volumes.read_image(path)
    except UserError:
        return None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from(FORMATS), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_volumes_load_completely_or_are_refused(originals, tmp_path, suffix, cut):
    raw = originals[suffix]
    path = tmp_path / f"t{next(_EXAMPLE)}{suffix}"
    path.write_bytes(raw[: int(len(raw) * cut)])
    image = _read_or_refuse(path)
    if image is not None:  # only a cut that lost nothing may load, e.g. the last byte of a gzip trailer
        (tmp_path / f"o{suffix}").write_bytes(raw)
        original = volumes.read_image(tmp_path / f"o{suffix}")
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original))
        assert volumes.same_geometry(image, original)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from(FORMATS), flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True),
                                                                  st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_volumes_load_as_volumes_or_are_refused(originals, tmp_path, suffix, flips):
    """Flipped bytes: refused cleanly (UserError), or a 3-D scalar finite volume. A .nii.gz is protected by its
    gzip checksum, so there any load is the original voxel for voxel."""
    raw = bytearray(originals[suffix])
    for where, mask in flips:
        raw[int(len(raw) * where)] ^= mask
    path = tmp_path / f"m{next(_EXAMPLE)}{suffix}"
    path.write_bytes(bytes(raw))
    image = _read_or_refuse(path)
    if image is None:
        return
    assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1
    if suffix == ".nii.gz":
        (tmp_path / "o.nii.gz").write_bytes(originals[suffix])
        original = volumes.read_image(tmp_path / "o.nii.gz")
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original))


# ------------------------------------------------------------------------------------------------ faults
def _env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


CHECKPOINT_WRITER = r"""
import sys, torch
from torch import nn
from logonet.train import engine as eng
from logonet.train import loader as loading
from logonet.train.distributed import DistContext

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("pad", torch.zeros(12_000_000))  # 48 MB: every checkpoint write takes a while

    def forward(self, x):
        return self.lin(x)

def build(out, epochs):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    loader = loading.make_loader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, seed=0)
    step = lambda m, b, d: nn.functional.mse_loss(m(b[0]), b[1])
    return eng.Engine(Toy(), eng.TrainConfig(epochs=epochs, lr=0.01, warmup_epochs=0, seed=1), out, step_fn=step,
                      train_loader=loader, dist=DistContext(device=torch.device("cpu")))

if __name__ == "__main__":
    build(sys.argv[1], 100000).fit()
"""


def test_sigkill_during_checkpoint_write_then_resume(tmp_path):
    """A SIGKILL while checkpoint.pt is being written: the file is the last complete one, the half-written temp
    is removed when the run starts again, and --resume continues from that checkpoint."""
    import importlib.util

    from logonet.atomic import prepare_run_folder
    from logonet.train.checkpoints import load_checkpoint

    script = tmp_path / "writer.py"
    script.write_text(CHECKPOINT_WRITER)
    out = tmp_path / "run"
    for _ in range(3):  # the kill must land inside a write; retry when it lands between two
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=_env())
        deadline = time.monotonic() + 120
        temps: List[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [p for p in out.glob(".checkpoint.pt.*.tmp")] if (out / "checkpoint.pt").exists() else []
            if temps and temps[0].exists() and temps[0].stat().st_size > 0:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if list(out.glob(".checkpoint.pt.*.tmp")):
            break
    leftovers = list(out.glob(".checkpoint.pt.*.tmp"))
    assert leftovers, "the kill never landed inside a checkpoint write"
    saved = load_checkpoint(out / "checkpoint.pt")  # complete: loads with weights_only
    assert saved["epoch"] >= 1
    prepare_run_folder(out)
    assert not list(out.glob(".*.tmp"))
    spec = importlib.util.spec_from_file_location("writer", script)
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    engine = writer.build(out, saved["epoch"] + 1)
    result = engine.fit(resume=True)
    assert engine.start_epoch == saved["epoch"] and result.epochs_done == saved["epoch"] + 1


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt handler: under the full
    # suite (pytest-xdist) the test process can hold SIGINT ignored, and the interrupted child ran on for minutes.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _segment_process(tmp_path: Path, card: Path, source: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "logonet", "segment", str(source), str(out), "--model", str(card),
                             "--device", "cpu", "--progress", "jsonl", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
                            preexec_fn=_default_sigint if os.name == "posix" else None)


def test_sigint_during_segment_leaves_nothing(tmp_path, card):
    big = sitk.GetImageFromArray(np.full((64, 64, 64), 60, np.int16))  # all body: thousands of windows
    big.SetSpacing((3.0, 3.0, 3.0))
    src = volumes.write_image(big, tmp_path / "ct.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    parent_sigint = signal.getsignal(signal.SIGINT)  # in the message if the child ignores the interrupt
    proc = _segment_process(tmp_path, card, src, out_dir / "seg.nii.gz", "--overlap", "0.95")
    for line in proc.stdout:
        if '"stage": "inference"' in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"segment ignored SIGINT (this process's SIGINT handler: {parent_sigint!r})")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_two_concurrent_segments_into_one_folder(tmp_path, card):
    src = good_ct(tmp_path)
    out_dir = tmp_path / "out"
    procs = [_segment_process(tmp_path, card, src, out_dir / "seg.nii.gz") for _ in range(2)]  # the same target
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.nii.gz", "seg.nii.gz.labels.json"]  # no temps
    labels = sitk.GetArrayFromImage(volumes.read_image(out_dir / "seg.nii.gz"))
    assert labels.shape == (SIZE,) * 3 and set(np.unique(labels).tolist()) == {0, 6}  # liver inside the body
