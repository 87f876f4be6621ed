"""``logonet segment`` and :class:`Predictor`: a model card + a CT volume -> an organ label map on the CT's grid.

Pipeline (docs/architecture.md): read (NIfTI/NRRD/MHA/DICOM) -> RAS + the card's spacing + HU window
(:func:`logonet.data.transforms.preprocess_for_inference`) -> MONAI sliding-window inference with Gaussian
blending (AMP on CUDA) -> argmax -> card label values -> nearest-neighbour back onto the input's exact grid
-> optional largest connected component per organ -> written with the input's geometry and label names.
CUDA out-of-memory falls back to stitching on the CPU, then to the CPU entirely; each fallback is logged.
On the CPU the windows may run through another engine (``--engine``, :mod:`logonet.engines`).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import modelcard
from .engines import ENGINE_CHOICES
from .errors import UserError
from .events import ProgressReporter

PathLike = Union[str, Path]
#: Overlap of ``--fast`` (0.25 needs ~3x fewer windows than the paper's 0.5 in 3-D).
FAST_OVERLAP = 0.25
#: Sliding-window overlap for cards that do not record the overlap their validation Dice was measured at.
DEFAULT_OVERLAP = 0.5


# ----------------------------------------------------------------------------------------------------------
# sliding window
# ----------------------------------------------------------------------------------------------------------
def scan_interval(shape: Sequence[int], roi: Sequence[int], overlap: float) -> Tuple[int, ...]:
    """The step between windows along each axis, as MONAI's ``sliding_window_inference`` computes it: the
    window's size where it spans the axis, else ``int(roi * (1 - overlap))`` and at least 1."""
    return tuple(int(r) if int(r) == int(s) else max(1, int(int(r) * (1.0 - overlap))) for s, r in zip(shape, roi))


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits for a spatial ``shape`` (after padding to ``roi``)."""
    from monai.data.utils import dense_patch_slices

    padded = [max(int(s), int(r)) for s, r in zip(shape, roi)]
    return len(dense_patch_slices(padded, list(roi), scan_interval(padded, roi, overlap)))


def sliding_window_logits(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, roi: Sequence[int], *,
                          device: torch.device, overlap: float = 0.5, sw_batch_size: int = 4,
                          amp_dtype: Optional[torch.dtype] = None, stitch_device: Optional[torch.device] = None,
                          on_window: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Class scores for a whole volume: ``image`` (1, 1, X, Y, Z) -> (1, C, X, Y, Z) float32 on ``stitch_device``.

    A volume thinner than the window (a 20-slice series) is padded with zeros, as training pads its thin
    synthetic slabs: padding must match training (a model trained on whole scans does better with edge
    padding, one trained on zero-padded slabs much worse; see Resources/Models/demo/REPRODUCE.md).
    Windows of ``roi`` run on ``device`` (autocast with ``amp_dtype`` when given) and are blended with a
    Gaussian weight map on ``stitch_device`` (default: ``device``). ``on_window`` is called per batch of windows.
    ``model`` is the network or an engine's window callable (:func:`logonet.engines.window_forward`).
    """
    from monai.inferers import sliding_window_inference

    from .runtime import autocast

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            out = model(window.to(device))
        if on_window is not None:
            on_window()
        return out.float()

    with torch.no_grad():
        return sliding_window_inference(torch.as_tensor(image).float(), tuple(int(r) for r in roi), sw_batch_size,
                                        predictor, overlap=overlap, mode="gaussian", sw_device=device,
                                        device=stitch_device or device)


#: Below this extent along the body axis, ``segment`` warns that the scan is a partial field of view.
THIN_FIELD_OF_VIEW_MM = 80.0


def body_axis_extent_mm(image: Any) -> float:
    """The physical length of ``image`` along the voxel axis that becomes the head-feet axis when inference
    reorients it (:func:`voxel_axes_in_world`); the shortest side if no axis does (a 45-degree tie)."""
    axes = voxel_axes_in_world(image)
    return next((extent for world, extent in axes if world == 2), min(extent for _, extent in axes))


# ----------------------------------------------------------------------------------------------------------
# post-processing
# ----------------------------------------------------------------------------------------------------------
def keep_largest_component(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Per organ value, keep only its largest 26-connected component (others become background)."""
    from scipy import ndimage

    out = labels.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in values:
        mask = labels == value
        if not value or not mask.any():
            continue
        components, count = ndimage.label(mask, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[mask & (components != int(sizes.argmax()))] = 0
    return out


def organ_volumes(labels: np.ndarray, spacing: Sequence[float], names: Dict[int, str]) -> List[Dict[str, Any]]:
    """Rows ``{value, name, voxels, volume_ml}`` for every labelled organ (mL = voxels * voxel mm^3 / 1000)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    return [{"value": v, "name": names[v], "voxels": int(counts[v]), "volume_ml": round(float(counts[v]) * voxel_ml, 3)}
            for v in sorted(names)]


def parse_box(text: Optional[str], size: Sequence[int]) -> Optional[Tuple[int, int, int, int, int, int]]:
    """``--box "x0,y0,z0,x1,y1,z1"`` (voxel indices i,j,k, end exclusive) checked against the volume ``size``."""
    if text is None:
        return None
    try:
        box = tuple(int(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise UserError(f"--box {text!r}: expected six integers x0,y0,z0,x1,y1,z1 (voxel indices)") from None
    if len(box) != 6:
        raise UserError(f"--box {text!r}: expected six integers x0,y0,z0,x1,y1,z1, got {len(box)}")
    lo, hi = box[:3], box[3:]
    for axis, (a, b, n) in enumerate(zip(lo, hi, size)):
        if not 0 <= a < b <= n:
            raise UserError(f"--box {text}: axis {'ijk'[axis]} range [{a}, {b}) is outside the volume (size "
                            f"{tuple(size)}; indices run 0..{n}, start < end)")
    return box  # type: ignore[return-value]


class DeprecatedAlias(argparse.Action):
    """An old option name that still works for one release: it stores into the new option's ``dest`` and prints
    a one-line notice naming the new option."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


#: Input voxel spacing outside this range (mm) is a broken header, not a CT: refused before resampling.
SPACING_RANGE_MM = (0.01, 50.0)


def available_memory() -> int:
    """Bytes of memory the process can still use (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def voxel_axes_in_world(image: Any) -> List[Tuple[int, float]]:
    """Per voxel axis of ``image``: the world axis (0 x, 1 y, 2 head-feet) it becomes after reorientation, and
    its physical length in mm."""
    direction = np.abs(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3))
    return [(int(direction[:, axis].argmax()), float(image.GetSize()[axis] * image.GetSpacing()[axis]))
            for axis in range(3)]


def resampled_shape(image: Any, spacing: Sequence[float], roi: Sequence[int]) -> Tuple[int, int, int]:
    """The grid an image gets at the card's ``spacing`` (RAS axes), padded to the window: what inference allocates."""
    shape = [(world, max(int(math.ceil(extent / float(spacing[world]))), int(roi[world])))
             for world, extent in voxel_axes_in_world(image)]
    return tuple(n for _, n in sorted(shape))  # type: ignore[return-value]


def memory_estimate(image: Any, spacing: Sequence[float], roi: Sequence[int], channels: int) -> int:
    """Bytes segmenting ``image`` needs at peak: the float copy of the input and, on the resampled grid, the
    image, one float score map per class, the blending weights and the argmax (MONAI's sliding window)."""
    voxels_in = int(np.prod(image.GetSize(), dtype=np.float64))
    voxels = float(np.prod(resampled_shape(image, spacing, roi), dtype=np.float64))
    return int(voxels_in * 8 + voxels * (4 * (channels + 3) + 8))


def check_plan(image: Any, name: str, spacing: Sequence[float], roi: Sequence[int], channels: int) -> None:
    """Refuse before resampling what cannot work: an implausible spacing, or more memory than the machine has."""
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in image.GetSpacing()):
        raise UserError(f"{name} has voxel spacing {tuple(round(s, 4) for s in image.GetSpacing())} mm, outside "
                        f"{low}-{high} mm: the header is broken or this is not a CT; fix the spacing")
    need, have = memory_estimate(image, spacing, roi, channels), available_memory()
    if need > have:
        shape = "x".join(str(n) for n in resampled_shape(image, spacing, roi))
        raise UserError(f"{name}: segmenting it needs about {need / 2 ** 30:.1f} GiB of memory (a {shape} grid at "
                        f"the model's {'x'.join(f'{s:g}' for s in spacing)} mm), but {have / 2 ** 30:.1f} GiB are "
                        "available; segment a box with --box x0,y0,z0,x1,y1,z1, or use a model with a coarser spacing")


# ----------------------------------------------------------------------------------------------------------
# the predictor
# ----------------------------------------------------------------------------------------------------------
#: Sliding-window batch per device type when none is given. On the CPU batching windows buys no speed and costs
#: memory: a BTCV-sized volume with LoGoNet-S at 2 threads peaked at 5.8 GB RSS with 4 windows per pass and 2.5 GB
#: with 1, in about the same time (docs/bench/btcv, docs/bench/btcv_sw1); the sample CT gave identical labels in the
#: same time. A GPU gains from the batch.
DEFAULT_SW_BATCH: Dict[str, int] = {"cpu": 1, "cuda": 4}


class Predictor:
    """Load a model card once, segment many volumes.

    >>> p = Predictor("demo", device="auto")
    >>> labels, timings = p.predict(sitk_image)        # SimpleITK label image on sitk_image's grid
    """

    def __init__(self, model: PathLike = "demo", device: str = "auto", *, overlap: Optional[float] = None,
                 sw_batch_size: Optional[int] = None, amp: str = "auto", reporter: Optional[ProgressReporter] = None,
                 engine: str = "torch") -> None:
        from .data.transforms import PreprocessConfig
        from .runtime import resolve_amp, select_device

        self.card = modelcard.load_model(model)
        if not self.card.labels:
            raise UserError(f"{self.card.path} is a pre-training model card without organ labels; "
                            "fine-tune it before segmenting")
        if overlap is None:  # the overlap the card's checkpoint was chosen at; older cards: the usual 0.5
            overlap = self.card.validated_overlap if self.card.validated_overlap is not None else DEFAULT_OVERLAP
        if not 0.0 <= overlap < 1.0:
            raise UserError(f"--overlap must be in [0, 1), got {overlap}")
        self.device = select_device(device)
        if sw_batch_size is None:
            sw_batch_size = DEFAULT_SW_BATCH.get(self.device.type, 4)
        if sw_batch_size < 1:
            raise UserError(f"--sw-batch must be at least 1, got {sw_batch_size}")
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.amp_dtype = resolve_amp(amp, self.device)
        self.reporter = reporter or ProgressReporter("none")
        self.cfg = PreprocessConfig.from_dict(self.card.preprocessing)
        self.net = self.card.build_model(self.device)
        self.engine, self._window_forward = self._load_engine(engine)
        self._moved_to_cpu = False  # by the last out-of-memory fallback
        self.lookup = np.asarray(self.card.label_values, dtype=np.uint16)

    @property
    def label_names(self) -> Dict[int, str]:
        return self.card.label_names

    def _warn(self, message: str) -> None:
        self.reporter.emit("warning", message=message)  # reaches stderr in every mode but jsonl

    def _load_engine(self, requested: str) -> Tuple[str, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        """The engine that runs the windows and its callable (None: the torch network itself). A missing package
        or a failed export is one warning and torch; ``--amp bf16`` asks the engine for bf16."""
        from . import engines

        engine = engines.resolve_engine(requested, self.device, notify=self._warn)
        if engine == "torch":  # asked for, the auto choice, or the fallback (already told)
            return "torch", None
        self.reporter.emit("stage", stage="engine", engine=engine)
        precision = "bf16" if self.amp_dtype == torch.bfloat16 else "fp32"
        return engines.for_card(self.card, self.net, engine, self.device, precision=precision, notify=self._warn)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 1, X, Y, Z) preprocessed -> (1, C, X, Y, Z) scores, with the CUDA out-of-memory fallbacks."""
        roi = self.cfg.roi_size
        n_windows = math.ceil(count_windows(x.shape[2:], roi, self.overlap) / self.sw_batch_size)
        cpu = torch.device("cpu")
        attempts = [(self.device, self.device)]
        if self.device.type == "cuda":
            attempts += [(self.device, cpu), (cpu, cpu)]
        for index, (compute, stitch) in enumerate(attempts):
            done = [0]

            def tick() -> None:
                done[0] += 1
                self.reporter.emit("progress", step=done[0], total=n_windows, stage="inference")

            try:
                if compute.type == "cpu" and next(self.net.parameters()).device.type != "cpu":
                    self.net = self.net.to(cpu)
                    self._moved_to_cpu = True
                elif compute.type == "cuda" and self._moved_to_cpu:  # the next case of a batch tries the GPU again
                    self.net = self.net.to(compute)
                    self._moved_to_cpu = False
                forward = self.net if self._window_forward is None or compute.type != "cpu" else self._window_forward
                return sliding_window_logits(forward, x, roi, device=compute, overlap=self.overlap,
                                             sw_batch_size=self.sw_batch_size,
                                             amp_dtype=self.amp_dtype if compute.type == "cuda" else None,
                                             stitch_device=stitch, on_window=tick)
            except torch.cuda.OutOfMemoryError:
                if index + 1 == len(attempts):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                nxt = attempts[index + 1]
                self._warn("CUDA out of memory: " + ("stitching windows on the CPU" if nxt[0].type == "cuda"
                                                     else "running the whole inference on the CPU"))
        raise AssertionError("unreachable")  # pragma: no cover

    def predict(self, image: Any, box: Optional[Sequence[int]] = None, largest_component: Optional[bool] = None,
                name: str = "the input") -> Tuple[Any, Dict[str, float]]:
        """SimpleITK volume -> (SimpleITK label image on exactly ``image``'s grid, per-stage seconds).

        ``box`` = (x0, y0, z0, x1, y1, z1) voxel indices (end exclusive): only that box is segmented, the rest
        of the output is background. ``largest_component``: None keeps only the largest connected component of
        the organs the card's ``postprocessing`` names (chosen on validation by ``logonet postprocess``), True
        of every organ, False of none.
        """
        import SimpleITK as sitk

        from .data.transforms import labels_to_input_grid, preprocess_for_inference

        timings: Dict[str, float] = {}
        t = time.perf_counter()
        source = image
        if box is not None:
            x0, y0, z0, x1, y1, z1 = box
            source = image[x0:x1, y0:y1, z0:z1]  # SimpleITK slicing keeps the physical geometry
        check_plan(source, name, self.cfg.spacing, self.cfg.roi_size,
                   len(self.card.label_values))
        self._check_intensities(source)
        self.reporter.emit("stage", stage="preprocess")
        x = preprocess_for_inference(source, self.cfg)
        if min(x.shape[1:]) == 0:  # the foreground crop found nothing above the window's lower end
            low = self.cfg.intensity_window[0]
            raise UserError(f"no voxel is above {low:g} (the model's intensity window starts there): the image "
                            "is empty in that range; is it a CT in Hounsfield units (not MR, not rescaled)?")
        self._check_field_of_view(source)  # after the errors: a warning is noise in front of one
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        self.reporter.emit("stage", stage="inference")
        scores = self.logits(torch.as_tensor(x)[None].float())
        channels = scores.argmax(1)[0].cpu().numpy()
        del scores
        timings["inference"] = time.perf_counter() - t

        t = time.perf_counter()
        self.reporter.emit("stage", stage="postprocess")
        values = self.lookup[channels].astype(np.uint8 if self.lookup.max() < 256 else np.uint16)
        label_image = labels_to_input_grid(values, source, affine=np.asarray(x.affine))
        array = sitk.GetArrayFromImage(label_image)
        if box is not None:
            full = np.zeros(tuple(reversed(image.GetSize())), dtype=array.dtype)
            full[z0:z1, y0:y1, x0:x1] = array
            array = full
        single = self.largest_component_values(largest_component)
        if single:
            array = keep_largest_component(array, single)
        if not array.any():
            self._warn("no organ was found: the output is all background (is the input an abdominal CT in "
                       "Hounsfield units, and does the model fit it?)")
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        timings["postprocess"] = time.perf_counter() - t
        return out, timings

    def largest_component_values(self, largest_component: Optional[bool]) -> List[int]:
        """The organs kept as one component: the card's choice (None), all (True) or none (False)."""
        if largest_component is None:
            return self.card.largest_component_values
        return list(self.card.label_values[1:]) if largest_component else []

    def _check_intensities(self, image: Any) -> None:
        """Warn when the values do not look like Hounsfield units (no air, e.g. MR or a rescaled image)."""
        import SimpleITK as sitk

        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        if stats.GetMinimum() > -500:
            self._warn(f"the lowest value is {stats.GetMinimum():g}: a CT in Hounsfield units has air near -1000; "
                       "is this an MR or a rescaled image? The result may be meaningless")

    def _check_field_of_view(self, image: Any) -> None:
        """Warn when the scan is a thin slab along the body axis: cut to 40 mm, scans the bundled model segments
        whole lose about a third of their Dice (validation CTs 0.75 -> 0.51, REPRODUCE.md), spleen most."""
        extent = body_axis_extent_mm(image)
        if extent < THIN_FIELD_OF_VIEW_MM:
            self._warn(f"the scan covers only {extent:.0f} mm along the body axis: on such a partial field of view "
                       "organs are found much less reliably (a 40 mm slab costs about a third of the Dice on "
                       "validation scans); segment a longer series if there is one")

    def segment_file(self, input_path: PathLike, output_path: PathLike, *, box: Optional[str] = None,
                     largest_component: Optional[bool] = None, series: Optional[str] = None) -> Dict[str, Any]:
        """Read, segment, write (atomically, with label names). Returns timings and organ volumes."""
        import SimpleITK as sitk

        from .data import volumes

        t = time.perf_counter()
        self.reporter.emit("stage", stage="read", path=str(input_path))
        image = volumes.read_image(input_path, series)
        voxel_box = parse_box(box, image.GetSize())
        read_s = time.perf_counter() - t
        labels, timings = self.predict(image, voxel_box, largest_component, name=str(input_path))
        t = time.perf_counter()
        self.reporter.emit("stage", stage="write", path=str(output_path))
        volumes.write_labelmap(labels, image, output_path, self.card.labels)
        timings = {"read": read_s, **timings, "write": time.perf_counter() - t}
        organs = organ_volumes(sitk.GetArrayViewFromImage(labels), image.GetSpacing(), self.label_names)
        return {"input": str(input_path), "output": str(output_path), "timings": timings, "volumes": organs}


# ----------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="volume file (.nii.gz, .nrrd, .mha), DICOM series folder, "
                                                       "or a folder of volumes (batch mode)")
    parser.add_argument("output", metavar="OUTPUT", help="label map file (.nii.gz, .nrrd, .seg.nrrd, .mha); "
                                                         "a folder in batch mode")
    parser.add_argument("--model", default="demo", help="model card folder, a training output folder, or 'demo'")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap (default: the overlap the model's validation Dice was measured "
                             f"at, else {DEFAULT_OVERLAP})")
    parser.add_argument("--fast", action="store_true",
                        help=f"fewer windows: overlap {FAST_OVERLAP} unless --overlap is given")
    parser.add_argument("--box", default=None, metavar="x0,y0,z0,x1,y1,z1",
                        help="segment only this box (voxel indices of INPUT, end exclusive)")
    parser.add_argument("--roi", dest="box", action=DeprecatedAlias, new="--box", help=argparse.SUPPRESS)
    parser.add_argument("--series", default=None, metavar="UID",
                        help="the DICOM series to segment when INPUT is a folder holding several")
    parser.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                        help="keep only the largest connected component of every organ (--no-largest-component: "
                             "of none; default: of the organs the model card names, chosen on validation cases "
                             "by 'logonet postprocess')")
    parser.add_argument("--stats", default=None, metavar="CSV", help="write each organ's volume in mL")
    parser.add_argument("--sw-batch", type=int, default=None,
                        help="windows per forward pass (default: 1 on the CPU, 4 on a GPU; see DEFAULT_SW_BATCH)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--engine", default="auto", choices=list(ENGINE_CHOICES),
                        help="what runs the windows on the CPU: auto (default: OpenVINO if installed, else torch; "
                             "the measured order engines.AUTO_ORDER), torch, openvino or onnxruntime (optional: "
                             "pip install 'logonet[engines]'; exported once per model and window into the user "
                             "cache); a named engine whose package is missing means torch, with a notice")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def _batch_inputs(folder: Path) -> List[Path]:
    """Volumes and DICOM series folders directly inside ``folder``."""
    from .data import volumes

    items = [p for p in sorted(folder.iterdir()) if volumes.is_volume_file(p)]
    items += [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".") and volumes.dicom_series(p)]
    return items


def _write_stats(rows: List[Dict[str, Any]], path: PathLike) -> None:
    from .atomic import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "value", "name", "voxels", "volume_ml"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        tmp.write_text(buffer.getvalue())


def plan_jobs(input_path: Path, output_path: Path) -> List[Tuple[Path, Path]]:
    """(input, output) pairs; a folder without a DICOM series is batch mode.

    Checks every output before any work (names, suffixes, writable folders, not the input itself, also via a
    symbolic or hard link): a bad output path must not cost a model load and a whole inference.
    """
    from .atomic import check_name_encodable, check_output_file, check_output_folder
    from .data import volumes

    check_name_encodable(input_path, "INPUT")
    if not input_path.exists():
        raise UserError(f"{input_path} does not exist; check the path")
    if input_path.is_dir() and not volumes.dicom_series(input_path):
        inputs = _batch_inputs(input_path)
        if not inputs:
            raise UserError(f"{input_path} holds no volumes (.nii.gz, .nrrd, .mha) and no DICOM series")
        if output_path.exists() and not output_path.is_dir():
            raise UserError(f"batch mode: OUTPUT {output_path} must be a folder, not a file")
        check_output_folder(output_path, "OUTPUT")
        jobs = []
        for item in inputs:
            stem = volumes.strip_volume_suffix(item) if item.is_file() else item.name
            suffix = volumes.volume_suffix(item) if item.is_file() and volumes.volume_suffix(item) != ".mhd" else ".nii.gz"
            jobs.append((item, output_path / f"{stem}{suffix}"))
    else:
        jobs = [(input_path, output_path)]
    for source, target in jobs:
        check_output_file(target, "OUTPUT", volumes.VOLUME_SUFFIXES, inputs=[source])
    return jobs


def torchrun_rank() -> Tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as ``torchrun`` sets them; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1"))),
            int(os.environ.get("LOCAL_RANK", "0")))


def _gather_on_rank0(payload: Any, rank: int, world: int) -> Optional[List[Any]]:
    """Every rank's ``payload`` on rank 0 (None elsewhere), over a gloo group joined only now, after the work:
    the inference itself needs no process group, and joining waits for the slowest rank."""
    import datetime

    import torch.distributed as tdist

    joined = not tdist.is_initialized()
    if joined:
        tdist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(hours=24))
    try:
        gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
        tdist.gather_object(payload, gathered, dst=0)
        return gathered
    finally:
        if joined:
            tdist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Segment one volume, or every case of a folder (batch mode). Under ``torchrun`` a batch is shared out by
    rank (rank r takes cases r, r+W, ...), each case written once by its rank, and rank 0 writes the one summary
    (``--stats``, the ``done`` event, the failures) after gathering the others' results."""
    from .atomic import check_output_file
    from .events import reporter_for

    reporter = reporter_for(args.progress)
    t0 = time.perf_counter()
    rank, world, local_rank = torchrun_rank()
    all_jobs = plan_jobs(Path(args.input), Path(args.output))
    if args.stats:
        check_output_file(args.stats, "--stats", inputs=[src for src, _ in all_jobs] + [dst for _, dst in all_jobs])
    if args.series and len(all_jobs) > 1:
        raise UserError("--series picks a series of one DICOM folder; INPUT is a folder of volumes (batch mode)")
    batch = len(all_jobs) > 1
    if world > 1 and not batch and rank > 0:
        return 0  # one volume: rank 0 segments it, the others have nothing to do
    mine = list(range(rank, len(all_jobs), world))
    jobs = [all_jobs[i] for i in mine]
    device = args.device
    if world > 1:
        if rank > 0:
            reporter = ProgressReporter("none")  # one report, rank 0's
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per local rank
    overlap = args.overlap if args.overlap is not None else (FAST_OVERLAP if args.fast else None)
    reporter.emit("start", total=len(all_jobs), model=str(args.model), device=str(device), world_size=world)
    t = time.perf_counter()
    reporter.emit("stage", stage="load_model")
    predictor = Predictor(args.model, device=device, overlap=overlap, sw_batch_size=args.sw_batch,
                          amp=args.amp, reporter=reporter, engine=args.engine) if jobs else None
    load_s = time.perf_counter() - t
    done, failures = _segment_jobs(predictor, args, list(zip(mine, jobs)), batch, reporter, rank, world)
    if world > 1 and batch:
        gathered = _gather_on_rank0((done, failures), rank, world)
        if rank > 0:
            return 0
        done = sorted((item for part in gathered or [] for item in part[0]), key=lambda item: item[0])
        failures = sorted((item for part in gathered or [] for item in part[1]), key=lambda item: item[0])
    where = str(predictor.device) if predictor is not None else str(device)
    return _report(args, reporter, [result for _, result in done], failures, len(all_jobs),
                   {"load_model": load_s, "t0": t0}, where, world)


def _segment_jobs(predictor: Optional[Predictor], args: argparse.Namespace, jobs: List[Tuple[int, Tuple[Path, Path]]],
                  batch: bool, reporter: ProgressReporter, rank: int, world: int
                  ) -> Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]:
    """Segment this rank's ``(index, (input, output))`` jobs: ``(index, result)`` pairs and ``(index, message)``
    failures. In batch mode a bad case is a failure listed at the end, not the end of the batch."""
    done: List[Tuple[int, Dict[str, Any]]] = []  # (index in all jobs, result)
    failures: List[Tuple[int, str]] = []
    for index, (src, dst) in jobs:
        if batch:
            reporter.emit("progress", step=len(done) + len(failures), total=len(jobs), stage="cases", case=str(src))
        try:
            result = predictor.segment_file(src, dst, box=args.box, largest_component=args.largest_component,
                                            series=args.series)
        except UserError as error:
            if not batch:
                raise
            failures.append((index, f"{src.name}: {error}"))
            predictor._warn(f"case {src} failed, going on with the next: {error}")
            continue
        done.append((index, result))
        timing_text = ", ".join(f"{k} {v:.2f}s" for k, v in result["timings"].items())
        if reporter.mode != "jsonl":
            # One write per line: print() writes the text and the newline separately, and with unbuffered
            # stderr (PYTHONUNBUFFERED) two torchrun ranks' lines then interleave mid-line.
            sys.stderr.write(f"{src} -> {dst} ({timing_text})" + (f" [rank {rank}]" if world > 1 else "") + "\n")
    if batch:
        reporter.emit("progress", step=len(jobs), total=len(jobs), stage="cases")
    return done, failures


def _report(args: argparse.Namespace, reporter: ProgressReporter, results: List[Dict[str, Any]],
            failures: List[Tuple[int, str]], n_jobs: int, clock: Dict[str, float], where: str, world: int) -> int:
    """The run's one summary (rank 0): ``--stats``, the failures as one UserError, the ``done`` event, timings."""
    rows = [{"case": Path(result["input"]).name, **row} for result in results for row in result["volumes"]]
    if args.stats and results:
        _write_stats(rows, args.stats)
    if failures:
        raise UserError(f"{len(failures)} of {n_jobs} cases failed ({len(results)} written): "
                        + " | ".join(message for _, message in failures))
    timings = {"load_model": round(clock["load_model"], 3),
               **{k: round(sum(r["timings"][k] for r in results), 3) for k in results[0]["timings"]},
               "total": round(time.perf_counter() - clock["t0"], 3)}
    reporter.emit("done", outputs=[r["output"] for r in results], device=where, timings=timings,
                  **({"world_size": world} if world > 1 else {}))
    if reporter.mode != "jsonl":
        print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()) + f" on {where}"
              + (f" ({world} ranks; model loading and total of rank 0)" if world > 1 else ""), file=sys.stderr)
    return 0
