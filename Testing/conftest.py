"""Shared pytest fixtures: tiny phantom datasets and the sample CT.

- ``phantom_dataset``: session-scoped MSD folder with 4 labelled 48^3 phantoms (seed 0, 1.5x1.5x2 mm,
  all 13 BTCV organs in every case). Treat it as read-only; copy it if a test must modify it.
- ``phantom_unlabeled``: same layout, 4 unlabelled 48^3 phantoms (seed 1), ``training`` entries without labels.
- ``make_phantom_dataset(cases=2, size=32, seed=0, unlabeled=False)``: session-cached factory for other sizes.
- ``tiny_card``: session-scoped random-weight LoGoNet-T model card (2 organs, 32^3 windows); read-only.
- ``sample_ct``: ``logonet.data.sample.fetch_sample()`` paths (downloads once into the user cache, or
  ``$LOGONET_CACHE/sample``; later runs are instant). Keys: root, ct, ct_labels, ct_labels_totalseg, dicom,
  dicom_labels, dicom_labels_totalseg, ct_fine, mr, mr_labels_totalseg_mr.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest

_ENGINE_CACHE_MADE = []


def pytest_configure(config: pytest.Config) -> None:
    """Engine exports (made when the optional ``engines`` extra is installed, as on a developer's machine but not
    in CI) go to one scratch folder for the whole run, never into the user's real cache. xdist workers and the
    CLI subprocesses inherit it from the environment."""
    if not os.environ.get("LOGONET_ENGINE_CACHE"):
        folder = tempfile.mkdtemp(prefix="logonet-test-engines-")
        os.environ["LOGONET_ENGINE_CACHE"] = folder
        _ENGINE_CACHE_MADE.append(folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _ENGINE_CACHE_MADE:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("LOGONET_ENGINE_CACHE", None)


@pytest.fixture(scope="session")
def make_phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from logonet.data.phantom import write_phantom_dataset

    made: Dict[Tuple[int, int, int, bool], Path] = {}

    def make(cases: int = 2, size: int = 32, seed: int = 0, unlabeled: bool = False) -> Path:
        key = (cases, size, seed, unlabeled)
        if key not in made:
            out = tmp_path_factory.mktemp(f"phantom_{cases}x{size}_s{seed}{'_u' if unlabeled else ''}")
            made[key] = write_phantom_dataset(out, cases, size=size, seed=seed, unlabeled=unlabeled)
        return made[key]

    return make


@pytest.fixture(scope="session")
def phantom_dataset(make_phantom_dataset: Callable[..., Path]) -> Path:
    return make_phantom_dataset(cases=4, size=48, seed=0)


@pytest.fixture(scope="session")
def phantom_unlabeled(make_phantom_dataset: Callable[..., Path]) -> Path:
    return make_phantom_dataset(cases=4, size=48, seed=1, unlabeled=True)


@pytest.fixture(scope="session")
def sample_ct() -> Dict[str, str]:
    from logonet.data.sample import fetch_sample

    return fetch_sample()


@pytest.fixture(scope="session")
def tiny_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoGoNet-T card (random weights, seed 0; spleen and liver; 3 mm, 32^3 windows): segmentation's
    plumbing, not its accuracy. Read-only: copy it to change it."""
    import torch

    from logonet import modelcard
    from logonet.data.labels import btcv_label_dicts

    torch.manual_seed(0)
    arch = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
    return modelcard.save(tmp_path_factory.mktemp("card") / "tiny", modelcard.build_network(arch).state_dict(),
                          name="tiny", architecture=arch, labels=btcv_label_dicts([1, 6]),
                          preprocessing={"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175.0, 250.0],
                                         "roi_size": [32, 32, 32]})
