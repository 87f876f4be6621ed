"""The model card: what a trained model is on disk (DESIGN.md, docs/interfaces.md).

A folder with ``weights.safetensors`` (tensors only: loading it can never run code) and ``model.json``
(architecture, labels, preprocessing, training summary, metrics, the weights' SHA-256). Every tool reads
models only through :func:`load`, which validates everything and refuses anything else with a clear
:class:`~logonet.errors.UserError`: a missing or malformed ``model.json``, a pickled or foreign weights
file, weights that were changed after the card was written, or tensors that do not fit the architecture.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import __version__
from .atomic import ordinary_mode, write_json_atomic
from .errors import UserError

FORMAT = "logonet-model"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
META = "model.json"
#: Where bundled models live in a source checkout / the Slicer extension.
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"

PathLike = Union[str, "os.PathLike[str]"]

#: Bounds on every card field that sizes work (issue 15): a card outside them is refused with the field named,
#: before anything is allocated (a huge window tried to allocate petabytes; a tiny spacing failed deep in MONAI).
ROI_SIDE_RANGE = (1, 512)  # voxels per window side
SPACING_RANGE_MM = (0.1, 20.0)
INTENSITY_LIMIT = 1e5  # |HU| of the window's ends
MAX_CHANNELS = 1024  # network outputs (classes, or a pre-training feature width)
MAX_IN_CHANNELS = 16
MAX_LABEL_VALUE = 65535  # label maps are written as uint16 at most


# ----------------------------------------------------------------------------------------------------------
# network construction
# ----------------------------------------------------------------------------------------------------------
def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """An untrained network from a card's ``architecture`` block (via :func:`logonet.nets.build_model`)."""
    from .nets import build_model

    kwargs = dict(architecture.get("kwargs") or {})
    try:
        return build_model(architecture["name"], in_channels=int(architecture.get("in_channels", 1)),
                           out_channels=int(architecture["out_channels"]), preset=architecture.get("preset"),
                           **kwargs)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"the model card's architecture {dict(architecture)} cannot be built: {error}") from error


# ----------------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelCard:
    """A validated model card. ``meta`` is the parsed ``model.json``; weights are read on demand."""

    path: Path
    meta: Dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def architecture(self) -> Dict[str, Any]:
        return self.meta["architecture"]

    @property
    def out_channels(self) -> int:
        return int(self.architecture["out_channels"])

    @property
    def labels(self) -> List[Dict[str, Any]]:
        """Foreground labels; entry ``c - 1`` is what network channel ``c`` means."""
        return list(self.meta.get("labels") or [])

    @property
    def label_values(self) -> List[int]:
        """Output value per network channel: ``[0, labels[0].value, ...]``."""
        return [0] + [int(entry["value"]) for entry in self.labels]

    @property
    def label_names(self) -> Dict[int, str]:
        return {int(entry["value"]): str(entry["name"]) for entry in self.labels}

    @property
    def preprocessing(self) -> Dict[str, Any]:
        return self.meta["preprocessing"]

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in self.preprocessing["spacing"])  # type: ignore[return-value]

    @property
    def intensity_window(self) -> Tuple[float, float]:
        low, high = self.preprocessing["intensity_window"]
        return float(low), float(high)

    @property
    def roi_size(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.preprocessing["roi_size"])  # type: ignore[return-value]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights as float32 tensors (fp16-stored cards are widened), after checking the file is intact."""
        tensors = read_weights(self.weights_path, self.meta.get("weights_sha256"))
        return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}

    def build_model(self, device: Union[str, torch.device] = "cpu") -> nn.Module:
        """The network with the card's weights loaded (eval mode). Refuses weights that do not fit exactly."""
        model = build_network(self.architecture)
        state = self.state_dict()
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if wrong:
                parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                             f"vs {tuple(expected[wrong[0]].shape)})")
            raise UserError(f"the weights in {self.weights_path} do not match the architecture in {self.path / META}: "
                            + ", ".join(parts) + "; the card is inconsistent, re-export or retrain it")
        broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if broken:
            raise UserError(f"the weights in {self.weights_path} hold NaN or infinite values ({len(broken)} tensors, "
                            f"e.g. {broken[0]}): the model is broken (did its training diverge?); use another card")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


def read_weights(path: PathLike, expected_sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a safetensors file, refusing pickles, foreign files and (given a hash) modified files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"the model card has no weights file: {path} is missing")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # A safetensors file starts with its header length (8 bytes, little-endian, so the first byte may be 0x80)
    # and then "{": only a file without that header can be a pickle (0x80 protocol byte) or a zip ("PK").
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise UserError(f"{path} is a pickle / torch.save file, not safetensors; refusing to load it because "
                        "pickles can run arbitrary code. Convert it with a trusted tool or retrain.")
    if len(head) < 9 or head[8:9] != b"{":
        raise UserError(f"{path} is not a safetensors file (bad header); the model card is corrupt")
    if expected_sha256:
        from .data.io import sha256_file

        actual = sha256_file(path)
        if actual != expected_sha256:
            raise UserError(f"{path} has been modified since the model card was written (SHA-256 {actual[:12]}... "
                            f"!= {expected_sha256[:12]}... in {META}); refusing it. Use the original file.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} cannot be read as safetensors ({error}); the model card is corrupt") from error


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON's NaN/Infinity extensions and booleans are not numbers here)."""
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(path: Path, message: str) -> UserError:
    return UserError(f"{path / META}: {message}")


def validate_meta(meta: Any, path: Path) -> Dict[str, Any]:
    """Check ``model.json`` against the schema in docs/interfaces.md; one clear error for the first problem."""
    if not isinstance(meta, dict):
        raise _fail(path, "must be a JSON object")
    if meta.get("format") != FORMAT:
        raise _fail(path, f'"format" must be "{FORMAT}" (this is not a logonet model card)')
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise _fail(path, f'"format_version" {version!r} is not supported (this logonet reads up to '
                          f"{FORMAT_VERSION}); update logonet")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _fail(path, '"architecture" must be an object with a "name"')
    out_channels = arch.get("out_channels")
    if not _is_int(out_channels) or not 1 <= out_channels <= MAX_CHANNELS:
        raise _fail(path, f'"architecture.out_channels" must be an integer from 1 to {MAX_CHANNELS}, got {out_channels!r}')
    in_channels = arch.get("in_channels", 1)
    if not _is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise _fail(path, f'"architecture.in_channels" must be an integer from 1 to {MAX_IN_CHANNELS}, '
                          f"got {in_channels!r}")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise _fail(path, '"architecture.kwargs" must be an object')
    labels = meta.get("labels", [])
    if not isinstance(labels, list):
        raise _fail(path, '"labels" must be a list')
    seen = set()
    for entry in labels:
        if not isinstance(entry, dict) or not _is_int(entry.get("value")) \
                or not 1 <= entry["value"] <= MAX_LABEL_VALUE or not isinstance(entry.get("name"), str):
            raise _fail(path, f'every label needs an integer "value" from 1 to {MAX_LABEL_VALUE} and a "name"; '
                              f"got {entry!r}")
        if entry["value"] in seen:
            raise _fail(path, f'label value {entry["value"]} appears twice')
        seen.add(entry["value"])
        color = entry.get("color", [128, 128, 128])
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise _fail(path, f'label {entry["name"]!r}: "color" must be three integers 0-255')
    # Segmentation cards: one channel per label plus background. Pre-training cards carry no labels.
    if labels and len(labels) != out_channels - 1:
        raise _fail(path, f"{len(labels)} labels but the network predicts {out_channels} channels "
                          f"(expected {out_channels - 1} labels + background)")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        raise _fail(path, '"preprocessing" must be an object')
    spacing, window, roi = pre.get("spacing"), pre.get("intensity_window"), pre.get("roi_size")
    low_mm, high_mm = SPACING_RANGE_MM
    if not (isinstance(spacing, list) and len(spacing) == 3
            and all(_is_number(v) and low_mm <= v <= high_mm for v in spacing)):
        raise _fail(path, f'"preprocessing.spacing" must be three numbers from {low_mm} to {high_mm} mm, got {spacing!r}')
    if not (isinstance(window, list) and len(window) == 2
            and all(_is_number(w) and abs(w) <= INTENSITY_LIMIT for w in window) and window[0] < window[1]):
        raise _fail(path, f'"preprocessing.intensity_window" must be [low, high] with low < high, both within '
                          f"+-{INTENSITY_LIMIT:g}, got {window!r}")
    low_roi, high_roi = ROI_SIDE_RANGE
    if not (isinstance(roi, list) and len(roi) == 3 and all(_is_int(r) and low_roi <= r <= high_roi for r in roi)):
        raise _fail(path, f'"preprocessing.roi_size" must be three integers from {low_roi} to {high_roi} '
                          f"(voxels per window side), got {roi!r}")
    return meta


def load(path: PathLike) -> ModelCard:
    """Validate a model card folder (``model.json`` + weights) and return it; weights are hash-checked on read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path} does not exist; give a model card folder or 'demo'")
    if not path.is_dir() or not (path / META).is_file():
        raise UserError(f"{path} is not a model card: expected a folder with {META} and {WEIGHTS}")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(path, f"is not valid JSON ({error})") from error
    except OSError as error:  # permissions, a broken network share
        raise _fail(path, f"cannot be read ({error.strerror or error})") from error
    validate_meta(meta, path)
    if not (path / WEIGHTS).is_file():
        raise UserError(f"the model card {path} has no {WEIGHTS}")
    return ModelCard(path=path, meta=meta)


def resolve(spec: Union[str, PathLike]) -> Path:
    """Turn ``--model`` into a card folder: ``"demo"`` (or another bundled name) or a path.

    A training output folder (with ``best/`` inside) resolves to its best model.
    """
    text = str(spec)
    candidate = Path(text).expanduser()
    if candidate.exists():
        if not (candidate / META).exists() and (candidate / "best" / META).exists():
            return candidate / "best"
        return candidate
    bundled = BUNDLED_DIR / text
    if "/" not in text and os.sep not in text and (bundled / META).is_file():
        return bundled
    known = sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / META).is_file()) if BUNDLED_DIR.is_dir() else []
    raise UserError(f"model {text!r} not found: give a model card folder (with {META} and {WEIGHTS})"
                    + (f" or one of the bundled models: {', '.join(known)}" if known else ""))


def load_model(spec: Union[str, PathLike]) -> ModelCard:
    """``load(resolve(spec))``."""
    return load(resolve(spec))


def save(out_dir: PathLike, model: Union[nn.Module, Mapping[str, torch.Tensor]], *, name: str,
         architecture: Mapping[str, Any], labels: Sequence[Mapping[str, Any]],
         preprocessing: Mapping[str, Any], training: Optional[Mapping[str, Any]] = None,
         metrics: Optional[Mapping[str, Any]] = None, description: str = "",
         dtype: Optional[torch.dtype] = None) -> Path:
    """Write a model card folder atomically and return its path.

    The card is assembled in a temporary sibling folder and swapped in, so a reader never sees new weights
    with an old ``model.json``. ``dtype=torch.float16`` stores floating tensors in half precision (the
    bundled demo model; they are widened to float32 on load).
    """
    from safetensors.torch import save_file

    from .data.io import sha256_file

    out_dir = Path(out_dir)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()  # safetensors refuses shared or strided storage
    meta: Dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name, "description": description,
        "architecture": {"name": architecture["name"], "preset": architecture.get("preset"),
                         "in_channels": int(architecture.get("in_channels", 1)),
                         "out_channels": int(architecture["out_channels"]),
                         "kwargs": dict(architecture.get("kwargs") or {})},
        "labels": [dict(entry) for entry in labels],
        "preprocessing": {"orientation": "RAS", **{k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in preprocessing.items()}},
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        "logonet_version": __version__,
    }
    validate_meta(json.loads(json.dumps(meta)), out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=str(out_dir.parent)))
    try:
        save_file(tensors, str(tmp_dir / WEIGHTS), metadata={"format": FORMAT})
        os.chmod(tmp_dir / WEIGHTS, ordinary_mode())  # ordinary file permissions, like model.json
        meta["weights_sha256"] = sha256_file(tmp_dir / WEIGHTS)
        write_json_atomic(meta, tmp_dir / META)
        os.chmod(tmp_dir, ordinary_mode(directory=True))
        if out_dir.exists():
            # Two renames (a folder cannot be swapped in one); if the second fails the old card goes back.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=str(out_dir.parent)))
            os.replace(out_dir, old / out_dir.name)
            try:
                os.replace(tmp_dir, out_dir)
            except BaseException:
                os.replace(old / out_dir.name, out_dir)
                raise
            finally:
                if out_dir.exists():
                    shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
