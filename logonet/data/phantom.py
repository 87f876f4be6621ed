"""Synthetic abdominal CT phantoms in MSD layout: ``logonet phantom OUT --cases N [--size 96] [--seed S]``.

Each case is a labelled CT-like volume: body outline (skin, subcutaneous fat, muscle wall), spine and ribs,
lung bases, bowel with gas, and 13 organs with BTCV label values (liver, spleen, kidneys, adrenals,
gallbladder, stomach with a gas bubble, pancreas, aorta, IVC, portal/splenic vein, esophagus). Shapes are
superellipsoids and tubes in normalised body coordinates, bent by a smooth random deformation and
per-organ bumps; HU values are organ-specific (portal-venous phase) with soft texture, partial-volume
blur and noise. Case ``i`` of seed ``s`` is the same whatever ``--cases`` is.

Geometry: LPS with identity direction (array x -> patient left, y -> posterior, z -> superior), spacing
1.5 x 1.5 x 2.0 mm by default (the BTCV target spacing, so preprocessing does not resample).
Vectorised numpy/scipy; organs are evaluated only inside their bounding boxes.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .datasets import write_dataset_json
from ..errors import UserError
from . import volumes
from .labels import BTCV_NAMES

#: BTCV values drawn in every phantom (all 13 organs).
PHANTOM_LABELS: Tuple[int, ...] = tuple(range(1, 14))
DEFAULT_SPACING = (1.5, 1.5, 2.0)

# Mean HU per tissue (contrast-enhanced, portal-venous phase) and texture amplitude.
_HU = {
    "air": -1000.0, "lung": -850.0, "fat": -100.0, "muscle": 50.0, "skin": 30.0, "bowel": 30.0,
    "cortical": 800.0, "cancellous": 250.0, "disc": 90.0,
    1: 120.0, 2: 170.0, 3: 170.0, 4: 10.0, 5: 45.0, 6: 110.0, 7: 35.0, 8: 190.0, 9: 140.0, 10: 160.0,
    11: 95.0, 12: 60.0, 13: 60.0,
}


@dataclass
class _Grid:
    """Normalised coordinates in [-1, 1] along x (right->left), y (anterior->posterior), z (inferior->superior)."""

    n: int
    x: np.ndarray  # (1, 1, n) broadcastable, array order (z, y, x)
    y: np.ndarray  # (1, n, 1)
    z: np.ndarray  # (n, 1, 1)
    voxel: float  # one voxel in normalised units


def _smooth_field(rng: np.random.Generator, grid: _Grid, modes: int = 6, max_freq: float = 2.5) -> np.ndarray:
    """Smooth random field with unit-ish amplitude: a sum of separable random cosine products (cheap)."""
    out = np.zeros((grid.n, grid.n, grid.n), dtype=np.float32)
    for _ in range(modes):
        kx, ky, kz = rng.uniform(0.5, max_freq, size=3) * math.pi / 2
        px, py, pz = rng.uniform(0, 2 * math.pi, size=3)
        amp = rng.normal(0, 1.0 / math.sqrt(modes))
        fx = np.cos(kx * grid.x + px).astype(np.float32)
        fy = np.cos(ky * grid.y + py).astype(np.float32)
        fz = np.cos(kz * grid.z + pz).astype(np.float32)
        out += np.float32(amp) * (fz * fy) * fx
    return out


def _box(grid: _Grid, center: Sequence[float], half: Sequence[float]) -> Tuple[slice, slice, slice]:
    """Array slices (z, y, x) covering center +- half (normalised units), clipped to the grid."""
    def axis(c: float, h: float) -> slice:
        lo = int(math.floor((c - h + 1) / 2 * (grid.n - 1)))
        hi = int(math.ceil((c + h + 1) / 2 * (grid.n - 1))) + 1
        return slice(max(lo, 0), min(max(hi, 0), grid.n))
    return axis(center[2], half[2]), axis(center[1], half[1]), axis(center[0], half[0])


class _Case:
    """One phantom: warped coordinates, an HU volume and a label volume being painted."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.rng = rng
        lin = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        self.grid = _Grid(n, lin[None, None, :], lin[:, None][None], lin[:, None, None], 2.0 / (n - 1))
        amp = 0.07
        # Smoothly deformed coordinates: every shape below is bent by the same random warp.
        self.X = self.grid.x + amp * _smooth_field(rng, self.grid)
        self.Y = self.grid.y + amp * _smooth_field(rng, self.grid)
        self.Z = self.grid.z + 0.5 * amp * _smooth_field(rng, self.grid)
        self.bumps = [_smooth_field(rng, self.grid, modes=8, max_freq=5.0) for _ in range(2)]
        self.texture = _smooth_field(rng, self.grid, modes=8, max_freq=6.0)
        self.hu = np.full((n, n, n), _HU["air"], dtype=np.float32)
        self.labels = np.zeros((n, n, n), dtype=np.uint8)

    def min_radius(self, r: float) -> float:
        """Keep thin structures at least ~1.3 voxels thick at small sizes."""
        return max(r, 1.3 * self.grid.voxel)

    def paint(self, region: Tuple[slice, ...], mask: np.ndarray, hu: float, label: int = -1) -> None:
        self.hu[region][mask] = hu
        if label >= 0:
            self.labels[region][mask] = label

    def ellipsoid(self, center: Sequence[float], axes: Sequence[float], power: float = 2.0, angle: float = 0.0,
                  bump: float = 0.1, taper: float = 0.0) -> Tuple[Tuple[slice, ...], np.ndarray]:
        """Superellipsoid (power > 2: cornered) rotated about z by ``angle``; ``taper`` thins it towards +x."""
        axes = [self.min_radius(a) for a in axes]
        reach = max(axes[0], axes[1]) * 1.2 + 0.08
        region = _box(self.grid, center, (reach, reach, axes[2] * 1.2 + 0.08))
        dx = self.X[region] - center[0]
        dy = self.Y[region] - center[1]
        dz = self.Z[region] - center[2]
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        scale_y = 1.0 - taper * np.clip(u / axes[0], -1, 1)  # wedge: thinner towards one side
        r = (np.abs(u / axes[0]) ** power + np.abs(v / (axes[1] * scale_y)) ** power
             + np.abs(dz / axes[2]) ** power)
        wobble = bump * (self.rng.uniform(-1, 1) * self.bumps[0][region] + self.rng.uniform(-1, 1) * self.bumps[1][region])
        return region, r < (1.0 + wobble)

    def tube(self, points: Sequence[Sequence[float]], radius: float, flatten: float = 1.0
             ) -> Tuple[Tuple[slice, ...], np.ndarray]:
        """Tube of ``radius`` around a polyline through ``points`` (x, y, z); ``flatten`` squashes it in y."""
        radius = self.min_radius(radius)
        pts = np.asarray(points, dtype=np.float32)
        lo, hi = pts.min(axis=0) - radius - 0.08, pts.max(axis=0) + radius + 0.08
        region = _box(self.grid, (lo + hi) / 2, (hi - lo) / 2)
        px, py, pz = self.X[region], self.Y[region] / flatten, self.Z[region]
        best = np.full(px.shape, np.inf, dtype=np.float32)
        for a, b in zip(pts[:-1], pts[1:]):
            a = a / np.array([1, flatten, 1], dtype=np.float32)
            b = b / np.array([1, flatten, 1], dtype=np.float32)
            ab = b - a
            t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / float(ab @ ab)
            t = np.clip(t, 0.0, 1.0)
            d2 = (px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2
            np.minimum(best, d2, out=best)
        return region, best < radius * radius


def _jitter(rng: np.random.Generator, point: Sequence[float], amount: float = 0.04) -> List[float]:
    return [float(p + rng.uniform(-amount, amount)) for p in point]


def _draw_body(case: _Case) -> np.ndarray:
    """Skin, subcutaneous fat, muscle wall, abdominal fat, lungs at the top; returns the cavity mask."""
    rng, X, Y, Z = case.rng, case.X, case.Y, case.Z
    ax, ay, cy = 0.86 * rng.uniform(0.92, 1.05), 0.66 * rng.uniform(0.92, 1.05), 0.05
    ell = (X / ax) ** 2 + ((Y - cy) / ay) ** 2 + 0.04 * case.bumps[0]  # > 1 outside
    body = ell < 1.0
    fat_depth = rng.uniform(0.78, 0.86)
    case.hu[body] = _HU["skin"]
    case.hu[ell < 0.97] = _HU["fat"]
    wall = ell < fat_depth
    case.hu[wall] = _HU["muscle"]
    cavity = ell < fat_depth - 0.12
    case.hu[cavity] = _HU["fat"] + 20.0
    # Lung bases at the top, posterior-lateral (air-filled, not labelled).
    for side in (-1, 1):
        lung = (((X - side * 0.42) / 0.3) ** 2 + ((Y - 0.2) / 0.35) ** 2 + ((Z - 1.15) / 0.45) ** 2) < 1.0
        case.hu[lung & cavity] = _HU["lung"]
    # Bowel loops in the lower abdomen: soft tissue tubes with gas pockets (distractors, not labelled).
    bowel_field = _smooth_field(rng, case.grid, modes=10, max_freq=7.0)
    belly = ((X / 0.62) ** 2 + ((Y + 0.08) / 0.42) ** 2 < 1.0) & (Z < 0.12 + 0.1 * case.bumps[1])
    loops = (np.abs(bowel_field) < 0.12) & belly & cavity
    case.hu[loops] = _HU["bowel"]
    case.hu[loops & (case.texture > 0.8)] = _HU["air"]
    return cavity


def _draw_bone(case: _Case) -> None:
    """Vertebral bodies (cortical rim, cancellous core, discs), posterior elements and ribs."""
    X, Y, Z, rng = case.X, case.Y, case.Z, case.rng
    cx, cy, r = rng.uniform(-0.02, 0.02), 0.47, 0.12
    d2 = ((X - cx) / r) ** 2 + ((Y - cy) / (0.9 * r)) ** 2
    period, phase = rng.uniform(0.22, 0.28), rng.uniform(0, 1)
    disc = np.abs(((Z / period + phase) % 1.0) - 0.5) < 0.08
    vertebra = d2 < 1.0
    case.hu[vertebra] = _HU["cortical"]
    case.hu[d2 < 0.6] = _HU["cancellous"]
    case.hu[vertebra & disc] = _HU["disc"]
    spinous = (np.abs(X - cx) < 0.03) & (Y > cy + 0.1) & (Y < cy + 0.27) & ~disc
    lamina = (np.abs(np.abs(X - cx) - 0.09) < 0.035) & (Y > cy + 0.08) & (Y < cy + 0.18) & ~disc
    case.hu[spinous | lamina] = _HU["cortical"]
    # Ribs: thin arcs inside the body wall in the upper half, one band per vertebra.
    ell = (X / 0.78) ** 2 + ((Y - 0.05) / 0.58) ** 2
    rib = (np.abs(ell - 1.0) < 0.06) & (Z > -0.1) & (np.abs(((Z / period + phase + 0.3) % 1.0) - 0.5) < 0.12) & (Y > -0.35)
    case.hu[rib] = _HU["cortical"]


def _draw_organs(case: _Case) -> None:
    """Paint the 13 organs (later ones win where they touch); vessels last so they run through."""
    rng = case.rng
    j = lambda p, a=0.04: _jitter(rng, p, a)  # noqa: E731
    s = lambda: rng.uniform(0.88, 1.12)  # noqa: E731
    tissue = lambda label: _HU[label] + rng.uniform(-12, 12)  # noqa: E731

    # Liver: big cornered wedge on the patient's right, thinner towards the midline.
    region, mask = case.ellipsoid(j((-0.38, -0.02, 0.42)), (0.42 * s(), 0.44 * s(), 0.36 * s()), power=2.6,
                                  angle=rng.uniform(-0.2, 0.2), taper=0.45, bump=0.25)
    case.paint(region, mask, tissue(6), 6)
    # Gallbladder: pear under the liver, anterior.
    region, mask = case.ellipsoid(j((-0.3, -0.36, 0.16)), (0.08 * s(), 0.11 * s(), 0.13 * s()),
                                  angle=rng.uniform(-0.6, 0.6), bump=0.1)
    case.paint(region, mask, tissue(4), 4)
    # Spleen: elongated crescent on the left, posterior.
    region, mask = case.ellipsoid(j((0.56, 0.24, 0.45)), (0.11 * s(), 0.22 * s(), 0.2 * s()), power=2.2,
                                  angle=rng.uniform(-0.7, -0.3), bump=0.2)
    case.paint(region, mask, tissue(1), 1)
    # Stomach: left upper, anterior, with a gas bubble at its anterior top.
    center = j((0.3, -0.22, 0.42))
    axes = (0.22 * s(), 0.19 * s(), 0.24 * s())
    region, mask = case.ellipsoid(center, axes, angle=rng.uniform(-0.5, 0.2), bump=0.25)
    case.paint(region, mask, tissue(7), 7)
    gas = mask & (case.Y[region] < center[1] - 0.05) & (case.Z[region] > center[2] + 0.1)
    case.hu[region][gas] = _HU["air"]
    # Kidneys, posterior either side of the spine, bean-like (tilted), cortex brighter than medulla.
    for label, side, dz in ((2, -1, 0.0), (3, 1, 0.06)):
        center = j((side * 0.34, 0.36, 0.05 + dz))
        region, mask = case.ellipsoid(center, (0.1 * s(), 0.13 * s(), 0.2 * s()), angle=side * rng.uniform(0.2, 0.5),
                                      bump=0.1)
        case.paint(region, mask, tissue(label), label)
        medulla = mask & (((case.X[region] - center[0]) / 0.05) ** 2 + ((case.Y[region] - center[1]) / 0.07) ** 2 < 1)
        case.hu[region][medulla] = _HU[label] - 60.0
        # Adrenal gland: small flat body just above and medial to the kidney.
        adrenal = 12 if label == 2 else 13
        region, mask = case.ellipsoid(j((side * 0.26, 0.3, 0.3 + dz), 0.02), (0.045, 0.07 * s(), 0.07),
                                      angle=side * 0.4, bump=0.05)
        case.paint(region, mask, tissue(adrenal), adrenal)
    # Pancreas: elongated, curved across the midline, head on the right near the duodenum.
    pts = [j((-0.2, -0.02, 0.08), 0.03), j((0.05, 0.04, 0.14), 0.03), j((0.3, 0.1, 0.2), 0.03),
           j((0.45, 0.16, 0.26), 0.03)]
    region, mask = case.tube(pts, 0.055 * s(), flatten=0.7)
    case.paint(region, mask, tissue(11), 11)
    head_region, head = case.ellipsoid(pts[0], (0.08, 0.07, 0.08), bump=0.05)
    case.paint(head_region, head, tissue(11), 11)
    # Vessels: aorta (left-anterior of the spine), IVC (right, flattened), portal + splenic vein, esophagus.
    x0 = rng.uniform(0.03, 0.08)
    region, mask = case.tube([(x0, 0.25, -1.1), (x0 + rng.uniform(-0.03, 0.03), 0.24, 0.4), (x0 + 0.02, 0.22, 0.62)],
                             0.065 * s())
    case.paint(region, mask, tissue(8), 8)
    region, mask = case.tube([(-0.13, 0.22, -1.1), (-0.14, 0.2, 0.3), (-0.18, 0.15, 0.62)], 0.07 * s(), flatten=0.7)
    case.paint(region, mask, tissue(9), 9)
    hilum = j((-0.26, -0.02, 0.34), 0.02)
    region, mask = case.tube([pts[1], hilum], 0.04 * s())
    case.paint(region, mask, tissue(10), 10)
    region, mask = case.tube([pts[1], (0.28, 0.16, 0.26), j((0.48, 0.2, 0.38), 0.02)], 0.03 * s())
    case.paint(region, mask, tissue(10), 10)
    region, mask = case.tube([(0.12, 0.16, 1.1), (0.16, 0.1, 0.7), (0.22, -0.05, 0.56)], 0.045 * s())
    case.paint(region, mask, tissue(5), 5)


def make_phantom(size: int = 96, seed: int = 0, index: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(hu int16, labels uint8)``, both (z, y, x) arrays of ``size``^3. Deterministic."""
    if size < 16:
        raise UserError(f"phantom size must be at least 16 voxels, got {size}")
    for attempt in range(8):
        rng = np.random.default_rng([int(seed), int(index), attempt])
        case = _Case(size, rng)
        _draw_body(case)
        _draw_bone(case)
        _draw_organs(case)
        present = set(np.unique(case.labels).tolist())
        if set(PHANTOM_LABELS) <= present:  # every organ visible (almost always on the first attempt)
            break
    hu = case.hu + 25.0 * case.texture * (case.labels > 0)  # soft organ texture
    hu = ndimage.gaussian_filter(hu, sigma=0.7, truncate=3.0)  # partial-volume blur
    hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)  # quantum noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), case.labels


def phantom_image(array: np.ndarray, spacing: Sequence[float] = DEFAULT_SPACING) -> sitk.Image:
    """SimpleITK image for a (z, y, x) phantom array: LPS identity direction, centred on the origin."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([-(n - 1) * sp / 2.0 for n, sp in zip(image.GetSize(), spacing)])
    return image


def write_phantom_dataset(out: volumes.PathLike, cases: int, size: int = 96, seed: int = 0, unlabeled: bool = False,
                          spacing: Sequence[float] = DEFAULT_SPACING, progress: Any = None) -> Path:
    """Write ``cases`` phantoms to ``out`` in MSD layout (``imagesTr/``, ``labelsTr/``, ``dataset.json``)."""
    out = Path(out)
    if cases < 1:
        raise UserError(f"--cases must be at least 1, got {cases}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the phantom dataset.")
    if out.is_dir() and any(out.iterdir()):
        meta_path = out / "dataset.json"
        try:
            ours = "logonet" in json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UserError(f"{out} is not empty and is not a phantom dataset; choose a new or empty folder.")
    training = []
    indices = range(cases)
    iterator = progress.iterate(indices, total=cases, desc="phantom") if progress is not None else indices
    for i in iterator:
        name = f"phantom_{i:03d}"
        hu, labels = make_phantom(size, seed, i)
        image = phantom_image(hu, spacing)
        volumes.write_image(image, out / "imagesTr" / f"{name}.nii.gz")
        entry = {"image": f"./imagesTr/{name}.nii.gz"}
        if not unlabeled:
            volumes.write_labelmap(labels, image, out / "labelsTr" / f"{name}.nii.gz", BTCV_NAMES)
            entry["label"] = f"./labelsTr/{name}.nii.gz"
        training.append(entry)
    write_dataset_json(out, {v: BTCV_NAMES[v] for v in PHANTOM_LABELS}, training, name="LoGoNetPhantom",
                       description="Synthetic abdominal CT phantoms (logonet phantom); BTCV label values",
                       extra={"logonet": {"generator": "logonet phantom", "seed": seed, "size": size,
                                          "spacing": list(spacing), "unlabeled": unlabeled}})
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (MSD layout: imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--size", type=int, default=96, help="voxels per side (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same phantoms)")
    parser.add_argument("--unlabeled", action="store_true", help="write images only (for self-supervised pre-training)")
    parser.add_argument("--progress", choices=("tqdm", "jsonl", "none"), default="tqdm",
                        help="progress output: tqdm bar (default), JSON lines, or none")


def run(args: argparse.Namespace) -> int:
    from ..events import ProgressReporter

    reporter = ProgressReporter(args.progress)
    start = time.perf_counter()
    reporter.emit("start", total=args.cases)
    out = write_phantom_dataset(args.out, args.cases, size=args.size, seed=args.seed, unlabeled=args.unlabeled,
                                progress=reporter)
    seconds = time.perf_counter() - start
    reporter.emit("done", outputs=[str(out)], seconds=round(seconds, 2))
    if args.progress != "jsonl":
        kind = "unlabelled" if args.unlabeled else "labelled"
        print(f"wrote {args.cases} {kind} phantom cases of {args.size}^3 to {out} in {seconds:.1f} s")
    return 0
