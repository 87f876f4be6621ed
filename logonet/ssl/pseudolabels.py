"""Multi-clusterer pseudo-labels (paper section 2): N MiniBatchKMeans clusterers on slice intensities.

Fitting streams a random ~10% of the unlabeled crops from disk, one volume at a time, into a float16 feature
file (one row per slice: the flattened in-plane intensities of the *unmasked* crop, HU window already mapped to
[0, 1]). Each clusterer ``n`` (own ``K_n`` drawn uniformly from ``[k_min, k_max]``) is then fitted with
``partial_fit`` over chunks of that file, so memory is bounded by the chunk size whatever the folder holds.

On disk (``folder``): ``manifest.json`` (settings, ``ks``, progress), ``features.f16`` (the feature rows) and
``centroids_NNN.npz`` (one ``(K_n, F)`` float32 array per clusterer, ``allow_pickle=False``). A run that stops
resumes where it was (the feature file and every finished clusterer are kept); a second run with the same
settings reuses everything. Training assigns cluster ids with :meth:`PseudoLabeler.assign` on the device.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..atomic import atomic_write, write_json_atomic

MANIFEST = "manifest.json"
FEATURES = "features.f16"
FORMAT = "logonet-pseudolabels"
#: Samples per clusterer step is at least this many times K (sklearn needs >= K rows for the first step).
_MIN_ROWS_PER_K = 2


@dataclass
class ClusterSettings:
    """What the pseudo-labels depend on; a saved folder is reused only when these match exactly.

    ``roi`` is the crop size (X, Y, Z) and ``slice_axis`` the spatial axis whose slices are clustered, so the
    feature length is the product of the other two sides.
    """

    clusterers: int = 80
    k_min: int = 80
    k_max: int = 500
    fraction: float = 0.1
    seed: int = 0
    roi: Tuple[int, int, int] = (96, 96, 96)
    slice_axis: int = 2
    passes: int = 3
    batch_size: int = 1024
    preprocessing: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roi = tuple(int(r) for r in self.roi)  # type: ignore[assignment]
        if self.clusterers < 1:
            raise UserError(f"the number of clusterers must be at least 1, got {self.clusterers}")
        if not 2 <= self.k_min <= self.k_max:
            raise UserError(f"cluster counts need 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"the share of crops used for clustering must lie in (0, 1], got {self.fraction}")
        if self.slice_axis not in (0, 1, 2) or len(self.roi) != 3:
            raise UserError(f"need a 3-D roi and a slice axis 0-2, got roi={self.roi}, axis={self.slice_axis}")
        if self.passes < 1 or self.batch_size < 1:
            raise UserError(f"passes and batch size must be positive, got {self.passes}, {self.batch_size}")

    @property
    def feature_dim(self) -> int:
        sides = [s for axis, s in enumerate(self.roi) if axis != self.slice_axis]
        return int(sides[0] * sides[1])

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["roi"] = list(self.roi)
        return json.loads(json.dumps(data))  # plain JSON types, comparable with a reloaded manifest


def draw_ks(clusterers: int, k_min: int, k_max: int, seed: int) -> List[int]:
    """K of every clusterer, uniform in ``[k_min, k_max]``, reproducible from ``seed``."""
    rng = np.random.default_rng([seed, 0x6B])
    return [int(k) for k in rng.integers(k_min, k_max + 1, size=clusterers)]


def slice_features(crop: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """``(B, 1, X, Y, Z)`` crop in [0, 1] -> ``(B, S, F)`` flattened slices along ``slice_axis``."""
    if crop.dim() != 5 or crop.shape[1] != 1:
        raise UserError(f"pseudo-labels need single-channel (B, 1, X, Y, Z) crops, got {tuple(crop.shape)}")
    seq = crop[:, 0].movedim(1 + slice_axis, 1)
    return seq.reshape(seq.shape[0], seq.shape[1], -1)


def tile_starts(size: int, roi: int) -> List[int]:
    """Start indices of crops that cover ``size`` voxels with windows of ``roi`` (last one flush with the end)."""
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi + 1, roi))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def volume_crops(volume: np.ndarray, roi: Sequence[int]) -> Iterator[np.ndarray]:
    """All tiles of ``roi`` size covering an ``(X, Y, Z)`` volume in [0, 1]; small volumes are padded with 0 (air)."""
    pad = [(0, max(0, r - s)) for s, r in zip(volume.shape, roi)]
    if any(p[1] for p in pad):
        volume = np.pad(volume, pad, mode="constant")
    for x in tile_starts(volume.shape[0], roi[0]):
        for y in tile_starts(volume.shape[1], roi[1]):
            for z in tile_starts(volume.shape[2], roi[2]):
                yield volume[x:x + roi[0], y:y + roi[1], z:z + roi[2]]


class PseudoLabeler:
    """Fitted clusterers: assign every slice of a crop one cluster id per clusterer.

    ``centroids[n]`` is a ``(K_n, F)`` float32 array. :meth:`assign` stacks them once into one matrix so a
    batch needs a single matrix product (nearest centroid = argmin of ``|c|^2 - 2 x.c``).
    """

    def __init__(self, centroids: Sequence[np.ndarray], slice_axis: int = 2) -> None:
        if not centroids:
            raise UserError("a pseudo-labeler needs at least one clusterer")
        dims = {c.shape[1] for c in centroids}
        if len(dims) != 1:
            raise UserError(f"clusterers disagree on the feature length: {sorted(dims)}")
        self.ks = [int(c.shape[0]) for c in centroids]
        self.feature_dim = dims.pop()
        self.slice_axis = slice_axis
        self._all = torch.from_numpy(np.concatenate([np.asarray(c, np.float32) for c in centroids]))
        self._norms = (self._all ** 2).sum(1)
        # Position of every centroid in the padded (N * K_max) layout; the gaps stay +inf so argmin never picks them.
        k_max = max(self.ks)
        self._slots = torch.cat([torch.arange(k) + n * k_max for n, k in enumerate(self.ks)])

    @property
    def num_clusterers(self) -> int:
        return len(self.ks)

    @property
    def k_max(self) -> int:
        return max(self.ks)

    def to(self, device: torch.device) -> "PseudoLabeler":
        self._all, self._norms, self._slots = (t.to(device) for t in (self._all, self._norms, self._slots))
        return self

    @torch.no_grad()
    def assign(self, crop: torch.Tensor) -> torch.Tensor:
        """``(B, 1, X, Y, Z)`` unmasked crop in [0, 1] -> cluster ids ``(B, S, N)`` (int64)."""
        feats = slice_features(crop, self.slice_axis).float()
        batch, slices, dim = feats.shape
        if dim != self.feature_dim:
            raise UserError(f"crop slices have {dim} voxels but the clusterers were fitted on {self.feature_dim}; "
                            "use the roi and slice axis the pseudo-labels were made with")
        flat = feats.reshape(-1, dim).to(self._all.device)
        with torch.autocast(device_type=flat.device.type, enabled=False):
            scores = self._norms[None] - 2.0 * flat @ self._all.T  # (B*S, sum K)
        padded = scores.new_full((scores.shape[0], self.num_clusterers * self.k_max), float("inf"))
        padded[:, self._slots] = scores
        ids = padded.view(-1, self.num_clusterers, self.k_max).argmin(-1)
        return ids.view(batch, slices, self.num_clusterers).to(crop.device)

    @classmethod
    def load(cls, folder: os.PathLike) -> "PseudoLabeler":
        """Load a finished pseudo-label folder (``manifest.json`` + ``centroids_NNN.npz``)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None or not manifest.get("complete"):
            raise UserError(f"{folder} holds no finished pseudo-labels; run `logonet pretrain` to fit them "
                            "(or --resume to finish an interrupted fit)")
        settings = manifest["settings"]
        centroids = [_read_centroids(folder, n) for n in range(settings["clusterers"])]
        return cls(centroids, slice_axis=int(settings["slice_axis"]))


# ------------------------------------------------------------------------------------------ files
def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); delete the folder to fit the pseudo-labels again") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a logonet pseudo-label manifest; point --pseudolabels elsewhere")
    return data


def _write_manifest(folder: Path, manifest: Dict[str, Any]) -> None:
    write_json_atomic(manifest, folder / MANIFEST)


def _centroid_path(folder: Path, index: int) -> Path:
    return folder / f"centroids_{index:03d}.npz"


def _write_centroids(folder: Path, index: int, centers: np.ndarray) -> None:
    with atomic_write(_centroid_path(folder, index)) as tmp:
        with open(tmp, "wb") as handle:  # a handle, so numpy does not append ".npz" to the temp name
            np.savez(handle, centroids=centers.astype(np.float32))


def _read_centroids(folder: Path, index: int) -> np.ndarray:
    path = _centroid_path(folder, index)
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["centroids"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"cannot read clusterer {index} from {path} ({error}); delete the pseudo-label folder "
                        "to fit again") from error


# ------------------------------------------------------------------------------------------ fitting
#: load(path) -> (X, Y, Z) float array in [0, 1] (preprocessed volume); raises UserError for bad files.
VolumeLoader = Callable[[str], np.ndarray]


def fit_pseudolabels(volumes: Sequence[str], folder: os.PathLike, settings: ClusterSettings, load: VolumeLoader,
                     reporter: Any = None, skip: Optional[Callable[[str, str], None]] = None) -> PseudoLabeler:
    """Fit (or resume, or reuse) the clusterers in ``folder`` and return the labeler.

    Args:
        volumes: paths of the unlabeled volumes (already validated as 3-D).
        folder: where manifest, features and centroids live.
        settings: see :class:`ClusterSettings`; a folder made with other settings is refused.
        load: preprocessing of one volume, see :data:`VolumeLoader`.
        reporter: a :class:`logonet.events.ProgressReporter` (stage/progress events).
        skip: called with ``(path, reason)`` for a volume that cannot be loaded; it is left out.
    """
    from ..events import ProgressReporter

    reporter = reporter or ProgressReporter("none")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = settings.to_dict()
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("settings") != wanted:
        changed = sorted(k for k in wanted if manifest.get("settings", {}).get(k) != wanted[k])
        raise UserError(f"{folder} holds pseudo-labels made with other settings ({', '.join(changed)}); "
                        "use a new output folder or the same settings")
    if manifest is None:
        manifest = {"format": FORMAT, "version": 1, "settings": wanted,
                    "ks": draw_ks(settings.clusterers, settings.k_min, settings.k_max, settings.seed),
                    "rows": None, "volumes_used": [], "done": [], "complete": False}
        _write_manifest(folder, manifest)
    if manifest.get("complete"):
        reporter.emit("stage", stage="pseudolabels", reused=str(folder))
        return PseudoLabeler.load(folder)

    if manifest.get("rows") is None or not (folder / FEATURES).is_file():
        reporter.emit("stage", stage="cluster_features")
        rows, used = _extract_features(volumes, folder / FEATURES, settings, load, reporter, skip)
        manifest.update(rows=rows, volumes_used=used)
        _write_manifest(folder, manifest)
    rows, dim = int(manifest["rows"]), settings.feature_dim
    need = max(manifest["ks"])
    if rows < need:
        # Nothing here is reusable with the settings the user will try next: clear it so the folder can be reused.
        for name in (FEATURES, MANIFEST):
            (folder / name).unlink(missing_ok=True)
        raise UserError(f"only {rows} slices were gathered for clustering but a clusterer has K={need}; "
                        "lower --k-max (and --k-min), raise --cluster-fraction or add volumes")
    features = np.memmap(folder / FEATURES, dtype=np.float16, mode="r", shape=(rows, dim))

    reporter.emit("stage", stage="clustering", clusterers=settings.clusterers, rows=rows)
    done = set(manifest["done"])
    todo = [n for n in range(settings.clusterers) if n not in done]
    for n in reporter.iterate(todo, total=len(todo), desc="clustering"):
        centers = _fit_one(features, manifest["ks"][n], settings, n)
        _write_centroids(folder, n, centers)
        manifest["done"] = sorted(set(manifest["done"]) | {n})
        _write_manifest(folder, manifest)
    del features
    manifest["complete"] = True
    _write_manifest(folder, manifest)
    return PseudoLabeler.load(folder)


def _choose_volumes(volumes: Sequence[str], settings: ClusterSettings) -> List[str]:
    """The volumes in a random order fixed by the seed (the caller reads them from the front)."""
    rng = np.random.default_rng([settings.seed, 0x5E])
    return [volumes[i] for i in rng.permutation(len(volumes))]


def _extract_features(volumes: Sequence[str], path: Path, settings: ClusterSettings, load: VolumeLoader,
                      reporter: Any, skip: Optional[Callable[[str, str], None]]) -> Tuple[int, List[str]]:
    """Stream crops of a random ~``fraction`` of the volumes into ``path``; returns (rows, volumes used).

    Whole volumes are drawn (each cut into roi tiles), so only about ``fraction`` of the folder is read. More
    volumes are added while fewer than ``2 * k_max`` slices have been gathered, so every clusterer has data.
    """
    order = _choose_volumes(volumes, settings)
    target = max(1, math.ceil(settings.fraction * len(order)))
    min_rows = _MIN_ROWS_PER_K * settings.k_max
    rows, used = 0, []
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        for volume_path in order:
            if len(used) >= target and rows >= min_rows:
                break
            try:
                volume = load(volume_path)
            except UserError as error:
                if skip is None:
                    raise
                skip(volume_path, str(error))
                continue
            for crop in volume_crops(np.asarray(volume, dtype=np.float32), settings.roi):
                feats = slice_features(torch.from_numpy(np.ascontiguousarray(crop))[None, None],
                                       settings.slice_axis)[0].numpy()
                handle.write(feats.astype(np.float16).tobytes())
                rows += feats.shape[0]
            used.append(str(volume_path))
            reporter.emit("progress", step=len(used), total=target, stage="cluster_features", rows=rows)
        if not used:
            raise UserError("no volume could be read for clustering; check the data folder")
    return rows, used


def _fit_one(features: np.ndarray, k: int, settings: ClusterSettings, index: int) -> np.ndarray:
    """One MiniBatchKMeans over ``passes`` shuffled passes of chunked ``partial_fit``; returns (K, F) centroids."""
    from sklearn.cluster import MiniBatchKMeans

    rows = features.shape[0]
    chunk = min(rows, max(settings.batch_size, _MIN_ROWS_PER_K * k))
    seed = int(np.random.default_rng([settings.seed, 0xC1, index]).integers(2 ** 31))
    kmeans = MiniBatchKMeans(n_clusters=k, batch_size=chunk, random_state=seed, n_init=1, compute_labels=False)
    rng = np.random.default_rng(seed)
    for _ in range(settings.passes):
        order = rng.permutation(rows)
        for start in range(0, rows, chunk):
            picked = np.sort(order[start:start + chunk])
            if start and len(picked) < k:  # a short tail batch adds noise, not information
                continue
            kmeans.partial_fit(np.asarray(features[picked], dtype=np.float32))
    return np.asarray(kmeans.cluster_centers_, dtype=np.float32)
