"""Where this process sits in a ``torchrun`` job: :class:`DistContext`, joining and leaving the process group."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

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


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradient: each rank's copy of the sum feeds only
    that rank's outputs, so the gradient of a rank's share is the sum of every copy's gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as tdist

        out = tensor.clone()
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as tdist

        out = grad.clone()
        tdist.all_reduce(out)
        return out


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch, over every rank of a CPU (gloo)
    process group: what :class:`torch.nn.SyncBatchNorm` does on GPUs, which refuses CPU tensors.

    Without it, ``W`` CPU ranks with ``B`` crops each normalise by per-rank statistics and train a different
    network than one process with ``W*B`` crops. The sums go through the differentiable all-reduce of
    :class:`_SumOverRanks`, so the backward pass sums the statistics' gradients over the ranks too (the same
    maths as SyncBatchNorm). In eval mode, or outside a process group, it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as tdist

        if not (self.training and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // max(1, input.shape[1])], dtype=torch.float64)
        tdist.all_reduce(count)
        n = float(count.item())
        # Two passes in float64 (mean, then the centred squares): as exact as BatchNorm over the whole batch.
        mean = _SumOverRanks.apply(input.sum(dims, dtype=torch.float64)) / n
        centred = input - mean.to(input.dtype).view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims, dtype=torch.float64)) / n
        out = centred * torch.rsqrt(var + self.eps).to(input.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / max(1.0, n - 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` as a :class:`CpuSyncBatchNorm` with the same parameters and buffers
    (same state_dict keys, so checkpoints and model cards are unchanged); the counterpart of
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` for gloo on CPUs."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (CpuSyncBatchNorm, nn.SyncBatchNorm)):
        converted = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        converted_child = convert_cpu_sync_batchnorm(child)
        if converted_child is not child:
            setattr(module, name, converted_child)
    return module
