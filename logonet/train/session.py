"""One training run, whatever the task: what ``finetune`` and ``pretrain`` share.

:class:`TrainingConfig` holds the options every training command takes (``add_training_arguments`` declares
them once for the command line); :class:`TrainingSession` owns the output folder checks, the architecture,
distributed setup and seeding, the cached dataset and its loader, the :class:`~logonet.train.engine.Engine`,
model-card writing and the final ``done`` event. A task (:mod:`logonet.train.finetune`,
:mod:`logonet.ssl.pretrain`) brings only its data, its step, its validator and its card metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Type, TypeVar

import torch
from torch import nn

from .. import modelcard
from ..errors import UserError
from ..events import ProgressReporter, reporter_for
from ..runtime import resolve_amp, seed_everything
from . import checkpoints, distributed, options
from . import loader as loading
from .engine import METRICS_CSV, Engine, FitResult, SaveFn, StepFn, TrainConfig, ValidateFn

DEFAULT_ROI = 96
C = TypeVar("C", bound="TrainingConfig")


@dataclasses.dataclass
class TrainingConfig:
    """Options shared by every training command; see :func:`add_training_arguments` for their meaning.

    ``command`` is the command line recorded in the model cards; left empty, the call itself is recorded
    (``finetune(FinetuneConfig(...))`` with every non-default field).
    """

    data: Any = None
    out: str = ""
    model: str = "logonet"
    preset: str = "S"
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 100
    roi: Sequence[int] = (DEFAULT_ROI,)
    spacing: Optional[Sequence[float]] = None
    window: Optional[Sequence[float]] = None
    samples: int = 4
    batch: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup: Optional[int] = None
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    cache: str = "memory"
    seed: int = 0
    name: Optional[str] = None
    resume: bool = False
    progress: Optional[str] = None
    command: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def add_training_arguments(parser: Any, *, samples: int, cache: str, window: str) -> None:
    """Declare the options of :class:`TrainingConfig` on ``parser`` (a parser or an argument group), not DATA,
    whose shape is the task's.

    ``samples`` and ``cache`` are the command's defaults (fine-tuning caches its few labelled cases in memory;
    pre-training reads many volumes and caches none by default); ``window`` names the default HU window.
    """
    parser.add_argument("--out", required=True, help="output folder: best/ and last/ model cards, checkpoint, metrics")
    parser.add_argument("--model", default="logonet",
                        help="network: logonet, ulkanet or a MONAI baseline (swinunetr, unetr, segresnetvae, dynunet, "
                             "unetplusplus, attentionunet)")
    parser.add_argument("--preset", default="S", help="size preset for logonet/ulkanet: T (tiny), S (paper), L")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='extra constructor arguments as JSON, e.g. \'{"channels": [16, 32, 64, 128]}\'')
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--roi", type=int, nargs="+", default=[DEFAULT_ROI],
                        help="training crop size, also validation's sliding window (1 or 3 numbers, multiples of 32)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="target spacing in mm (1 or 3 numbers; default 1.5 1.5 2.0)")
    parser.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help=f"HU window mapped to [0, 1] (default {window})")
    parser.add_argument("--samples", type=int, default=samples, help="random crops per volume per step")
    parser.add_argument("--batch", type=int, default=1, help="volumes per step (each gives --samples crops)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=None, help="warmup epochs (default: 10%% of --epochs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--cache", default=cache, choices=["memory", "disk", "none"],
                        help=f"cache the deterministic preprocessing (disk: OUT/cache; default {cache})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="model name written into model.json")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


def config_from_args(cls: Type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """A config of type ``cls`` from parsed arguments: every field whose name is an argument's ``dest``,
    ``--model-kwargs`` parsed as JSON, the typed command line as ``command``; ``overrides`` win."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values["model_kwargs"] = parse_model_kwargs(getattr(args, "model_kwargs", None))
    values["command"] = getattr(args, "command_line", None)
    values.update(overrides)
    return cls(**values)


def parse_model_kwargs(text: Optional[str]) -> Dict[str, Any]:
    """``--model-kwargs`` JSON -> dict (UserError when it is not a JSON object)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except ValueError as error:
        raise UserError(f"--model-kwargs is not valid JSON ({error}); e.g. '{{\"channels\": [16, 32]}}'") from error
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object such as '{\"channels\": [16, 32]}'")
    return kwargs


def _as_list(value: Any) -> Any:
    """A number as a one-item list (the API accepts ``roi=64`` as well as ``roi=[64]``); None and sequences as given."""
    return [value] if isinstance(value, (int, float)) else (None if value is None else list(value))


def describe_call(function: str, config: TrainingConfig) -> str:
    """``logonet.train.finetune.finetune(FinetuneConfig(data=[...], out='...'))``: the API call, every field
    that differs from its default spelled out, for the card when no command line was given."""
    defaults = type(config)()
    fields = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
              if f.name != "command" and getattr(config, f.name) != getattr(defaults, f.name)]
    return f"{function}({type(config).__name__}({', '.join(fields)}))"


# ----------------------------------------------------------------------------------------------------------
# the session
# ----------------------------------------------------------------------------------------------------------
class TrainingSession:
    """One run of a training task into ``config.out``; checks the shared options and prepares the folder."""

    def __init__(self, config: TrainingConfig, *, what: str, function: str) -> None:
        if not config.out:
            raise UserError("an output folder (--out) is required")
        if config.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {config.epochs}")
        self.config = config
        self.roi = options.roi_argument(_as_list(config.roi), DEFAULT_ROI)
        self.model_info()  # an unknown network is refused before any data is read
        self.out = Path(config.out)
        self.reporter: ProgressReporter = reporter_for(config.progress)
        self.command = config.command or describe_call(function, config)
        self.dist: Optional[distributed.DistContext] = None
        self.started = time.time()
        from ..atomic import prepare_run_folder  # --out usable, stale temps of a killed run gone

        prepare_run_folder(self.out, "--out")
        checkpoints.check_output_folder(self.out, config.resume, what)

    # -- model ---------------------------------------------------------------------------------------------
    def model_info(self) -> Any:
        """The registry's :class:`~logonet.nets.registry.ModelInfo` of ``--model`` (UserError when unknown)."""
        from ..nets import model_info

        try:
            return model_info(self.config.model)
        except ValueError as error:
            raise UserError(str(error)) from error

    def architecture(self, out_channels: int, **extra_kwargs: Any) -> Dict[str, Any]:
        """The card's ``architecture`` block: the preset only where the network takes one, and the crop size as
        ``img_size`` for networks built for one input size."""
        info = self.model_info()
        kwargs = {**self.config.model_kwargs, **extra_kwargs}
        for key, value in info.size_kwargs(self.roi).items():
            kwargs.setdefault(key, value)
        return {"name": info.name, "preset": info.preset_for(self.config.preset), "in_channels": 1,
                "out_channels": int(out_channels), "kwargs": kwargs}

    @staticmethod
    def build(architecture: Mapping[str, Any]) -> nn.Module:
        from ..nets import build_model

        try:
            return build_model(architecture["name"], in_channels=1, out_channels=architecture["out_channels"],
                               preset=architecture["preset"], **architecture["kwargs"])
        except (TypeError, ValueError) as error:
            raise UserError(f"cannot build {architecture['name']}: {error}") from error

    def preprocessing(self, preset: str, **overrides: Any) -> Any:
        """The task's :class:`~logonet.data.transforms.PreprocessConfig`: the preset's spacing and window unless
        ``--spacing``/``--window`` were given, the crop size and crops per volume."""
        from ..data.transforms import PreprocessConfig

        defaults = PreprocessConfig.preset(preset)
        window = tuple(self.config.window) if self.config.window else defaults.intensity_window
        return PreprocessConfig.preset(
            preset, spacing=options.triple_argument(_as_list(self.config.spacing), "spacing", defaults.spacing),
            intensity_window=window, roi_size=self.roi, num_samples=self.config.samples, **overrides)

    # -- the distributed part ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator["TrainingSession"]:
        """Join the process group (or run alone), quiet the reporter off rank 0, seed; leave the group after."""
        self.dist = distributed.setup_distributed(self.config.device)
        try:
            if not self.dist.is_main:
                self.reporter = ProgressReporter("none")
            self.seed()
            yield self
        finally:
            distributed.cleanup_distributed(self.dist)

    def seed(self) -> None:
        """Seed Python, NumPy and torch from ``--seed`` and the rank."""
        seed_everything(self.config.seed + self.context.rank)

    @property
    def context(self) -> distributed.DistContext:
        if self.dist is None:
            raise RuntimeError("TrainingSession.running() has not been entered")
        return self.dist

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return resolve_amp(self.config.amp, self.context.device)

    def loader(self, items: List[Dict[str, Any]], transform: Any, repeats: Any) -> Any:
        """The cached dataset (``--cache``), ``repeats`` passes per epoch, a shuffling (sharded) loader."""
        from monai.data import list_data_collate

        cached = loading.training_dataset(items, transform, self.config.cache, self.out / "cache",
                                          self.config.workers)
        return loading.make_loader(loading.RepeatDataset(cached, repeats), batch_size=self.config.batch,
                                   shuffle=True, dist=self.context, seed=self.config.seed,
                                   num_workers=self.config.workers, collate_fn=list_data_collate)

    def card_saver(self, card: Callable[[str, nn.Module, int, Mapping[str, float]], Dict[str, Any]],
                   training: Mapping[str, Any]) -> SaveFn:
        """The engine's ``save_fn``: ``card(kind, net, epochs, metrics)`` gives the task's arguments of
        :func:`logonet.modelcard.save`; the session adds the command, the epochs, the world size and the time."""

        def save(kind: str, net: nn.Module, epochs_done: int, metrics: Mapping[str, float]) -> None:
            task = card(kind, net, epochs_done, metrics)
            summary = {"command": self.command, **training, **task.pop("training", {}), "epochs": epochs_done,
                       "world_size": self.context.world_size, "wall_time_s": round(time.time() - self.started, 1)}
            modelcard.save(self.out / kind, training=summary, **task)

        return save

    def fit(self, model: nn.Module, loader: Any, *, step: StepFn, save: SaveFn, validate: Optional[ValidateFn] = None,
            random_transforms: Any = None, **train_config: Any) -> FitResult:
        """Train with the shared schedule (warmup default 10% of the epochs) and the task's step, validator and
        card writer; resumes from ``OUT/checkpoint.pt`` when ``--resume`` was given."""
        c = self.config
        warmup = c.warmup if c.warmup is not None else max(0, int(round(0.1 * c.epochs)))
        config = TrainConfig(epochs=c.epochs, lr=c.lr, weight_decay=c.weight_decay, warmup_epochs=warmup,
                             amp=c.amp, seed=c.seed, **train_config)
        engine = Engine(model, config, self.out, step_fn=step, train_loader=loader, validate_fn=validate,
                        save_fn=save, reporter=self.reporter, dist=self.context, random_transforms=random_transforms)
        return engine.fit(resume=c.resume)

    def finish(self, result: FitResult, best_key: str, outputs: Optional[Mapping[str, str]] = None) -> int:
        """The ``done`` event (paths of the cards, metrics and ``outputs``): exit code 0, or 130 when stopped.

        Under torchrun a stop asked for with the STOP file exits 0: torchrun reports any other code as a failed
        job, though the checkpoint and cards are written and ``--resume`` continues. A signal still gives 130."""
        if result.interrupted:
            if result.requested and self.context.world_size > 1:
                self.tell(f"stopped on request after epoch {result.epochs_done}; resume with --resume")
                return 0
            return 130
        paths = {"best": str(self.out / "best"), "last": str(self.out / "last"), **(outputs or {}),
                 "metrics": str(self.out / METRICS_CSV)}
        self.reporter.emit("done", outputs=paths, **{best_key: result.best_value}, best_epoch=result.best_epoch,
                           time_s=round(time.time() - self.started, 1))
        return 0

    def tell(self, message: str) -> None:
        """A closing sentence for a person at a terminal (rank 0, not under ``--progress jsonl``)."""
        if self.reporter.mode != "jsonl" and self.context.is_main:
            print(message)
