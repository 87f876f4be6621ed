"""Issue 12 defects 5, 6 and 8 on the logics (real MRML scene from slicer-core, the fake worker):

- 5: the CT copy in the temp folder is removed on module cleanup / application exit, and stale ``LoGoNet-<pid>-*``
  folders of dead processes are removed at start-up;
- 6: the log gets sentences (not JSON protocol lines), the status words a radiologist reads, at a few updates
  per second;
- 8: while the first-use install runs, a second Apply is refused.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from slicer_fixtures import FAKE_CLI, add_volume, mrml, write_fake_card  # noqa: F401

LABELS = [{"value": 6, "name": "liver", "color": [221, 130, 101]}]


@pytest.fixture
def env(tmp_path, mrml):  # noqa: F811
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetSegmentLib.logic import SegmentLogic

    card = write_fake_card(tmp_path / "models" / "organs", LABELS)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    logic = SegmentLogic(catalog=ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json"),
                         command_prefix=[sys.executable, str(FAKE_CLI)], temp_root=str(temp_root))
    volume = add_volume(mrml.slicer, np.zeros((10, 12, 14), dtype=np.int16))
    return mrml, logic, card, volume, temp_root


# --------------------------------------------------------------------------------------------- defect 6
def test_events_become_sentences_and_progress_lines_stay_out_of_the_log():
    from LoGoNetLib.messages import describe_event, stage_words

    assert describe_event({"event": "progress", "step": 3, "total": 40, "stage": "inference"}) is None
    assert describe_event({"event": "stage", "stage": "load_model"}) == "Loading the model..."
    assert describe_event({"event": "start", "device": "cuda"}) == "Worker started on cuda."
    assert describe_event({"event": "epoch", "step": 2, "total": 9, "loss": 0.5, "dice": 0.25,
                           "best_dice": 0.3}) == "Epoch 2/9, loss 0.5000, validation Dice 0.250, best 0.300."
    assert describe_event({"event": "warning", "message": "CUDA out of memory"}) == "Warning: CUDA out of memory"
    assert stage_words("inference") == "Segmenting" and stage_words("importing").startswith("Adding")
    assert stage_words("some_new_stage") == "Some new stage"


def test_throttle_allows_a_few_updates_per_second():
    from LoGoNetLib.messages import Throttle

    now = [0.0]
    throttle = Throttle(0.25, clock=lambda: now[0])
    ready = []
    for _ in range(100):  # 100 events in one second
        ready.append(throttle.ready())
        now[0] += 0.01
    assert sum(ready) == 4
    assert throttle.ready(force=True)


WORKER = r"""
import json, sys
print(json.dumps({"event": "start", "device": "cpu"}), flush=True)
print("a plain warning line from the worker", flush=True)
for i in range(1, 2001):
    print(json.dumps({"event": "progress", "step": i, "total": 2000, "stage": "inference"}), flush=True)
print(json.dumps({"event": "done", "outputs": []}), flush=True)
"""


def test_background_process_logs_sentences_only():
    from LoGoNetLib.process import BackgroundProcess

    logs, events = [], []
    process = BackgroundProcess([sys.executable, "-c", WORKER], on_log=logs.append, on_event=events.append).start()
    assert process.wait(timeout=60) == "succeeded"
    assert len(events) == 2002  # the bar still sees every event
    assert logs == ["Worker started on cpu.", "a plain warning line from the worker", "The worker finished."]


def test_segment_status_is_in_words_and_throttled(env, monkeypatch):
    mrml, logic, card, volume, temp_root = env
    updates, logs = [], []
    # 400 sliding windows in well under a second: the GUI must not get 400 updates
    many = temp_root.parent / "many_windows.py"
    many.write_text(FAKE_CLI.read_text().replace("steps = 4", "steps = 400"))
    logic.command_prefix = [sys.executable, str(many)]
    started = time.monotonic()
    task = logic.process(volume, model=str(card), waitForCompletion=True,
                         progressCallback=lambda f, text: updates.append((f, text)), logCallback=logs.append)
    elapsed = time.monotonic() - started
    assert task.state == "succeeded"
    assert len(updates) <= 6 + 4 * elapsed, updates
    texts = [text for _f, text in updates]
    assert texts[-1] == "Adding the segmentation to the scene" and updates[-1][0] == 1.0
    assert any(text.startswith("Segmenting: ") and " of 400" in text for text in texts)
    raw_keys = {"inference", "importing", "progress", "stage", "done", "start"}
    assert not raw_keys & set(texts)
    assert not any(line.lstrip().startswith("{") for line in logs), logs


# --------------------------------------------------------------------------------------------- defect 5
def test_module_cleanup_removes_the_ct_copy_of_a_running_segmentation(env, monkeypatch):
    mrml, logic, card, volume, temp_root = env
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "20")
    task = logic.process(volume, model=str(card), waitForCompletion=False)
    copies = list(temp_root.glob("LoGoNet-*/input.nrrd"))
    assert len(copies) == 1 and copies[0].parent.name.startswith(f"LoGoNet-{os.getpid()}-")
    logic.cleanup()  # what the widget's cleanup() and Slicer's exit call
    assert list(temp_root.iterdir()) == []
    assert task.process._process.poll() is not None  # the worker is gone too


def test_stale_temp_folders_of_dead_processes_are_removed_at_start(env, tmp_path):
    from LoGoNetLib.catalog import ModelCatalog
    from LoGoNetSegmentLib.logic import SegmentLogic

    mrml, logic, card, volume, temp_root = env
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp_root / f"LoGoNet-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "input.nrrd").write_bytes(b"patient data")
    alive = temp_root / f"LoGoNet-{os.getpid()}-def456"  # this process: a run in progress
    alive.mkdir()
    other = temp_root / "LoGoNet-notapid"  # not ours to judge
    other.mkdir()
    SegmentLogic(catalog=ModelCatalog(home=tmp_path / "h2", catalog_file=tmp_path / "none.json"),
                 temp_root=str(temp_root))
    assert not stale.exists() and alive.is_dir() and other.is_dir()


def test_exit_hook_cleans_every_live_logic(env, monkeypatch):
    from LoGoNetSegmentLib import logic as segmentlogic

    mrml, logic, card, volume, temp_root = env
    monkeypatch.setenv("FAKE_LOGONET_DELAY", "20")
    logic.process(volume, model=str(card), waitForCompletion=False)
    assert list(temp_root.iterdir())
    segmentlogic._cleanup_at_exit()  # registered with atexit
    assert list(temp_root.iterdir()) == []


# --------------------------------------------------------------------------------------------- defect 8
def test_apply_during_the_dependency_install_is_refused(env):
    from LoGoNetLib.install import InstallResult
    from LoGoNetLib.errors import LoGoNetError

    mrml, logic, card, volume, _ = env
    seen = {}

    class SlowInstaller:
        def ensure(self, ask, log, optional="no"):
            seen["installing"] = logic.installing
            with pytest.raises(LoGoNetError, match="being installed"):  # a second click during pip
                logic.process(volume, model=str(card))
            seen["refused"] = True
            return InstallResult(installed=["monai>=1.4"])

    logic.installer = SlowInstaller()
    task = logic.process(volume, model=str(card), waitForCompletion=True)
    assert seen == {"installing": True, "refused": True}
    assert task.state == "succeeded" and logic.installing is False
