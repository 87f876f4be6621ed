"""Building blocks shared by ULKANet and LoGoNet, written for *packed* sub-networks.

Every block takes ``groups``: the number of independent networks whose channels are packed side by side
(network ``g`` owns channels ``[g*c, (g+1)*c)``). Convolutions use ``groups`` (depth-wise ones
``groups * channels``), BatchNorm is per channel anyway, and the channel LayerNorm normalises each network's
slice separately. With ``groups=1`` these are ordinary layers; with ``groups=8`` one call runs LoGoNet's eight
local ULKANets at once, with exactly the maths of eight separate networks (see ``logonet.nets.logonet``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def check_input(x: torch.Tensor, in_channels: int, multiple: int, name: str) -> None:
    """Raise a ``ValueError`` that says what is accepted when ``x`` is not ``(B, in_channels, D, H, W)`` with
    every side a multiple of ``multiple``."""
    if x.dim() != 5:
        raise ValueError(f"{name} expects a 5-D tensor (batch, {in_channels}, D, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    bad = [s for s in x.shape[2:] if s % multiple or s == 0]
    if bad:
        raise ValueError(
            f"{name} accepts spatial sizes that are multiples of {multiple} (e.g. 64, 96, 128); "
            f"got {tuple(x.shape[2:])}"
        )


class PackedConv3d(nn.Conv3d):
    """A grouped Conv3d over packed networks that stays on oneDNN's fast path on the CPU.

    oneDNN's grouped 3-D convolution is fast when each group's input and output channels are multiples of 8,
    and up to 10x slower otherwise (e.g. 96 -> 14 classes in the heads). On the CPU we therefore zero-pad
    each group's channels to a multiple of 8 for the call (except a single input channel, which is faster
    as it is) and drop the padded outputs:
    the zero weights add exact zeros, so the result is the same maths; parameters keep their plain shape.
    """

    ALIGN = 8
    #: Feature maps of at most this many voxels are convolved in float32 on the CPU, autocast or not: oneDNN's
    #: bfloat16 weight gradient for 2x2x2 maps (a 64^3 crop's bottleneck) sporadically returns 1e30 or inf
    #: (PyTorch 2.13), and at this size float32 costs nothing.
    TINY_MAP = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x[0, 0].numel() <= self.TINY_MAP and self.weight.dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                return self._packed_forward(x.float())
        return self._packed_forward(x)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.groups
        cin, cout = self.in_channels // groups, self.out_channels // groups
        aligned = cin % self.ALIGN == 0 and cout % self.ALIGN == 0
        # Traced (fvcore's counter, exports): the plain conv, so counts show the maths, not the padding.
        if groups == 1 or x.device.type != "cpu" or aligned or torch.jit.is_tracing():
            return super().forward(x)
        # One input channel per group (the raw image) is cheaper unpadded: padding would multiply its work by 8.
        cin_p = cin if cin == 1 else -(-cin // self.ALIGN) * self.ALIGN
        cout_p = -(-cout // self.ALIGN) * self.ALIGN
        batch, spatial, kernel = x.shape[0], x.shape[2:], self.weight.shape[2:]
        weight = F.pad(self.weight.reshape(groups, cout, cin, *kernel), (0, 0) * 3 + (0, cin_p - cin, 0, cout_p - cout))
        bias = None
        if self.bias is not None:
            bias = F.pad(self.bias.reshape(groups, cout), (0, cout_p - cout)).reshape(-1)
        if cin_p != cin:
            x = F.pad(x.reshape(batch, groups, cin, *spatial), (0, 0) * 3 + (0, cin_p - cin))
            x = x.reshape(batch, groups * cin_p, *spatial)
        y = F.conv3d(x, weight.reshape(groups * cout_p, cin_p, *kernel), bias, self.stride, self.padding,
                     self.dilation, groups)
        if cout_p == cout:
            return y
        return y.reshape(batch, groups, cout_p, *y.shape[2:])[:, :, :cout].reshape(batch, groups * cout, *y.shape[2:])


class DilatedDepthwiseConv3d(nn.Conv3d):
    """A depth-wise, dilated, "same"-padded 3-D convolution (LKA's 7^3 at dilation 3) that is fast on the CPU.

    oneDNN runs a dilated depth-wise 3-D convolution about 20x slower than an undilated one of the same work
    (64 channels at 24^3, 1 thread: 0.199 s against 0.0085 s). With dilation ``d``, output voxel ``i`` only reads
    inputs ``i + d*t``, all of them in ``i``'s phase (``i mod d`` per axis). So on the CPU the map is cut into its
    ``d^3`` phase grids (stacked along the batch), each is convolved undilated with the same kernel, and the
    results are interleaved back: the same sum over the same terms. Sides are zero-padded to a multiple of ``d``
    first (the convolution's own zero padding) and cropped after. Only where no gradient is wanted (inference,
    validation): the undilated convolution's backward over 27 small grids is 1.2-7x slower than the dilated one's,
    so training keeps the plain convolution (a LoGoNet-T 64^3 training step was 13% slower with the phases).
    Elsewhere (CUDA, traced exports, FLOP counts) it is the plain convolution too; parameters are those of
    ``nn.Conv3d``. Shapes: ``(B, C, D, H, W) -> same``.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__(channels, channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                         groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if wants_grad or x.device.type != "cpu" or torch.jit.is_tracing() or self.dilation[0] == 1:
            return super().forward(x)
        d, half = self.dilation[0], self.kernel_size[0] // 2
        batch, channels, size = x.shape[0], x.shape[1], list(x.shape[2:])
        padded = [-(-n // d) * d for n in size]
        if padded != size:
            x = F.pad(x, (0, padded[2] - size[2], 0, padded[1] - size[1], 0, padded[0] - size[0]))
        grid = [n // d for n in padded]
        phases = x.reshape(batch, channels, grid[0], d, grid[1], d, grid[2], d).permute(0, 3, 5, 7, 1, 2, 4, 6)
        y = F.conv3d(phases.reshape(batch * d ** 3, channels, *grid), self.weight, self.bias, padding=half,
                     groups=channels)
        y = y.reshape(batch, d, d, d, channels, *grid).permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(batch, channels, *padded)
        return y if padded == size else y[:, :, :size[0], :size[1], :size[2]].contiguous()


def pack_channels(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate packed maps network by network: ``[(B, g*c_i, ...)] -> (B, g*sum(c_i), ...)``."""
    batch, spatial = tensors[0].shape[0], tensors[0].shape[2:]
    per_group = [t.reshape(batch, groups, t.shape[1] // groups, *spatial) for t in tensors]
    return torch.cat(per_group, dim=2).reshape(batch, -1, *spatial)


class ConvModule(nn.Sequential):
    """The decoder's "conv module": Conv3d 3^3 (bias) -> BatchNorm3d -> LeakyReLU, ``(B, g*cin, ...) -> (B, g*cout, ...)``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__(
            PackedConv3d(groups * in_channels, groups * out_channels, 3, padding=1, groups=groups),
            nn.BatchNorm3d(groups * out_channels),
            nn.LeakyReLU(inplace=True),
        )


def conv_pair(in_channels: int, out_channels: int, groups: int = 1) -> nn.Sequential:
    """Two conv modules, ``cin -> cout -> cout``: the decoder's basic unit."""
    return nn.Sequential(ConvModule(in_channels, out_channels, groups), ConvModule(out_channels, out_channels, groups))


class Upsample(nn.Module):
    """Trilinear x2 (the decoder has no transposed convolutions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of ``(B, g*C, D, H, W)``, separately for each of the ``g`` packed networks."""

    def __init__(self, channels: int, groups: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels, self.groups, self.eps = channels, groups, eps
        self.weight = nn.Parameter(torch.ones(groups * channels))
        self.bias = nn.Parameter(torch.zeros(groups * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, spatial = x.shape[0], x.shape[2:]
        grouped = x.reshape(batch, self.groups, self.channels, *spatial)
        mean = grouped.mean(dim=2, keepdim=True)
        var = grouped.var(dim=2, unbiased=False, keepdim=True)
        normed = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * len(spatial)
        return normed * self.weight.view(shape) + self.bias.view(shape)
