"""The cross-platform stop request (issue 12, defect 4): a ``STOP`` file in the output folder stops a fit at the
next step, and also *inside* validation, between cases; the checkpoint it leaves resumes the run."""
from __future__ import annotations

import torch
from torch import nn

from logonet.events import ProgressReporter
from logonet.train import engine as eng
from logonet.train import loader as loading
from logonet.train.distributed import DistContext


def _data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _engine(out, epochs, validate_fn, on_step=None):
    torch.manual_seed(0)
    loader = loading.make_loader(_data(), batch_size=16, shuffle=True, seed=0)

    def step(model, batch, device):
        if on_step is not None:
            on_step()
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    cfg = eng.TrainConfig(epochs=epochs, lr=0.01, warmup_epochs=1, seed=3)
    return eng.Engine(nn.Linear(4, 1), cfg, out, step_fn=step, train_loader=loader, validate_fn=validate_fn,
                      reporter=ProgressReporter("none"), dist=DistContext(device=torch.device("cpu")))


def test_stop_file_stops_during_training_and_resume_finishes(tmp_path):
    steps = []

    def on_step():
        steps.append(1)
        if len(steps) == 6:  # second step of epoch 2 (4 steps per epoch)
            (tmp_path / eng.STOP_FILE).touch()

    engine = _engine(tmp_path, 3, lambda model, device: {"dice": 0.5}, on_step)
    result = engine.fit()
    assert result.interrupted and result.requested and result.epochs_done == 1
    assert len(steps) == 6  # stopped at the step after the request, not at the end of the epoch
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    # the next run removes the stale request itself and finishes
    assert (tmp_path / eng.STOP_FILE).exists()
    resumed = _engine(tmp_path, 3, lambda model, device: {"dice": 0.5}).fit(resume=True)
    assert not resumed.interrupted and resumed.epochs_done == 3
    assert not (tmp_path / eng.STOP_FILE).exists()


def test_stop_file_ends_a_long_validation_between_cases(tmp_path):
    reporter = ProgressReporter("none")
    seen = []

    def validate(model, device):  # like finetune's validator: one case per reporter.iterate item
        for case in reporter.iterate(range(50), total=50, desc="validation"):
            seen.append(case)
            if case == 2:
                (tmp_path / eng.STOP_FILE).touch()
        return {"dice": 1.0}

    engine = _engine(tmp_path, 2, validate)
    engine.reporter = reporter
    result = engine.fit()
    assert seen == [0, 1, 2]  # the 47 remaining cases were not run
    assert result.interrupted and result.epochs_done == 0
    assert engine.validation_stopped
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0  # the epoch whose validation was cut is redone on resume
    assert "iterate" not in vars(reporter)  # the reporter is left as it was


def test_without_a_request_validation_runs_every_case(tmp_path):
    reporter = ProgressReporter("none")
    seen = []

    def validate(model, device):
        seen.extend(reporter.iterate(range(5), total=5, desc="validation"))
        return {"dice": 1.0}

    engine = _engine(tmp_path, 1, validate)
    engine.reporter = reporter
    result = engine.fit()
    assert seen == [0, 1, 2, 3, 4] and not result.interrupted and result.epochs_done == 1
