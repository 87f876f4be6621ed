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
from .cardschema import (BUNDLED_DIR, FORMAT, FORMAT_VERSION, INTENSITY_LIMIT, MAX_CHANNELS,  # noqa: F401
                         MAX_IN_CHANNELS, MAX_LABEL_VALUE, META, ROI_SIDE_RANGE, SPACING_RANGE_MM, WEIGHTS,
                         card_folder, read_meta, resolve, validate_meta)
from .errors import UserError

PathLike = Union[str, "os.PathLike[str]"]


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
    def validated_overlap(self) -> Optional[float]:
        """The sliding-window overlap of the validation that chose this checkpoint (``segment``'s default)."""
        value = self.meta.get("metrics", {}).get("val_overlap")
        return None if value is None else float(value)

    @property
    def largest_component_values(self) -> List[int]:
        """The organs whose largest connected component alone is kept by default (``logonet postprocess``
        chose them on validation cases; none for a card without that choice)."""
        return [int(v) for v in self.meta.get("postprocessing", {}).get("largest_component", [])]

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
        from .atomic import sha256_file

        actual = sha256_file(path)
        if actual != expected_sha256:
            raise UserError(f"{path} has been modified since the model card was written (SHA-256 {actual[:12]}... "
                            f"!= {expected_sha256[:12]}... in {META}); refusing it. Use the original file.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} cannot be read as safetensors ({error}); the model card is corrupt") from error


def load(path: PathLike) -> ModelCard:
    """Validate a model card folder (``model.json`` + weights) and return it; weights are hash-checked on read.

    The schema and the folder rules are :mod:`logonet.cardschema` (shared with the Slicer modules)."""
    path = Path(path)
    return ModelCard(path=path, meta=read_meta(path))


def load_model(spec: Union[str, PathLike]) -> ModelCard:
    """``load(resolve(spec))``."""
    return load(resolve(spec))



def _tensors_to_store(model: Union[nn.Module, Mapping[str, torch.Tensor]],
                      dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """CPU copies of the weights, floating ones in ``dtype`` when given (safetensors refuses shared storage)."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    return tensors


def _card_meta(name: str, description: str, architecture: Mapping[str, Any], labels: Sequence[Mapping[str, Any]],
               preprocessing: Mapping[str, Any], training: Optional[Mapping[str, Any]],
               metrics: Optional[Mapping[str, Any]], postprocessing: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, Any]:
    """``model.json``'s content, before the weights hash is added."""
    meta = {
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
    if postprocessing:
        meta["postprocessing"] = dict(postprocessing)
    return meta


def save(out_dir: PathLike, model: Union[nn.Module, Mapping[str, torch.Tensor]], *, name: str,
         architecture: Mapping[str, Any], labels: Sequence[Mapping[str, Any]],
         preprocessing: Mapping[str, Any], training: Optional[Mapping[str, Any]] = None,
         metrics: Optional[Mapping[str, Any]] = None, description: str = "",
         dtype: Optional[torch.dtype] = None, postprocessing: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a model card folder atomically and return its path.

    The card is assembled in a temporary sibling folder and swapped in, so a reader never sees new weights
    with an old ``model.json``. ``dtype=torch.float16`` stores floating tensors in half precision (the
    bundled demo model; they are widened to float32 on load).
    """
    from safetensors.torch import save_file

    from .atomic import sha256_file

    out_dir = Path(out_dir)
    tensors = _tensors_to_store(model, dtype)
    meta = _card_meta(name, description, architecture, labels, preprocessing, training, metrics, postprocessing)
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


def update_meta(path: PathLike, **fields: Any) -> Path:
    """Set top-level ``model.json`` fields of an existing card (validated, written atomically); the weights and
    their hash are untouched. Returns the card folder."""
    folder = card_folder(path)
    meta = read_meta(folder)
    meta.update(fields)
    validate_meta(json.loads(json.dumps(meta)), folder)
    write_json_atomic(meta, folder / META)
    return folder
