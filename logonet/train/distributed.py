"""Where this process sits in a ``torchrun`` job: :class:`DistContext`, joining and leaving the process group."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..runtime import select_device


@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group when launched by it (env ``WORLD_SIZE`` > 1), else a single process.

    Backend: NCCL on CUDA (one GPU per local rank), gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=select_device(device))
    import torch.distributed as tdist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def cleanup_distributed(ctx: Optional[DistContext]) -> None:
    if ctx is not None and ctx.distributed:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
