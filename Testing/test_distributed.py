"""Scale-out on CPU: batch segmentation under torchrun (``python -m torch.distributed.run``) shards the cases by rank.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a job
        env.pop(key, None)
    return env


def _torchrun(nproc: int, *args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc}", "-m", "logonet", *args]


def _metrics(folder: Path) -> list:
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _events(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    """A tiny LoGoNet-T card (random weights, 2 organs): segmentation's plumbing, not its accuracy."""
    from logonet import modelcard
    from logonet.data.labels import btcv_label_dicts

    torch.manual_seed(0)
    arch = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
    return modelcard.save(tmp_path_factory.mktemp("card") / "tiny", modelcard.build_network(arch).state_dict(),
                          name="tiny", architecture=arch, labels=btcv_label_dicts([1, 6]),
                          preprocessing={"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175.0, 250.0],
                                         "roi_size": [32, 32, 32]})


@pytest.mark.slow
def test_torchrun_batch_segmentation_shards_cases_by_rank(tiny_card, tmp_path):
    """5 cases on 2 ranks: rank 0 segments cases 0, 2, 4 and rank 1 cases 1, 3; every case is written once,
    and rank 0 alone writes the one --stats summary, equal to one process's."""
    import SimpleITK as sitk

    from logonet.data.phantom import make_phantom, phantom_image

    cases = tmp_path / "cases"
    cases.mkdir()
    names = [f"case{i}" for i in range(5)]
    for i, name in enumerate(names):
        sitk.WriteImage(phantom_image(make_phantom(size=32, seed=i)[0]), str(cases / f"{name}.nii.gz"))
    common = ["--model", str(tiny_card), "--device", "cpu", "--progress", "none"]
    ddp = subprocess.run(_torchrun(2, "segment", str(cases), str(tmp_path / "ddp"), "--stats",
                                   str(tmp_path / "ddp.csv"), *common),
                         capture_output=True, text=True, timeout=900, env=_env())
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "logonet", "segment", str(cases), str(tmp_path / "one"), "--stats",
                          str(tmp_path / "one.csv"), *common], capture_output=True, text=True, timeout=900, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]

    written = [line for line in ddp.stderr.splitlines() if " -> " in line and "[rank " in line]
    by_case = {name: [line for line in written if f"{name}.nii.gz ->" in line] for name in names}
    assert all(len(lines) == 1 for lines in by_case.values()), written  # each case once
    for i, name in enumerate(names):
        assert by_case[name][0].endswith(f"[rank {i % 2}]"), by_case[name]
    assert len([line for line in ddp.stderr.splitlines() if line.startswith("timings:")]) == 1  # one summary
    segmentations = sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.endswith(".nii.gz"))
    assert segmentations == sorted(p.name for p in (tmp_path / "one").iterdir() if p.name.endswith(".nii.gz")) \
        == [f"{name}.nii.gz" for name in names]
    with open(tmp_path / "ddp.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == [f"{name}.nii.gz" for name in names for _ in range(2)]  # case order
    assert (tmp_path / "ddp.csv").read_text() == (tmp_path / "one.csv").read_text()
