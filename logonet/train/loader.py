"""The training data pipeline's last stage: the cached dataset, per-case repeats and the (sharded) DataLoader."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .distributed import DistContext


class RepeatDataset(torch.utils.data.Dataset):
    """``times`` passes over ``dataset`` per epoch (one-scan datasets would otherwise be one step per epoch):
    one number for every item, or one per item (a few real scans weighed against many synthetic ones)."""

    def __init__(self, dataset: Any, times: Any) -> None:
        counts = [int(times)] * len(dataset) if isinstance(times, int) else [int(t) for t in times]
        if len(counts) != len(dataset):
            raise ValueError(f"RepeatDataset: {len(counts)} repeat counts for {len(dataset)} items")
        self.dataset = dataset
        self.order = [i for i, n in enumerate(counts) for _ in range(max(1, n))]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.order[index]]


def training_dataset(items: List[Dict[str, Any]], transform: Any, cache: str, cache_dir: Path, workers: int) -> Any:
    """The cached training dataset: ``cache`` is memory (MONAI CacheDataset), disk (persistent) or none."""
    from monai.data import CacheDataset

    from ..data.transforms import cached_dataset

    if cache == "memory":
        return CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=max(1, workers), progress=False)
    return cached_dataset(items, transform, str(cache_dir) if cache == "disk" else None)


def _init_worker(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C/Stop (the main process handles it and checkpoints; a worker dying on
    it would crash the main loop first) and re-seed their MONAI transforms (else every worker replays the same
    crops)."""
    from monai.data.utils import worker_init_fn

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_init_fn(worker_id)


def make_loader(dataset: Any, batch_size: int, *, shuffle: bool = True, dist: Optional[DistContext] = None,
                seed: int = 0, num_workers: int = 0, collate_fn: Optional[Callable] = None,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose order is the seeded permutation of each epoch (the engine calls ``set_epoch``), sharded
    by rank under torchrun: rank r takes items r, r+W, ... of it. One process with batch W*B therefore sees, step
    for step, the union of what W ranks with batch B see (when W divides the dataset; else DistributedSampler pads).
    The order depends only on (seed, epoch), so a resumed run repeats it."""
    sampler = None
    if dist is not None and dist.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                                      shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed,
                                                      drop_last=drop_last)
    kwargs: Dict[str, Any] = {}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    if num_workers > 0:
        kwargs["worker_init_fn"] = _init_worker
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers,
                                       drop_last=drop_last, persistent_workers=num_workers > 0, **kwargs)
