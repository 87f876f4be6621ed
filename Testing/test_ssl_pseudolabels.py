"""Multi-clusterer pseudo-labels: K within range, deterministic per seed, saved plain arrays reused/resumed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logonet.errors import UserError
from logonet.ssl import pseudolabels as pl
from logonet.ssl.pseudolabels import ClusterSettings, PseudoLabeler, fit_pseudolabels


def _volumes(count=6, size=32, seed=0):
    """Smooth random volumes in [0, 1] (a few bright blobs on a dark background), keyed by fake path."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    out = {}
    for i in range(count):
        vol = np.zeros((size,) * 3, np.float32)
        for _ in range(4):
            centre, radius = rng.uniform(4, size - 4, 3), rng.uniform(3, 9)
            vol += rng.uniform(0.3, 1.0) * (np.linalg.norm(grid - centre, axis=-1) < radius)
        out[f"vol{i}.nii.gz"] = np.clip(vol, 0, 1)
    return out


SETTINGS = dict(clusterers=3, k_min=4, k_max=8, fraction=0.5, roi=(32, 32, 32), passes=2, batch_size=64)


def _fit(folder, seed=0, volumes=None, **overrides):
    volumes = volumes or _volumes()
    calls = []

    def load(path):
        calls.append(path)
        return volumes[path]

    labeler = fit_pseudolabels(sorted(volumes), folder, ClusterSettings(seed=seed, **{**SETTINGS, **overrides}), load)
    return labeler, calls


def test_ks_within_range_and_seeded():
    ks = pl.draw_ks(200, 80, 500, seed=3)
    assert min(ks) >= 80 and max(ks) <= 500 and len(set(ks)) > 50
    assert ks == pl.draw_ks(200, 80, 500, seed=3) and ks != pl.draw_ks(200, 80, 500, seed=4)


def test_fit_is_deterministic_and_saved_as_plain_arrays(tmp_path):
    a, calls = _fit(tmp_path / "a")
    b, _ = _fit(tmp_path / "b")
    assert a.num_clusterers == 3 and all(4 <= k <= 8 for k in a.ks)
    # ~fraction of the volumes are read (whole volumes, one 32^3 tile each = 32 slices; 2*k_max = 16 rows suffice).
    assert len(calls) == 3
    crops = torch.from_numpy(np.stack(list(_volumes().values()))[:, None])
    ids_a, ids_b = a.assign(crops), b.assign(crops)
    assert ids_a.shape == (6, 32, 3) and ids_a.dtype == torch.int64
    assert torch.equal(ids_a, ids_b)
    for n, k in enumerate(a.ks):
        assert int(ids_a[..., n].max()) < k
        # Several clusters are really used (the slices differ), not one constant label.
        assert len(torch.unique(ids_a[..., n])) >= 2
        with np.load(tmp_path / "a" / f"centroids_{n:03d}.npz", allow_pickle=False) as data:
            assert data["centroids"].shape == (k, 32 * 32) and data["centroids"].dtype == np.float32
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["ks"] == a.ks
    other, _ = _fit(tmp_path / "c", seed=1)
    assert other.ks != a.ks or not torch.equal(other.assign(crops), ids_a)


def test_assignment_is_the_nearest_centroid():
    rng = np.random.default_rng(0)
    centroids = [rng.random((5, 16)).astype(np.float32), rng.random((3, 16)).astype(np.float32)]
    labeler = PseudoLabeler(centroids, slice_axis=0)
    crop = torch.rand(2, 1, 7, 4, 4)
    ids = labeler.assign(crop)
    feats = crop[:, 0].reshape(2, 7, 16)
    for n, c in enumerate(centroids):
        expected = torch.cdist(feats, torch.from_numpy(c)[None].expand(2, -1, -1)).argmin(-1)
        assert torch.equal(ids[..., n], expected)


def test_second_run_reuses_and_interrupted_run_resumes(tmp_path):
    first, _ = _fit(tmp_path / "p")
    reused, calls = _fit(tmp_path / "p")
    assert calls == []  # nothing read from disk again
    crops = torch.rand(2, 1, 32, 32, 32)
    assert torch.equal(first.assign(crops), reused.assign(crops))
    # Simulate a stop after clusterer 0: the features and clusterer 0 are kept, the rest is fitted.
    manifest_path = tmp_path / "p" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(done=[0], complete=False)
    manifest_path.write_text(json.dumps(manifest))
    before = (tmp_path / "p" / "centroids_000.npz").stat().st_mtime_ns
    resumed, calls = _fit(tmp_path / "p")
    assert calls == [] and (tmp_path / "p" / "centroids_000.npz").stat().st_mtime_ns == before
    assert torch.equal(resumed.assign(crops), first.assign(crops))


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    _fit(tmp_path / "p")
    with pytest.raises(UserError, match="other settings"):
        _fit(tmp_path / "p", clusterers=4)


def test_too_few_slices_is_a_clear_error_and_the_folder_stays_usable(tmp_path):
    small = _volumes(count=1, size=8)
    with pytest.raises(UserError, match="k-max"):
        _fit(tmp_path / "p", volumes=small, roi=(8, 8, 8), k_min=90, k_max=100)
    labeler, _ = _fit(tmp_path / "p", volumes=small, roi=(8, 8, 8), k_min=2, k_max=3)  # as the message advises
    assert all(2 <= k <= 3 for k in labeler.ks)


def test_unreadable_volume_is_skipped(tmp_path):
    volumes = _volumes()
    skipped = []

    def load(path):
        if path == "vol2.nii.gz":
            raise UserError("corrupt")
        return volumes[path]

    settings = ClusterSettings(**{**SETTINGS, "fraction": 1.0})
    labeler = fit_pseudolabels(sorted(volumes), tmp_path / "p", settings, load,
                               skip=lambda path, why: skipped.append(path))
    assert skipped == ["vol2.nii.gz"] and labeler.num_clusterers == 3
