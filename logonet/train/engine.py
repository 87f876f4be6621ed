"""The training loop shared by fine-tuning and SSL pre-training.

One :class:`Engine` owns everything that does not depend on the task: AdamW with linear warmup + cosine decay,
checkpoints with exact resume (:mod:`.checkpoints`), SIGINT/SIGTERM or a ``STOP`` file -> checkpoint and clean
exit, the metrics CSV and plot (:mod:`.metrics`), progress events (:mod:`logonet.events`) and ``torchrun`` /
DistributedDataParallel (:mod:`.distributed`). The task plugs in a *step function* (batch -> scalar loss) and
optionally a *validation function* (model -> metrics) and a *save function* (writes model cards for the
best/last model). :mod:`.session` builds all of this for the ``finetune`` and ``pretrain`` commands.

Minimal use::

    dist = setup_distributed("auto")
    loader = make_loader(dataset, batch_size=2, shuffle=True, dist=dist, seed=0)
    engine = Engine(model, TrainConfig(epochs=10), out_dir, step_fn=lambda m, b, dev: loss_fn(m(b["image"].to(dev)), b["label"].to(dev)),
                    train_loader=loader, validate_fn=validate, save_fn=save, dist=dist)
    result = engine.fit(resume=True)
    cleanup_distributed(dist)
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import UserError
from ..events import ProgressReporter
from ..runtime import autocast, resolve_amp, seed_everything, select_device
from .checkpoints import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistContext, convert_cpu_sync_batchnorm
from .metrics import METRICS_CSV, write_metrics

#: step_fn(model, batch, device) -> scalar loss, or (loss, {metric: float}) for extra per-step metrics.
StepFn = Callable[[nn.Module, Any, torch.device], Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, float]]]]
#: validate_fn(model, device) -> {"dice": mean, "dice_<organ>": ..., "val_loss": ...}; the model is unwrapped, in eval mode.
ValidateFn = Callable[[nn.Module, torch.device], Dict[str, float]]
#: save_fn(kind, model, epoch, metrics) with kind "best" or "last"; called on rank 0 only, model unwrapped.
SaveFn = Callable[[str, nn.Module, int, Dict[str, float]], None]

#: A file of this name in the output folder asks a running fit to checkpoint and stop (Slicer's Stop writes it).
STOP_FILE = "STOP"
STOP_BY_FILE = -1  # the stop "signal" recorded when the request came from STOP_FILE
__all__ = ["CHECKPOINT_NAME", "METRICS_CSV", "STOP_FILE", "Engine", "FitResult", "TrainConfig", "warmup_cosine"]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor



@dataclass
class TrainConfig:
    """Task-independent settings; defaults are the paper's (AdamW lr 1e-4, wd 1e-5, warmup + cosine)."""

    epochs: int
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.0
    amp: str = "auto"              # auto | bf16 | fp16 | off (CPU: bf16 when asked, else off)
    grad_clip: Optional[float] = None
    seed: int = 0
    val_every: int = 1             # validate every N epochs and always on the last one
    monitor: str = "dice"          # metric that decides the "best" model
    monitor_mode: str = "max"      # "max" (Dice) or "min" (a loss)
    find_unused_parameters: bool = False


class _StopRequested(Exception):
    """Raised inside ``validate_fn``'s case loop to end a validation that a stop request interrupted."""


@dataclass
class FitResult:
    epochs_done: int
    best_value: Optional[float]
    best_epoch: Optional[int]
    history: List[Dict[str, Any]]
    interrupted: bool = False
    #: the stop was asked for with the STOP file (on this rank, or on another one: then this rank saw no signal)
    requested: bool = False


class Engine:
    """Run ``config.epochs`` epochs of ``step_fn`` over ``train_loader`` with validation, checkpoints and resume.

    ``model`` is moved to the device; under torchrun it is wrapped in DDP with BatchNorm over the global batch
    (SyncBatchNorm on CUDA, :class:`~.distributed.CpuSyncBatchNorm` on CPU/gloo), so W ranks with batch B train
    like one process with batch W*B.
    ``step_fn`` receives the wrapped model (so gradients synchronise); ``validate_fn`` and ``save_fn`` the
    unwrapped one, on rank 0 only. Output files in ``out_dir``: ``checkpoint.pt``, ``metrics.csv``,
    ``metrics.png`` (+ whatever ``save_fn`` writes). ``random_transforms`` (a MONAI ``Compose``) is re-seeded
    at every epoch from the seed, rank and epoch, so resuming repeats the crops an unstopped run would draw.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, out_dir: Union[str, Path], *, step_fn: StepFn,
                 train_loader: Any, validate_fn: Optional[ValidateFn] = None, save_fn: Optional[SaveFn] = None,
                 reporter: Optional[ProgressReporter] = None, dist: Optional[DistContext] = None,
                 params: Optional[List[nn.Parameter]] = None,
                 random_transforms: Optional[Any] = None) -> None:
        if config.epochs < 1:
            raise UserError(f"epochs must be at least 1, got {config.epochs}")
        self.config = config
        self.dist = dist or DistContext(device=select_device("auto"))
        self.device = self.dist.device
        self.out_dir = Path(out_dir)
        self.step_fn = step_fn
        self.validate_fn = validate_fn
        self.save_fn = save_fn
        self.train_loader = train_loader
        self.random_transforms = random_transforms
        quiet = ProgressReporter("none")
        self.reporter = (reporter or quiet) if self.dist.is_main else quiet
        self.amp_dtype = resolve_amp(config.amp, self.device)

        self.model = model.to(self.device)
        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:  # gloo: the same global-batch statistics (SyncBatchNorm itself refuses CPU tensors)
                self.model = convert_cpu_sync_batchnorm(self.model)
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters)
        trainable = params if params is not None else [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, len(train_loader))
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch,
                                          config.min_lr_ratio))
        # A GradScaler only for fp16: bf16 has fp32's range and needs no loss scaling.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.best_value: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        self._stop_signal: Optional[int] = None
        self.validation_stopped = False  # the last validate() was ended by a stop request

    # -- state -------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def state_dict(self, epochs_done: int) -> Dict[str, Any]:
        return {
            "format": "logonet-checkpoint",
            "epoch": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "rng": rng_state(),
            "config": {"epochs": self.config.epochs, "lr": self.config.lr, "seed": self.config.seed},
        }

    def save(self, epochs_done: int) -> Optional[Path]:
        """Rank 0 writes ``checkpoint.pt`` atomically; returns its path (None on other ranks)."""
        if not self.dist.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.checkpoint_path, self.state_dict(epochs_done))
        self.reporter.emit("checkpoint", step=epochs_done, total=self.config.epochs, path=str(self.checkpoint_path))
        return self.checkpoint_path

    def load(self, path: Optional[Union[str, Path]] = None) -> int:
        """Restore everything from a checkpoint; returns the number of epochs already done."""
        state = load_checkpoint(path or self.checkpoint_path)
        if state.get("format") != "logonet-checkpoint":
            raise UserError(f"{path or self.checkpoint_path} is not a logonet training checkpoint")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise UserError("the checkpoint does not fit this model (different architecture, preset or classes?): "
                            f"{str(error).splitlines()[0]}") from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_value = state.get("best_value")
        self.best_epoch = state.get("best_epoch")
        self.history = list(state.get("history") or [])
        set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        return self.start_epoch

    def _rewind_schedule(self, epochs_done: int) -> None:
        """Put the per-step LambdaLR schedule (and the optimizer's lr) back at the start of epoch ``epochs_done``."""
        step = epochs_done * self.steps_per_epoch
        self.scheduler.last_epoch = step
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # -- signals -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and returns."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = signum
            # A second Ctrl-C falls through to the default behaviour (immediate KeyboardInterrupt).
            signal.signal(signal.SIGINT, previous.get(signal.SIGINT, signal.default_int_handler))

        # SIGBREAK: what Windows delivers for Ctrl-Break / the Slicer module's Stop (CTRL_BREAK_EVENT).
        for sig in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to checkpoint and stop at the next step boundary (what a signal does)."""
        self._stop_signal = signum

    @property
    def stop_file(self) -> Path:
        """Creating this file asks the run to checkpoint and stop, like SIGINT, on every OS (a GUI cannot
        signal a windowless child on Windows); it is checked at every step and between validation cases."""
        return self.out_dir / STOP_FILE

    def _stop_requested(self) -> bool:
        if self._stop_signal is None and self.stop_file.exists():
            self._stop_signal = STOP_BY_FILE
        return self._stop_signal is not None

    @contextlib.contextmanager
    def _validation_stops(self) -> Iterator[None]:
        """While validating, the reporter's per-case loop (``reporter.iterate``) ends the validation with
        :class:`_StopRequested` once a stop is requested, instead of finishing every case first."""
        reporter, original = self.reporter, self.reporter.iterate

        def iterate(items: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            for item in original(items, *args, **kwargs):
                if self._stop_requested():
                    raise _StopRequested()
                yield item

        own = "iterate" in vars(reporter)
        reporter.iterate = iterate  # type: ignore[method-assign]
        try:
            yield
        finally:
            if own:
                reporter.iterate = original  # type: ignore[method-assign]
            else:
                del reporter.iterate  # back to the class's method

    def _should_stop(self) -> bool:
        return self._any_rank(self._stop_requested())

    def _any_rank(self, value: bool) -> bool:
        flag = 1.0 if value else 0.0
        if self.dist.distributed:
            import torch.distributed as tdist

            # Every rank must agree, or the ones that go on would hang in the next all-reduce.
            t = torch.tensor([flag], device=self.device)
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0

    def _stop_reason(self) -> str:
        return "on request (stop file)" if self._stop_signal == STOP_BY_FILE else f"by signal {self._stop_signal}"

    # -- loop --------------------------------------------------------------------------------------------
    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.config.monitor_mode == "max" else value < self.best_value

    def _barrier(self) -> None:
        if self.dist.distributed:
            import torch.distributed as tdist

            tdist.barrier()

    def _mean_over_ranks(self, value: float) -> float:
        if not self.dist.distributed:
            return value
        import torch.distributed as tdist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item()) / self.dist.world_size

    def train_epoch(self, epoch: int) -> Tuple[float, Dict[str, float], bool]:
        """One pass over the loader; returns (mean loss, mean extra metrics, stopped early by a signal)."""
        self.train_model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, count, skipped = 0.0, 0, 0
        extra_sums: Dict[str, float] = {}
        stopped = False
        desc = f"epoch {epoch + 1}/{self.config.epochs}"
        n_batches = len(self.train_loader)
        for index, batch in enumerate(self.reporter.iterate(self.train_loader, total=n_batches, desc=desc)):
            self.optimizer.zero_grad(set_to_none=True)
            try:
                taken = self._train_step(batch, desc)
            except torch.cuda.OutOfMemoryError as error:
                raise UserError(f"the GPU ran out of memory at {desc}: use a smaller --roi, fewer crops per step "
                                "(--samples, --batch) or mixed precision (--amp auto, the default on a GPU); "
                                "the checkpoint of the last finished epoch is kept, so --resume continues from it"
                                ) from error
            if taken is None:
                skipped += 1
            else:
                loss_value, extra = taken
                total += loss_value
                count += 1
                for key, value in extra.items():
                    extra_sums[key] = extra_sums.get(key, 0.0) + float(value)
            self.scheduler.step()
            # A stop on the last step is handled after the epoch is saved, so resume starts on a clean boundary.
            if index + 1 < n_batches and self._should_stop():
                stopped = True
                break
        if count == 0 and skipped > 0:
            # Weights are unchanged by skipped steps, so the last checkpoint is still good to resume from.
            raise UserError(f"every step of {desc} had a non-finite loss or gradient: the training diverged. "
                            "Resume with a lower learning rate (--lr) or without mixed precision (--amp off)")
        mean_loss = self._mean_over_ranks(total / max(1, count))
        extras = {k: self._mean_over_ranks(v / max(1, count)) for k, v in extra_sums.items()}
        return mean_loss, extras, stopped

    def _train_step(self, batch: Any, desc: str) -> Optional[Tuple[float, Dict[str, Any]]]:
        """Forward, backward and optimiser step on one batch: (loss, extra metrics), or None when skipped."""
        try:
            with autocast(self.device, self.amp_dtype):
                out = self.step_fn(self.train_model, batch, self.device)
        except ValueError as error:
            if "more than 1 value per channel" not in str(error):
                raise
            # BatchNorm saw one value per channel: one crop whose deepest feature map is 1 voxel.
            raise UserError("a training step holds one crop and the network's deepest feature map is a "
                            "single voxel, so batch normalisation cannot train; use more crops per step "
                            "(--samples 2 or --batch 2) or a larger --roi") from error
        loss, extra = out if isinstance(out, tuple) else (out, {})
        if not torch.isfinite(loss.detach()).all() and not self.scaler.is_enabled():
            # A NaN step would poison the weights; skip it and say so (fp16 lets the scaler deal with it).
            self.reporter.emit("warning", message=f"non-finite loss at {desc}, step skipped")
            return None
        if not self._backward_and_step(loss):
            self.reporter.emit("warning", message=f"non-finite gradient at {desc}, step skipped")
            return None
        return float(loss.detach()), extra

    def _backward_and_step(self, loss: torch.Tensor) -> bool:
        """Backward, optional norm clipping, optimiser step. False (and no step) when the gradient is not finite:
        one inf in a bf16 backward would otherwise turn every weight into NaN for the rest of the run."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # no-op without fp16 scaling
        max_norm = self.config.grad_clip if self.config.grad_clip else float("inf")
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            return False  # the next step starts with zero_grad
        self.scaler.step(self.optimizer)  # the fp16 scaler skips non-finite steps itself and lowers its scale
        self.scaler.update()
        return True

    def validate(self) -> Dict[str, float]:
        """Rank 0 runs ``validate_fn`` on the unwrapped model in eval mode; other ranks wait. A stop request
        (signal or stop file) ends it between cases: then :attr:`validation_stopped` is set and ``{}`` returned."""
        metrics: Dict[str, float] = {}
        self.validation_stopped = False
        if self.validate_fn is not None and self.dist.is_main:
            self.model.eval()
            try:
                with torch.no_grad(), self._validation_stops():
                    metrics = dict(self.validate_fn(self.model, self.device))
            except _StopRequested:
                self.validation_stopped, metrics = True, {}
            finally:
                self.model.train()
        self._barrier()
        return metrics

    def fit(self, resume: bool = False) -> FitResult:
        """Train (optionally resuming from ``out_dir/checkpoint.pt``); returns the history and best metric."""
        seed_everything(self.config.seed + self.dist.rank)
        if resume:
            done = self.load()
            self.reporter.emit("stage", stage="resume", epoch=done, path=str(self.checkpoint_path))
        self.reporter.emit("start", step=self.start_epoch, total=self.config.epochs, device=str(self.device),
                           world_size=self.dist.world_size,
                           amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off")
        interrupted = False
        epoch = self.start_epoch
        if self.dist.is_main:
            self.stop_file.unlink(missing_ok=True)  # a stale request from an earlier run must not stop this one
        self._barrier()
        with self._signals():
            while epoch < self.config.epochs:
                row = self._run_epoch(epoch)
                if row is None:  # stopped inside the epoch or its validation: redone on resume
                    interrupted = True
                    break
                epoch += 1
                self._finish_epoch(epoch, row)
                if self._should_stop():
                    interrupted = True
                    self.reporter.emit("warning", message=f"stopped {self._stop_reason()}; "
                                                          "resume with --resume")
                    break
        return FitResult(epochs_done=epoch, best_value=self.best_value, best_epoch=self.best_epoch,
                         history=self.history, interrupted=interrupted,
                         requested=interrupted and self._stop_signal in (None, STOP_BY_FILE))

    def _run_epoch(self, epoch: int) -> Optional[Dict[str, Any]]:
        """Train (and, when due, validate) epoch ``epoch``: its metrics row, or None when a stop request ended it
        (then the weights and a rewound schedule are checkpointed so the epoch is redone on resume)."""
        t0 = time.monotonic()
        if self.random_transforms is not None:
            # Seeded per epoch (MONAI keeps its own RandomState per transform, outside the checkpoint's
            # RNG states): a resumed run draws the same crops as one that was never stopped.
            self.random_transforms.set_random_state(seed=self.config.seed + self.dist.rank + 7919 * epoch)
        loss, extras, stopped = self.train_epoch(epoch)
        if stopped:
            # The weights keep what the epoch learnt so far; the schedule goes back to the epoch's start so a
            # stop does not shift the learning-rate curve.
            self._save_stopped(epoch, "")
            return None
        row: Dict[str, Any] = {"epoch": epoch + 1, "loss": loss, **extras,
                               "lr": self.optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % max(1, self.config.val_every) == 0 or epoch + 1 == self.config.epochs:
            row.update(self.validate())
            if self._any_rank(self.validation_stopped):
                self._save_stopped(epoch, " during validation")
                return None
        row["time_s"] = round(time.monotonic() - t0, 3)
        return row

    def _save_stopped(self, epoch: int, where: str) -> None:
        self._rewind_schedule(epoch)
        self.save(epoch)
        self.reporter.emit("warning", message=f"stopped {self._stop_reason()}{where}; resume with --resume")

    def _finish_epoch(self, epochs_done: int, row: Dict[str, Any]) -> None:
        """Record the epoch: best metric, history, model cards, checkpoint, metrics files, ``epoch`` event."""
        value = row.get(self.config.monitor)
        improved = isinstance(value, (int, float)) and math.isfinite(value) and self._better(float(value))
        if improved:
            self.best_value, self.best_epoch = float(value), epochs_done
        self.history.append(row)
        if self.dist.is_main:
            metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            if improved and self.save_fn is not None:
                self.save_fn("best", self.model, epochs_done, metrics)
            if self.save_fn is not None:
                self.save_fn("last", self.model, epochs_done, metrics)
            self.save(epochs_done)  # first: a failing metrics plot must not cost the checkpoint
            write_metrics(self.history, self.out_dir)
            best_key = "best_dice" if self.config.monitor == "dice" else f"best_{self.config.monitor}"
            self.reporter.emit("epoch", step=epochs_done, total=self.config.epochs, loss=row["loss"],
                               dice=row.get("dice"), lr=row["lr"], **{best_key: self.best_value},
                               **{k: v for k, v in row.items() if k not in ("epoch", "loss", "dice", "lr")})
        self._barrier()
