"""Window engines: a model card's network as a callable that runs one batch of sliding windows on the CPU, with
torch (the default), ONNX Runtime or OpenVINO (``logonet segment --engine``; measured by ``logonet bench engines``).

The other engines are optional (``pip install 'logonet[engines]'``): a missing package means torch, with one
notice. Their network is exported once per weights and window, for the fixed input (1, 1, R, R, R):

- ONNX by ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``; it needs the ``onnx`` package).
  The torch.export-based exporter needs ``onnxscript`` and took about ten times as long on LoGoNet-T; it is used
  only if the TorchScript one fails.
- OpenVINO IR (``.xml`` + ``.bin``) read from that ONNX file by ``openvino.Core.read_model`` and written by
  ``openvino.save_model`` (float32 weights). Not ``openvino.convert_model``: that goes through OpenVINO's
  conversion tool, which sends usage telemetry unless the user opted out.

Exports are cached in ``<user cache>/engines/<key>/`` (see :func:`cache_folder`): the key is the card's weights
SHA-256, a digest of its architecture, the window and :data:`EXPORT_VERSION`. Precision is not part of the key
because the files do not depend on it: it is a run-time setting (OpenVINO's inference precision hint). Files are
written atomically; nothing is unpickled and nothing from a model folder is executed (the card's weights are
safetensors, and ONNX / OpenVINO IR files are graphs, not code).

Precision: ``fp32`` everywhere; ``bf16`` = OpenVINO's ``INFERENCE_PRECISION_HINT=bf16`` (OpenVINO's CPU plugin
*defaults* to bf16 on CPUs with native bf16, so fp32 is always set explicitly) or torch's CPU autocast. ONNX
Runtime's CPU provider offers no bf16 mode (no precision hint, no bf16 convolution kernels): it runs fp32.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UserError

#: The engines ``--engine`` names (``auto`` picks one of them).
ENGINES: Tuple[str, ...] = ("torch", "openvino", "onnxruntime")
ENGINE_CHOICES: Tuple[str, ...] = ("auto",) + ENGINES
#: ``--engine auto`` (segment's default) takes the first engine of this order whose package is installed. Set
#: from the measured engine table in docs/benchmarks.md (``logonet bench engines``, 2 threads, 2026-12-03):
#: OpenVINO fp32 ran a 64^3 window 1.9x (LoGoNet-T) / 1.8x (LoGoNet-S) faster than torch and the demo model's
#: sample-CT inference 2.3x faster with 100% equal labels; ONNX Runtime was no faster (0.86-1.0x), so it is
#: only used when asked for by name. Re-measured 2026-12-04 with malloc keeping freed memory (torch's own gain):
#: OpenVINO still 1.84x (LoGoNet-S window) and 2.14x (sample CT) faster.
AUTO_ORDER: Tuple[str, ...] = ("openvino", "torch")
PRECISIONS: Tuple[str, ...] = ("fp32", "bf16")
#: The Python package each optional engine needs, and how to get it.
PACKAGES: Dict[str, str] = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
INSTALL_HINT = "pip install 'logonet[engines]'"
#: Bump when the export changes (opset, exporter options): older cached exports are then ignored.
EXPORT_VERSION = 1
ONNX_OPSET = 17
ONNX_NAME, OPENVINO_NAME = "model.onnx", "openvino.xml"

Notify = Callable[[str], None]
WindowForward = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# which engine
# ----------------------------------------------------------------------------------------------------------
def import_engine(engine: str) -> Any:
    """The engine's Python package (``onnxruntime`` / ``openvino``); ``ImportError`` when it is not installed or
    cannot load (a broken install counts as missing)."""
    try:
        return importlib.import_module(PACKAGES[engine])
    except ImportError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a shared library that fails to load
        raise ImportError(f"{PACKAGES[engine]} cannot be imported: {error}") from error


def installed(engine: str) -> bool:
    """Whether ``engine`` can run here (torch always can)."""
    if engine == "torch":
        return True
    try:
        import_engine(engine)
    except ImportError:
        return False
    return True


def resolve_engine(requested: str, device: torch.device, notify: Optional[Notify] = None) -> str:
    """The engine that will run: ``requested`` if it can, else torch with one notice (through ``notify``).

    ``auto`` is the first installed engine of :data:`AUTO_ORDER` (torch on a GPU, silently). A named engine
    whose package is missing, or a CPU engine asked for on a GPU device, runs as torch with one notice."""
    requested = (requested or "torch").lower()
    if requested not in ENGINE_CHOICES:
        raise UserError(f"unknown engine {requested!r}: use one of {', '.join(ENGINE_CHOICES)}")
    if requested == "auto":
        if device.type != "cpu":
            return "torch"
        return next((e for e in AUTO_ORDER if installed(e)), "torch")
    if requested == "torch":
        return "torch"
    if device.type != "cpu":
        _tell(notify, f"--engine {requested} runs on the CPU only; running with torch on {device}")
        return "torch"
    try:
        import_engine(requested)
    except ImportError as error:
        _tell(notify, f"--engine {requested}: {_missing(requested, error)}; running with torch")
        return "torch"
    return requested


def _missing(engine: str, error: BaseException) -> str:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"the {PACKAGES[engine]} package is not available ({reason}; {INSTALL_HINT})"


def _tell(notify: Optional[Notify], message: str) -> None:
    if notify is not None:
        notify(message)


# ----------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$LOGONET_ENGINE_CACHE`` if set (a shared or scratch folder; the test suite's own), else
    ``<user cache>/engines`` (``$LOGONET_CACHE/engines``, else e.g. ``~/.cache/logonet/engines``)."""
    from .data.sample import user_cache_dir

    own = os.environ.get("LOGONET_ENGINE_CACHE")
    return Path(own).expanduser() if own else user_cache_dir() / "engines"


def cache_key(weights_sha256: str, architecture: Mapping[str, Any], roi: Sequence[int]) -> str:
    """``<weights sha256, 16 hex>-<architecture digest, 8 hex>-<R>x<R>x<R>-v<EXPORT_VERSION>``: what an export
    depends on. The architecture is part of it because options outside the weights can change the graph."""
    if not weights_sha256:
        raise ValueError("an export cache key needs the weights' SHA-256")
    arch = hashlib.sha256(json.dumps(dict(architecture), sort_keys=True, default=str).encode()).hexdigest()
    window = "x".join(str(int(r)) for r in roi)
    return f"{weights_sha256[:16]}-{arch[:8]}-{window}-v{EXPORT_VERSION}"


def cache_folder(card: Any, roi: Optional[Sequence[int]] = None, root: Optional[Path] = None) -> Path:
    """Where a model card's exports for window ``roi`` (default: the card's) are cached."""
    sha = card.meta.get("weights_sha256")
    if not sha:  # an older card without the hash: hash the weights themselves
        from .atomic import sha256_file

        sha = sha256_file(card.weights_path)
    window = tuple(roi) if roi is not None else card.roi_size
    return (root if root is not None else cache_root()) / cache_key(sha, card.architecture, window)


# ----------------------------------------------------------------------------------------------------------
# exporting
# ----------------------------------------------------------------------------------------------------------
def export_onnx(net: torch.nn.Module, roi: Sequence[int], path: Path, in_channels: int = 1) -> Path:
    """``net`` (on the CPU, eval mode) as ONNX for the input (1, in_channels, *roi), written atomically to ``path``."""
    from .atomic import atomic_write

    example = torch.zeros(1, int(in_channels), *(int(r) for r in roi))
    with atomic_write(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=ONNX_OPSET)
        try:
            torch.onnx.export(net, (example,), str(tmp), dynamo=False, do_constant_folding=True, **kwargs)
        except Exception as legacy_error:  # noqa: BLE001 - try the other exporter before giving up
            try:
                torch.onnx.export(net, (example,), str(tmp), dynamo=True, external_data=False, **kwargs)
            except Exception:  # noqa: BLE001
                raise legacy_error from None
    return path


def export_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """The ONNX file as OpenVINO IR (``xml_path`` + the ``.bin`` beside it, float32 weights). The ``.bin`` is moved
    into place before the ``.xml``, so an ``.xml`` that exists always has its weights."""
    import openvino

    model = openvino.Core().read_model(str(onnx_path))
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{xml_path.name}.{os.getpid()}.", dir=str(xml_path.parent)) as tmp:
        tmp_xml = Path(tmp) / xml_path.name
        openvino.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
    return xml_path


def exported(net: torch.nn.Module, engine: str, roi: Sequence[int], folder: Path, in_channels: int = 1) -> Path:
    """The engine's file in ``folder``, exported only when it is not there yet (the cache)."""
    onnx_path = folder / ONNX_NAME
    if not onnx_path.is_file() and not (engine == "openvino" and (folder / OPENVINO_NAME).is_file()):
        export_onnx(net, roi, onnx_path, in_channels)
    if engine == "onnxruntime":
        return onnx_path
    xml_path = folder / OPENVINO_NAME
    if not xml_path.is_file():
        export_openvino(onnx_path, xml_path)
    return xml_path


# ----------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------
class TorchForward:
    """The network itself, float32 or under torch's CPU bfloat16 autocast: the reference of the comparison."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, precision: str = "fp32") -> None:
        self.net, self.precision = net, precision
        self.runs_as = precision

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        with torch.no_grad(), context:
            return self.net(window).float()


class ExportedForward:
    """An exported network that takes one window (1, C, R, R, R) at a time: a batch of windows runs one by one."""

    name = ""

    def __init__(self, path: Path, roi: Sequence[int]) -> None:
        self.path, self.roi = path, tuple(int(r) for r in roi)
        self.precision = self.runs_as = "fp32"

    def run_one(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        if tuple(window.shape[2:]) != self.roi:
            raise ValueError(f"the {self.name} export takes windows of {self.roi}, got {tuple(window.shape[2:])}")
        array = window.detach().to("cpu", torch.float32).numpy()
        out = [self.run_one(np.ascontiguousarray(array[i:i + 1])) for i in range(array.shape[0])]
        return torch.from_numpy(np.concatenate(out, axis=0).astype(np.float32, copy=False))


class OnnxRuntimeForward(ExportedForward):
    """ONNX Runtime's CPU provider, all graph optimisations, ``threads`` intra-op threads (fp32 only)."""

    name = "onnxruntime"

    def __init__(self, path: Path, roi: Sequence[int], threads: int) -> None:
        super().__init__(path, roi)
        ort = import_engine("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def run_one(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: array})[0]


class OpenVinoForward(ExportedForward):
    """OpenVINO's CPU plugin with an explicit inference precision (f32 or bf16), ``threads`` threads, latency mode.
    ``runs_as`` is the precision the plugin took (bf16 needs a CPU with bf16 support, else it runs f32)."""

    name = "openvino"

    def __init__(self, path: Path, roi: Sequence[int], threads: int, precision: str = "fp32") -> None:
        super().__init__(path, roi)
        openvino = import_engine("openvino")
        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        taken = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        self.runs_as = "bf16" if "bf16" in taken or "bfloat16" in taken else "fp32"

    def run_one(self, array: np.ndarray) -> np.ndarray:
        self.request.infer({0: array})
        return np.array(self.request.get_output_tensor(0).data, copy=True)


def window_forward(net: torch.nn.Module, engine: str, roi: Sequence[int], folder: Optional[Path] = None, *,
                   precision: str = "fp32", threads: Optional[int] = None, in_channels: int = 1) -> WindowForward:
    """``net`` as a window callable ``(B, C, *roi) -> (B, classes, *roi)`` float32 on the CPU, run by ``engine``.

    The exported engines take (or first write) their file in ``folder``; ``threads`` defaults to torch's count.
    Raises ``ImportError`` when the engine's package is missing, ``ValueError`` for an unknown engine/precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if engine == "torch":
        return TorchForward(net, precision)
    if engine not in PACKAGES:
        raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if folder is None:
        raise ValueError(f"the {engine} engine needs a folder for its export")
    import_engine(engine)  # a missing package fails before any export work
    threads = int(threads or torch.get_num_threads())
    path = exported(net.to("cpu").eval(), engine, roi, Path(folder), in_channels)
    if engine == "onnxruntime":
        return OnnxRuntimeForward(path, roi, threads)
    return OpenVinoForward(path, roi, threads, precision)


def for_card(card: Any, net: torch.nn.Module, requested: str, device: torch.device, *, precision: str = "fp32",
             threads: Optional[int] = None, notify: Optional[Notify] = None,
             root: Optional[Path] = None) -> Tuple[str, Optional[WindowForward]]:
    """``(engine that runs, its window callable)`` for a model card's network; ``("torch", None)`` means the
    usual torch path. A missing package or a failed export or load is one notice and torch."""
    engine = resolve_engine(requested, device, notify)
    if engine == "torch":
        return "torch", None
    if precision == "bf16" and engine == "onnxruntime":
        _tell(notify, "--engine onnxruntime has no bf16 mode on the CPU; running fp32")
        precision = "fp32"
    folder = cache_folder(card, root=root)
    try:
        forward = window_forward(net, engine, card.roi_size, folder, precision=precision, threads=threads,
                                 in_channels=int(card.architecture.get("in_channels", 1)))
    except Exception as error:  # noqa: BLE001 - an optional engine must never cost the segmentation
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        _tell(notify, f"--engine {engine} failed ({type(error).__name__}: {reason}; export folder {folder}); "
                      "running with torch")
        return "torch", None
    return engine, forward
