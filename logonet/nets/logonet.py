"""LoGoNet: a global ULKANet on the whole crop plus eight local 2-stage ULKANets on its octants, fused."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .layers import check_input
from .ulkanet import ULKASubNet


def split_into_cubes(x: torch.Tensor, splits: Tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, n*C, D/sd, H/sh, W/sw)``: cube ``k`` (row-major over (d, h, w)) in channel group ``k``."""
    b, c, d, h, w = x.shape
    sd, sh, sw = splits
    x = x.reshape(b, c, sd, d // sd, sh, h // sh, sw, w // sw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, sd * sh * sw * c, d // sd, h // sh, w // sw)


def stitch_cubes(x: torch.Tensor, splits: Tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`split_into_cubes`: ``(B, n*C, d, h, w) -> (B, C, sd*d, sh*h, sw*w)``."""
    b, nc, d, h, w = x.shape
    sd, sh, sw = splits
    c = nc // (sd * sh * sw)
    x = x.reshape(b, sd, sh, sw, c, d, h, w).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, sd * d, sh * h, sw * w)


class LoGoNet(nn.Module):
    """Local + global network (paper section 3).

    The global branch is a full ULKANet (all encoder stages) on the crop. The local branch cuts the crop into
    ``prod(local_splits)`` (= 8) cubes; each has its OWN 2-stage ULKANet. The eight local networks are packed
    into one module with grouped convolutions, so they run as one batched computation whose maths equals eight
    separate networks (:meth:`unpacked_local_networks` gives those, for tests and benchmarks). Global output
    + stitched local output -> Conv3d 3^3 -> BN -> GELU -> Conv3d 1^3.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        dims, depths, mlp_ratios: per encoder stage of the global network; the local networks use the first
            ``local_stages`` entries.
        local_splits: cubes per axis.

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` logits; every side a multiple of 32
    (for four stages and 2 splits per axis).
    """

    def __init__(self, in_channels: int, out_channels: int, dims: Sequence[int], depths: Sequence[int],
                 mlp_ratios: Sequence[int], local_stages: int = 2,
                 local_splits: Tuple[int, int, int] = (2, 2, 2)) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.local_splits = tuple(local_splits)
        self.num_local = int(torch.tensor(self.local_splits).prod())
        global_multiple = 2 ** (len(dims) + 1)
        local_multiple = [s * 2 ** (local_stages + 1) for s in self.local_splits]
        self.size_multiples = [max(global_multiple, m) for m in local_multiple]
        self.local_config = dict(in_channels=in_channels, out_channels=out_channels, dims=tuple(dims[:local_stages]),
                                 depths=tuple(depths[:local_stages]), mlp_ratios=tuple(mlp_ratios[:local_stages]))
        self.global_net = ULKASubNet(in_channels, out_channels, dims, depths, mlp_ratios)
        self.local_nets = ULKASubNet(groups=self.num_local, **self.local_config)
        self.fusion = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.GELU(),
            nn.Conv3d(out_channels, out_channels, 1),
        )

    def check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_channels, max(self.size_multiples), "LoGoNet")

    def local_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The eight local networks in one call: ``(B, C, D, H, W) -> (B, out, D, H, W)``."""
        return stitch_cubes(self.local_nets(split_into_cubes(x, self.local_splits)), self.local_splits)

    def local_branch_loop(self, x: torch.Tensor, networks: Sequence[nn.Module]) -> torch.Tensor:
        """Reference path: the local networks one by one (``networks`` from :meth:`unpacked_local_networks`)."""
        cubes = split_into_cubes(x, self.local_splits).chunk(self.num_local, dim=1)
        outputs = [net(cube.contiguous()) for net, cube in zip(networks, cubes)]
        return stitch_cubes(torch.cat(outputs, dim=1), self.local_splits)

    def unpacked_local_networks(self) -> List[ULKASubNet]:
        """Eight ordinary (``groups=1``) networks holding copies of the packed weights, in cube order."""
        networks = []
        state = self.local_nets.state_dict()
        for k in range(self.num_local):
            net = ULKASubNet(groups=1, **self.local_config)
            # Every packed tensor stacks the networks along dim 0 (conv out-channels, BN/LN/scale channels).
            net.load_state_dict({name: t if t.dim() == 0 else t.chunk(self.num_local, dim=0)[k].clone()
                                 for name, t in state.items()})
            networks.append(net.to(next(self.parameters()).device).train(self.training))
        return networks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.fusion(self.global_net(x) + self.local_branch(x))
