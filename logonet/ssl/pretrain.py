"""``logonet pretrain``: masked self-supervised pre-training on a folder of unlabeled CTs (paper section 2).

1. Scan the folder (any layout :func:`logonet.data.datasets.discover` knows; every image, labelled or not).
   A file that cannot be read, or is not a 3-D volume, is reported as a ``warning`` event and left out.
2. Fit (or resume, or reuse) N k-means clusterers on slices of ~10% of the crops
   (:mod:`logonet.ssl.pseudolabels`; ``OUT/pseudolabels`` unless ``--pseudolabels DIR``).
3. Train backbone + :class:`~logonet.nets.pretrain_head.PretrainHead` with the engine of
   :mod:`logonet.train.engine` (AMP, AdamW + warmup + cosine, checkpoints, ``--resume``, torchrun/DDP): each step
   masks the crop (:mod:`logonet.ssl.masking`), predicts the cluster ids of the unmasked slices and minimises
   the loss of Eq. 4-5 (:mod:`logonet.ssl.loss`) over masked slices.
4. Write model cards ``OUT/best`` (lowest epoch loss) and ``OUT/last``: the backbone's tensors under the names
   ``build_model(name, ...)`` gives them, the head's under ``pretrain_head.``, so ``logonet finetune --init OUT``
   loads everything but the head and the output layers (the backbone's ``out_channels`` is a feature width,
   ``--features``, not a number of classes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import UserError
from ..events import ProgressReporter
from ..nets.pretrain_head import PretrainHead
from ..train.session import TrainingConfig, TrainingSession, add_training_arguments, config_from_args
from ..train.warmstart import HEAD_PREFIX
from .loss import masked_cluster_loss
from .masking import PAPER_PATCH_SIZES, MaskingConfig, mask_crop
from .pseudolabels import ClusterSettings, PseudoLabeler, fit_pseudolabels

SCAN_FILE = "volumes.json"


@dataclasses.dataclass
class PretrainConfig(TrainingConfig):
    """``logonet pretrain`` as a value: the shared :class:`~logonet.train.session.TrainingConfig` (crops per
    volume 2, no cache by default) plus the options below (same names and defaults as the command line)."""

    data: str = ""  # a folder of volumes (any layout datasets.discover knows; labels are ignored)
    samples: int = 2
    cache: str = "none"
    repeats: int = 1
    # backbone and head: the backbone's output width, a MONAI backbone's feature_size, the slice axis
    features: int = 32
    feature_size: Optional[int] = None
    slice_axis: int = 2
    head_grid: int = 1
    # pseudo-labels: N k-means clusterers with K drawn from [k_min, k_max] (paper: 80, 80..500)
    clusterers: int = 80
    k_min: int = 80
    k_max: int = 500
    cluster_fraction: float = 0.1
    cluster_passes: int = 3
    pseudolabels: Optional[str] = None  # default OUT/pseudolabels
    # masking and loss (paper: phi1 0.1, M = chain 5, phi2 0.7, tau 0.1)
    phi1: float = 0.1
    chain: int = 5
    phi2: float = 0.7
    tau: float = 0.1


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="folder of CT volumes (NIfTI, NRRD, MHA, DICOM series; "
                                                     "labels, if any, are ignored)")
    group = parser.add_argument_group("training")
    add_training_arguments(group, samples=2, cache="none", window="-1000 1000, the paper's")
    group.add_argument("--repeats", type=int, default=1, help="passes over the volumes per epoch")
    group = parser.add_argument_group("backbone and head")
    group.add_argument("--features", type=int, default=32,
                       help="backbone output channels fed to the head (a feature width, not classes)")
    group.add_argument("--feature-size", type=int, default=None,
                       help="feature_size of a MONAI backbone (swinunetr: multiple of 12; unetr)")
    group.add_argument("--slice-axis", type=int, default=2, choices=[0, 1, 2],
                       help="spatial axis whose slices form the sequence (2: axial, for RAS volumes)")
    group = parser.add_argument_group("pseudo-labels")
    group.add_argument("--clusterers", type=int, default=80, help="number of k-means clusterers N")
    group.add_argument("--k-min", type=int, default=80, help="smallest K drawn for a clusterer")
    group.add_argument("--k-max", type=int, default=500, help="largest K drawn for a clusterer")
    group.add_argument("--cluster-fraction", type=float, default=0.1,
                       help="share of the volumes whose crops are clustered")
    group.add_argument("--cluster-passes", type=int, default=3, help="passes of MiniBatchKMeans over those slices")
    group.add_argument("--pseudolabels", default=None, metavar="DIR",
                       help="pseudo-label folder to use or create (default OUT/pseudolabels); "
                            "a finished one from an earlier run with the same settings is reused")
    group = parser.add_argument_group("masking and loss")
    group.add_argument("--phi1", type=float, default=0.1, help="anchor probability per slice")
    group.add_argument("--chain", type=int, default=5, help="slices masked per anchor (M)")
    group.add_argument("--phi2", type=float, default=0.7, help="patch zeroing probability on masked slices")
    group.add_argument("--tau", type=float, default=0.1, help="softmax temperature (Eq. 5)")
    group.add_argument("--head-grid", type=int, default=1, help="in-plane pooling grid of the head per slice")


def run(args: argparse.Namespace) -> int:
    """``logonet pretrain``: the parsed arguments as a :class:`PretrainConfig`."""
    return pretrain(config_from_args(PretrainConfig, args))


# ----------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------
class PretrainNet(nn.Module):
    """Backbone ``(B, 1, X, Y, Z) -> (B, C, X, Y, Z)`` followed by the head ``-> (B, S, N, K_max)`` logits."""

    def __init__(self, backbone: nn.Module, head: PretrainHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.pretrain_head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pretrain_head(self.backbone(x))

    def card_state_dict(self) -> Dict[str, torch.Tensor]:
        """Backbone keys exactly as ``build_model`` names them; head keys under ``pretrain_head.``."""
        state = dict(self.backbone.state_dict())
        state.update({HEAD_PREFIX + k: v for k, v in self.pretrain_head.state_dict().items()})
        return state


def make_step(labeler: PseudoLabeler, masking: MaskingConfig, tau: float, generator: Any = None):
    """The engine's ``step_fn``: targets from the unmasked crop, mask it, loss of Eq. 4-5 on the masked slices.

    ``generator=None`` draws masks from torch's global RNG, which engine checkpoints save, so a resumed run
    draws the same masks.
    """

    def step(net: nn.Module, batch: Mapping[str, Any], device: torch.device):
        crop = torch.as_tensor(batch["image"]).float().to(device, non_blocking=True)  # (B, 1, X, Y, Z) in [0, 1]
        targets = labeler.assign(crop)
        masked, slice_mask = mask_crop(crop, masking, generator=generator)
        return masked_cluster_loss(net(masked), targets, slice_mask, tau=tau)

    return step


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def scan_volumes(folder: str, out: Path, reporter: ProgressReporter) -> List[str]:
    """Every image of ``folder`` that reads as a 3-D volume; others are reported (``warning``) and skipped.

    Each file is read once (the same SimpleITK reader training uses) and the verdict is kept in
    ``OUT/volumes.json`` keyed by size and modification time, so ``--resume`` does not read everything again.
    """
    from ..data import datasets, volumes

    paths = datasets.discover(folder).images()
    if not paths:
        raise UserError(f"{folder} holds no volumes (NIfTI, NRRD, MHA/MHD files or DICOM series folders)")
    cache_path = out / SCAN_FILE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    except ValueError:
        cache = {}
    good, verdicts = [], {}
    reporter.emit("stage", stage="scan", volumes=len(paths))
    for path in reporter.iterate(paths, total=len(paths), desc="scan"):
        stat = os.stat(path)
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = cache.get(path)
        if known is not None and known.get("stamp") == stamp:
            problem = known.get("problem")
        else:
            problem = None
            try:
                volumes.read_image(path)
            except UserError as error:
                problem = str(error)
        verdicts[path] = {"stamp": stamp, "problem": problem}
        if problem:
            reporter.emit("warning", message=f"skipping {path}: {problem}", path=path)
        else:
            good.append(path)
    with atomic_write(cache_path) as tmp:
        tmp.write_text(json.dumps(verdicts, indent=1), encoding="utf-8")
    if not good:
        raise UserError(f"none of the {len(paths)} files in {folder} is a readable 3-D volume; see the warnings")
    return good


def volume_loader(cfg: Any):
    """``path -> (X, Y, Z)`` float32 array in [0, 1]: the deterministic part of training's preprocessing."""
    from ..data.transforms import val_transforms

    transform = val_transforms(cfg, keys=("image",))

    def load(path: str) -> np.ndarray:
        try:
            image = transform({"image": path})["image"]
        except Exception as error:  # MONAI wraps reader errors in RuntimeError; a bad file must not stop the run
            raise UserError(f"cannot preprocess {path}: {str(error).splitlines()[-1] if str(error) else error}") \
                from error
        return np.asarray(image[0], dtype=np.float32)

    return load


# ----------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------
def pretrain(config: PretrainConfig) -> int:
    """Masked SSL pre-training of ``config.model`` on the volumes of ``config.data`` into ``config.out``: 0 when
    done, 130 when stopped (``resume=True`` continues). User mistakes raise :class:`~logonet.errors.UserError`."""
    if config.features < 1 or config.tau <= 0:
        raise UserError(f"--features must be positive and --tau > 0, got {config.features}, {config.tau}")
    session = TrainingSession(config, what="pre-training run", function="logonet.ssl.pretrain.pretrain")
    masking = MaskingConfig(phi1=config.phi1, chain=config.chain, phi2=config.phi2, slice_axis=config.slice_axis,
                            patch_sizes=PAPER_PATCH_SIZES)
    cfg = session.preprocessing("ssl")
    preprocessing = cfg.card_dict()
    settings = ClusterSettings(clusterers=config.clusterers, k_min=config.k_min, k_max=config.k_max,
                               fraction=config.cluster_fraction, seed=config.seed, roi=session.roi,
                               slice_axis=config.slice_axis, passes=config.cluster_passes,
                               preprocessing={k: preprocessing[k] for k in ("spacing", "intensity_window",
                                                                            "orientation", "crop_foreground")})
    label_dir = Path(config.pseudolabels) if config.pseudolabels else session.out / "pseudolabels"
    extra = {"feature_size": config.feature_size} if config.feature_size is not None else {}
    architecture = session.architecture(config.features, **extra)
    with session.running() as run:
        volumes, labeler = _pseudolabels(config, run, settings, cfg, label_dir)
        model = PretrainNet(run.build(architecture), PretrainHead(config.features, labeler.ks,
                                                                  slice_axis=config.slice_axis, grid=config.head_grid))
        from ..data.transforms import train_transforms

        transform = train_transforms(cfg, keys=("image",))
        loader = run.loader([{"image": path} for path in volumes], transform, config.repeats)
        run.reporter.emit("stage", stage="pretrain", volumes=len(volumes), clusterers=labeler.num_clusterers,
                          k_max=labeler.k_max, model=architecture["name"])
        save = run.card_saver(_card_writer(config, run, architecture, preprocessing),
                              {**_training_summary(config, volumes, labeler, masking, label_dir),
                               "augmentation": cfg.augmentation_dict()})
        result = run.fit(model, loader, step=make_step(labeler, masking, config.tau), save=save,
                         random_transforms=transform, monitor="loss", monitor_mode="min")
        code = run.finish(result, "best_loss", {"pseudolabels": str(label_dir)})
        if code == 0:
            run.tell(f"pre-training done: lowest loss {result.best_value:.4f} at epoch {result.best_epoch}; "
                     f"initialise fine-tuning with: logonet finetune DATA --init {run.out} --model {config.model}")
        return code


def _pseudolabels(config: PretrainConfig, run: TrainingSession, settings: ClusterSettings, cfg: Any,
                  label_dir: Path):
    """The readable volumes and the fitted clusterers. Rank 0 reads the folder and fits the clusterers; the other
    ranks wait and reuse its files."""
    run.out.mkdir(parents=True, exist_ok=True)
    reporter = run.reporter
    if run.context.is_main:
        volumes = scan_volumes(config.data, run.out, reporter)
        fit_pseudolabels(volumes, label_dir, settings, volume_loader(cfg), reporter,
                         skip=lambda path, why: reporter.emit("warning", message=f"skipping {path}: {why}", path=path))
    else:
        _wait_for_pseudolabels(label_dir)
        volumes = scan_volumes(config.data, run.out, reporter)  # rank 0's verdicts are cached: no file is read again
    labeler = PseudoLabeler.load(label_dir).to(run.context.device)
    run.seed()  # the network's initialisation does not depend on what clustering drew
    return volumes, labeler


def _training_summary(config: PretrainConfig, volumes: List[str], labeler: PseudoLabeler, masking: MaskingConfig,
                      label_dir: Path) -> Dict[str, Any]:
    return {"data": str(Path(config.data).resolve()), "volumes": len(volumes), "task": "ssl-pretrain",
            "epochs_planned": config.epochs, "lr": config.lr, "seed": config.seed,
            "pseudolabels": {"folder": str(label_dir.resolve()), "clusterers": labeler.num_clusterers,
                             "ks": labeler.ks, "k_range": [config.k_min, config.k_max]},
            "masking": {"phi1": masking.phi1, "chain": masking.chain, "phi2": masking.phi2,
                        "patch_sizes": list(masking.patch_sizes), "slice_axis": masking.slice_axis},
            "tau": config.tau, "head": {"in_channels": config.features, "ks": labeler.ks,
                                        "slice_axis": config.slice_axis, "grid": config.head_grid}}


def _card_writer(config: PretrainConfig, run: TrainingSession, architecture: Mapping[str, Any],
                 preprocessing: Mapping[str, Any]):
    """The task's part of each model card: backbone + head tensors, no labels, the loss."""

    def card(kind: str, net: nn.Module, epochs_done: int, metrics: Mapping[str, float]) -> Dict[str, Any]:
        return {"model": net.card_state_dict(), "name": config.name or f"{run.out.name}-pretrained",
                "architecture": architecture, "labels": [], "preprocessing": preprocessing,
                "description": f"{config.model} masked self-supervised pre-training ({kind} epoch); "
                               "for finetune --init",
                "metrics": {"loss": metrics.get("loss"), "cluster_acc": metrics.get("cluster_acc")}}

    return card


def _wait_for_pseudolabels(folder: Path, poll_s: float = 2.0) -> None:
    """Other ranks wait for rank 0's clustering by polling its manifest, not with a collective barrier: clustering
    a large folder can outlast the process group's timeout. If rank 0 fails, torchrun ends this process."""
    from .pseudolabels import read_manifest

    while True:
        manifest = read_manifest(folder) if (folder / "manifest.json").is_file() else None
        if manifest is not None and manifest.get("complete"):
            return
        time.sleep(poll_s)
