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
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from .. import modelcard
from ..atomic import atomic_write
from ..errors import UserError
from ..events import ProgressReporter, reporter_for
from ..nets.pretrain_head import PretrainHead
from .. import runtime
from ..train import checkpoints, distributed, options
from ..train import engine as eng
from ..train import loader as loading
from ..train.init import HEAD_PREFIX
from .loss import masked_cluster_loss
from .masking import PAPER_PATCH_SIZES, MaskingConfig, mask_crop
from .pseudolabels import ClusterSettings, PseudoLabeler, fit_pseudolabels

DEFAULT_ROI = 96
SCAN_FILE = "volumes.json"


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="folder of CT volumes (NIfTI, NRRD, MHA, DICOM series; "
                                                     "labels, if any, are ignored)")
    parser.add_argument("--out", required=True, help="output folder: best/ and last/ model cards, checkpoint, "
                                                     "pseudolabels/, metrics")
    parser.add_argument("--model", default="logonet", help="backbone: logonet, ulkanet, swinunetr, unetr, ...")
    parser.add_argument("--preset", default="S", help="size preset for logonet/ulkanet: T (tiny), S (paper), L")
    parser.add_argument("--features", type=int, default=32,
                        help="backbone output channels fed to the head (a feature width, not classes)")
    parser.add_argument("--feature-size", type=int, default=None,
                        help="feature_size of a MONAI backbone (swinunetr: multiple of 12; unetr)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help='extra constructor arguments, e.g. \'{"hidden_size": 384}\' for unetr')
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--roi", type=int, nargs="+", default=[DEFAULT_ROI],
                        help="crop size (1 or 3 numbers, multiples of 32)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="target spacing in mm (1 or 3 numbers; default 1.5 1.5 2.0)")
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LOW", "HIGH"),
                        help="HU window mapped to [0, 1] (paper: -1000 1000)")
    parser.add_argument("--slice-axis", type=int, default=2, choices=[0, 1, 2],
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
    group = parser.add_argument_group("training")
    group.add_argument("--samples", type=int, default=2, help="random crops per volume per step")
    group.add_argument("--batch", type=int, default=1, help="volumes per step (each gives --samples crops)")
    group.add_argument("--repeats", type=int, default=1, help="passes over the volumes per epoch")
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--weight-decay", type=float, default=1e-5)
    group.add_argument("--warmup", type=int, default=None, help="warmup epochs (default 10%% of --epochs)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    group.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    group.add_argument("--cache", default="none", choices=["memory", "disk", "none"],
                       help="cache the deterministic preprocessing (disk: OUT/cache)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--name", default=None, help="model name written into model.json")
    group.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    group.add_argument("--progress", default=None, choices=["jsonl", "tqdm", "none"])


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


def architecture_for(args: argparse.Namespace, roi: Tuple[int, int, int]) -> Dict[str, Any]:
    """The card's ``architecture`` block for the backbone (what ``finetune`` must build to load it)."""
    kwargs: Dict[str, Any] = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as error:
            raise UserError(f"--model-kwargs is not valid JSON ({error}); e.g. '{{\"hidden_size\": 384}}'") from error
        if not isinstance(kwargs, dict):
            raise UserError("--model-kwargs must be a JSON object, e.g. '{\"hidden_size\": 384}'")
    if args.feature_size is not None:
        kwargs["feature_size"] = args.feature_size
    if args.model.lower() in ("unetr", "segresnetvae"):
        kwargs.setdefault("img_size", list(roi))  # these MONAI nets are built for one input size
    preset = args.preset if args.model.lower() in ("logonet", "ulkanet") else None
    return {"name": args.model.lower(), "preset": preset, "in_channels": 1, "out_channels": int(args.features),
            "kwargs": kwargs}


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def scan_volumes(folder: str, out: Path, reporter: ProgressReporter) -> List[str]:
    """Every image of ``folder`` that reads as a 3-D volume; others are reported (``warning``) and skipped.

    Each file is read once (the same SimpleITK reader training uses) and the verdict is kept in
    ``OUT/volumes.json`` keyed by size and modification time, so ``--resume`` does not read everything again.
    """
    from ..data import datasets, io

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
                io.read_image(path)
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
def run(args: argparse.Namespace) -> int:
    from monai.data import list_data_collate

    from ..data.transforms import PreprocessConfig, train_transforms
    from ..nets import build_model

    reporter = reporter_for(args.progress)
    out = Path(args.out)
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    roi = options.roi_argument(args.roi, DEFAULT_ROI)
    if args.features < 1 or args.tau <= 0:
        raise UserError(f"--features must be positive and --tau > 0, got {args.features}, {args.tau}")
    from ..atomic import prepare_run_folder  # --out usable, stale temps of a killed run gone
    prepare_run_folder(out, "--out")
    checkpoints.check_output_folder(out, args.resume, "pre-training run")
    masking = MaskingConfig(phi1=args.phi1, chain=args.chain, phi2=args.phi2, slice_axis=args.slice_axis,
                            patch_sizes=PAPER_PATCH_SIZES)
    defaults = PreprocessConfig.preset("ssl")
    cfg = PreprocessConfig.preset("ssl", spacing=options.triple_argument(args.spacing, "spacing", defaults.spacing),
                                  intensity_window=tuple(args.window), roi_size=roi, num_samples=args.samples)
    preprocessing = {k: v for k, v in cfg.to_dict().items() if k != "cache_dir"}
    settings = ClusterSettings(clusterers=args.clusterers, k_min=args.k_min, k_max=args.k_max,
                               fraction=args.cluster_fraction, seed=args.seed, roi=roi, slice_axis=args.slice_axis,
                               passes=args.cluster_passes,
                               preprocessing={k: preprocessing[k] for k in ("spacing", "intensity_window",
                                                                            "orientation", "crop_foreground")})
    label_dir = Path(args.pseudolabels) if args.pseudolabels else out / "pseudolabels"
    architecture = architecture_for(args, roi)

    dist = distributed.setup_distributed(args.device)
    started = time.time()
    try:
        if not dist.is_main:
            reporter = ProgressReporter("none")
        out.mkdir(parents=True, exist_ok=True)
        # Rank 0 reads the folder and fits the clusterers; the other ranks wait and reuse its files.
        if dist.is_main:
            volumes = scan_volumes(args.data, out, reporter)
            fit_pseudolabels(volumes, label_dir, settings, volume_loader(cfg), reporter,
                             skip=lambda path, why: reporter.emit("warning", message=f"skipping {path}: {why}",
                                                                  path=path))
        else:
            _wait_for_pseudolabels(label_dir)
            volumes = scan_volumes(args.data, out, reporter)  # rank 0's verdicts are cached: no file is read again
        labeler = PseudoLabeler.load(label_dir).to(dist.device)

        runtime.seed_everything(args.seed + dist.rank)
        try:
            backbone = build_model(architecture["name"], in_channels=1, out_channels=architecture["out_channels"],
                                   preset=architecture["preset"], **architecture["kwargs"])
        except (TypeError, ValueError) as error:
            raise UserError(f"cannot build {args.model}: {error}") from error
        head = PretrainHead(args.features, labeler.ks, slice_axis=args.slice_axis, grid=args.head_grid)
        model = PretrainNet(backbone, head)

        items = [{"image": path} for path in volumes]
        transform = train_transforms(cfg, keys=("image",))
        dataset = loading.RepeatDataset(loading.training_dataset(items, transform, args.cache, out / "cache", args.workers),
                                    args.repeats)
        loader = loading.make_loader(dataset, batch_size=args.batch, shuffle=True, dist=dist, seed=args.seed,
                                 num_workers=args.workers, collate_fn=list_data_collate)
        reporter.emit("stage", stage="pretrain", volumes=len(volumes), clusterers=labeler.num_clusterers,
                      k_max=labeler.k_max, model=architecture["name"])

        step = make_step(labeler, masking, args.tau)
        warmup = args.warmup if args.warmup is not None else max(0, int(round(0.1 * args.epochs)))
        config = eng.TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                 warmup_epochs=warmup, amp=args.amp, seed=args.seed, monitor="loss",
                                 monitor_mode="min")
        command = "logonet pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 1 and sys.argv[1] == "pretrain" else "logonet pretrain (API)"
        training = {"command": command, "data": str(Path(args.data).resolve()), "volumes": len(volumes),
                    "task": "ssl-pretrain", "epochs_planned": args.epochs, "lr": args.lr, "seed": args.seed,
                    "pseudolabels": {"folder": str(label_dir.resolve()), "clusterers": labeler.num_clusterers,
                                     "ks": labeler.ks, "k_range": [args.k_min, args.k_max]},
                    "masking": {"phi1": masking.phi1, "chain": masking.chain, "phi2": masking.phi2,
                                "patch_sizes": list(masking.patch_sizes), "slice_axis": masking.slice_axis},
                    "tau": args.tau, "head": {"in_channels": args.features, "ks": labeler.ks,
                                              "slice_axis": args.slice_axis, "grid": args.head_grid}}

        def save(kind: str, net: nn.Module, epochs_done: int, metrics: Mapping[str, float]) -> None:
            modelcard.save(
                out / kind, net.card_state_dict(), name=args.name or f"{out.name}-pretrained",
                architecture=architecture, labels=[], preprocessing=preprocessing,
                description=f"{args.model} masked self-supervised pre-training ({kind} epoch); for finetune --init",
                training={**training, "epochs": epochs_done, "world_size": dist.world_size,
                          "wall_time_s": round(time.time() - started, 1)},
                metrics={"loss": metrics.get("loss"), "cluster_acc": metrics.get("cluster_acc")})

        trainer = eng.Engine(model, config, out, step_fn=step, train_loader=loader, save_fn=save,
                             reporter=reporter, dist=dist, random_transforms=transform)
        result = trainer.fit(resume=args.resume)
        if result.interrupted:
            return 130
        reporter.emit("done", outputs={"best": str(out / "best"), "last": str(out / "last"),
                                       "pseudolabels": str(label_dir), "metrics": str(out / eng.METRICS_CSV)},
                      best_loss=result.best_value, best_epoch=result.best_epoch,
                      time_s=round(time.time() - started, 1))
        if reporter.mode != "jsonl" and dist.is_main:
            print(f"pre-training done: lowest loss {result.best_value:.4f} at epoch {result.best_epoch}; "
                  f"initialise fine-tuning with: logonet finetune DATA --init {out} --model {args.model}")
        return 0
    finally:
        distributed.cleanup_distributed(dist)


def _wait_for_pseudolabels(folder: Path, poll_s: float = 2.0) -> None:
    """Other ranks wait for rank 0's clustering by polling its manifest, not with a collective barrier: clustering
    a large folder can outlast the process group's timeout. If rank 0 fails, torchrun ends this process."""
    from .pseudolabels import read_manifest

    while True:
        manifest = read_manifest(folder) if (folder / "manifest.json").is_file() else None
        if manifest is not None and manifest.get("complete"):
            return
        time.sleep(poll_s)
