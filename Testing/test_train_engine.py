"""The shared training engine: schedule, AMP choice, checkpoints + resume, signals, metrics files, --init."""
from __future__ import annotations

import csv
import math
import pickle
import signal

import pytest
import torch
from torch import nn

from logonet.errors import UserError
from logonet.events import ProgressReporter, parse_event_line
from logonet.train import engine as eng
from logonet.train import loader as loading
from logonet.train.checkpoints import load_checkpoint
from logonet.train.distributed import DistContext
from logonet.runtime import resolve_amp, select_device
from logonet.train.warmstart import load_matching


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.body(x))))


def _data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return torch.utils.data.TensorDataset(x, y)


def _step(model, batch, device):
    x, y = (t.to(device) for t in batch)
    return nn.functional.mse_loss(model(x), y)


def _engine(tmp_path, epochs, reporter=None, step=_step, saved=None, lr=0.05):
    torch.manual_seed(0)
    loader = loading.make_loader(_data(), batch_size=16, shuffle=True, seed=0)

    def validate(model, device):
        x, y = _data(32).tensors
        return {"dice": float(1.0 / (1.0 + nn.functional.mse_loss(model(x), y)))}

    def save(kind, model, epoch, metrics):
        if saved is not None:
            saved.append((kind, epoch, metrics["dice"]))

    cfg = eng.TrainConfig(epochs=epochs, lr=lr, warmup_epochs=1, seed=3)
    return eng.Engine(Toy(), cfg, tmp_path, step_fn=step, train_loader=loader, validate_fn=validate,
                      save_fn=save, reporter=reporter, dist=DistContext(device=torch.device("cpu")))


def test_warmup_cosine_shape():
    f = eng.warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.0)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_amp_choice_and_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None  # CPU autocasts only when asked for bf16
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is None
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) is torch.float16
    assert resolve_amp("off", cuda) is None
    with pytest.raises(UserError, match="unknown AMP"):
        resolve_amp("fp8", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no CUDA GPU"):
        select_device("cuda")


def test_fit_learns_writes_metrics_and_checkpoint(tmp_path):
    lines = []

    class Sink:
        def write(self, text):
            lines.extend(t for t in text.splitlines() if t)

        def flush(self):
            pass

    saved = []
    engine = _engine(tmp_path, epochs=6, reporter=ProgressReporter("jsonl", stream=Sink()), saved=saved)
    result = engine.fit()
    assert result.epochs_done == 6 and not result.interrupted
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 0.5
    assert result.best_value == max(row["dice"] for row in result.history)
    assert [k for k, *_ in saved].count("last") == 6 and "best" in [k for k, *_ in saved]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7)) and {"loss", "dice", "lr"} <= set(rows[0])
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [parse_event_line(line) for line in lines]
    assert all(e is not None for e in events)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["step"] for e in epochs] == list(range(1, 7)) and all(e["total"] == 6 for e in epochs)
    assert all({"loss", "dice", "best_dice", "lr"} <= set(e) for e in epochs)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 6 and len(state["history"]) == 6


def test_resume_continues_from_saved_epoch_and_matches_uninterrupted(tmp_path):
    full = _engine(tmp_path / "full", epochs=4).fit()
    first = _engine(tmp_path / "split", epochs=4)
    # Stop after epoch 2 exactly as a signal would: the flag is checked at the end of the epoch.
    calls = {"n": 0}

    def step(model, batch, device):
        calls["n"] += 1
        if calls["n"] == 2 * first.steps_per_epoch:
            first.request_stop(signal.SIGTERM)
        return _step(model, batch, device)

    first.step_fn = step
    partial = first.fit()
    assert partial.interrupted
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2
    second = _engine(tmp_path / "split", epochs=4)
    result = second.fit(resume=True)
    assert second.start_epoch == saved["epoch"]
    assert result.epochs_done == 4 and [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    # stopped on an epoch boundary: the resumed run is the same run (weights, optimizer, schedule, RNG)
    assert result.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-5)


def test_resume_redraws_the_same_monai_random_augmentations(tmp_path):
    """MONAI transforms keep their own RandomState, outside the checkpoint: the engine re-seeds them per epoch,
    so a run stopped after epoch 2 and resumed draws the same noise as an unstopped one."""
    from monai.transforms import Compose, RandGaussianNoise

    def run(folder, stop_after=None, resume=False):
        noise = Compose([RandGaussianNoise(prob=1.0, std=0.5)])
        engine = _engine(folder, epochs=4)
        engine.random_transforms = noise
        calls = {"n": 0}

        def step(model, batch, device):
            calls["n"] += 1
            if stop_after and calls["n"] == stop_after * engine.steps_per_epoch:
                engine.request_stop(signal.SIGTERM)
            x, y = batch
            return nn.functional.mse_loss(model(torch.as_tensor(noise(x.numpy()))), y)

        engine.step_fn = step
        return engine.fit(resume=resume)

    full = run(tmp_path / "full")
    assert run(tmp_path / "split", stop_after=2).interrupted
    resumed = run(tmp_path / "split", resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-5)


def test_sigterm_mid_epoch_saves_and_returns(tmp_path):
    engine = _engine(tmp_path, epochs=3)

    def step(model, batch, device):
        signal.raise_signal(signal.SIGTERM)  # handled by the engine: no exit, a flag
        return _step(model, batch, device)

    engine.step_fn = step
    result = engine.fit()
    assert result.interrupted and not result.requested and result.epochs_done == 0  # a signal
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0
    # the epoch is redone on resume, so the schedule is saved at its start, not one step into it
    assert state["scheduler"]["last_epoch"] == 0
    first_lr = engine.scheduler.base_lrs[0] * engine.scheduler.lr_lambdas[0](0)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(first_lr)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "logonet-checkpoint", "x": Evil()}, handle)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="no checkpoint to resume"):
        load_checkpoint(tmp_path / "none.pt")


def test_nan_loss_step_is_skipped(tmp_path):
    engine = _engine(tmp_path, epochs=1)
    calls = {"n": 0}

    def step(model, batch, device):
        calls["n"] += 1
        return _step(model, batch, device) * (float("nan") if calls["n"] == 1 else 1.0)

    engine.step_fn = step
    result = engine.fit()
    assert all(torch.isfinite(p).all() for p in engine.model.parameters()) and math.isfinite(result.best_value)


def test_non_finite_gradient_step_is_skipped_and_a_run_of_them_is_an_error(tmp_path):
    """A finite loss with an inf gradient (here sqrt at 0) must not reach AdamW, which would turn every weight
    into NaN; an epoch where no step could be taken stops with advice instead of running on silently."""
    engine = _engine(tmp_path, epochs=2, reporter=ProgressReporter("none"))
    calls = {"n": 0}

    def step(model, batch, device):
        calls["n"] += 1
        loss = _step(model, batch, device)
        weight = model.out.weight
        if calls["n"] == 2:  # one poisoned step in the first epoch: value unchanged, gradient inf
            return loss + torch.sqrt((weight - weight.detach()).abs()).sum()
        return loss

    engine.step_fn = step
    engine.fit()
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert engine.config.epochs == 2 and (tmp_path / eng.CHECKPOINT_NAME).exists()

    engine = _engine(tmp_path / "diverged", epochs=1)
    engine.step_fn = lambda model, batch, device: (_step(model, batch, device)
                                                   + torch.sqrt((model.out.weight - model.out.weight.detach()).abs()).sum())
    before = [p.detach().clone() for p in engine.model.parameters()]
    with pytest.raises(UserError, match="diverged.*--lr"):
        engine.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))


def test_gpu_out_of_memory_in_training_says_what_to_change(tmp_path):
    """Simulated on the CPU: the step raises CUDA's OutOfMemoryError; the user gets the knobs, not a traceback."""
    engine = _engine(tmp_path, epochs=1)

    def step(model, batch, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.step_fn = step
    with pytest.raises(UserError, match=r"ran out of memory at epoch 1/1: use a smaller --roi.*--resume"):
        engine.fit()


def test_load_matching_skips_head_and_mismatches():
    src = Toy()
    state = dict(src.state_dict())
    state["pretrain_head.weight"] = torch.zeros(3)
    state["out.weight"] = torch.zeros(2, 8)  # another number of classes
    dst = Toy()
    report = load_matching(dst, state, "src")
    assert report.skipped_head == 1 and report.mismatched == ["out.weight"]
    assert report.loaded == len(dst.state_dict()) - 1
    assert torch.equal(dst.body.weight, src.body.weight)
    assert not torch.equal(dst.out.weight, torch.zeros(1, 8))
    with pytest.raises(UserError, match="shares no tensor"):
        load_matching(nn.Conv3d(1, 1, 1), state, "src")
    assert math.isfinite(report.total)


def test_single_value_batch_norm_is_a_user_error(tmp_path):
    """One crop per step with a 1-voxel bottleneck: a message that says what to change, not a BN traceback."""
    loader = loading.make_loader(_data(1), batch_size=1, shuffle=False)
    engine = eng.Engine(Toy(), eng.TrainConfig(epochs=1), tmp_path, step_fn=_step, train_loader=loader,
                        reporter=ProgressReporter("none"), dist=DistContext(device=torch.device("cpu")))
    with pytest.raises(UserError, match="--samples 2"):
        engine.fit()


def test_loader_workers_draw_different_crops_and_ignore_ctrl_c():
    from monai.data import Dataset
    from monai.transforms import RandSpatialCropd

    volume = torch.arange(16 ** 3, dtype=torch.float32).reshape(1, 16, 16, 16)
    crop = RandSpatialCropd(keys="image", roi_size=(4, 4, 4), random_size=False)
    crop.set_random_state(seed=0)
    dataset = loading.RepeatDataset(Dataset([{"image": volume}], transform=crop), 4)
    loader = loading.make_loader(dataset, batch_size=1, shuffle=False, num_workers=2)
    corners = [float(batch["image"].flatten()[0]) for batch in loader]
    # item k goes to worker k % 2: with the same RNG state both workers would yield the same corner sequence
    assert corners[0::2] != corners[1::2]
    assert loader.worker_init_fn is loading._init_worker
