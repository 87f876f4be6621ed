"""Large-kernel attention in 3-D (LKA3D) and the LKA block of ULKANet (paper Algorithm 2)."""
from __future__ import annotations

import torch
from torch import nn

from .layers import DilatedDepthwiseConv3d, PackedConv3d


class LKA3D(nn.Module):
    """3-D large kernel attention: a ~21^3 receptive field from three cheap convolutions.

    ``BN -> depth-wise 5^3 -> depth-wise 7^3 dilation 3 -> 1^3 conv`` gives an attention map that multiplies the
    input element-wise. Shapes: ``(B, g*dim, D, H, W) -> (B, g*dim, D, H, W)``.
    """

    def __init__(self, dim: int, groups: int = 1) -> None:
        super().__init__()
        channels = groups * dim
        self.norm = nn.BatchNorm3d(channels)
        self.conv_spatial_local = nn.Conv3d(channels, channels, 5, padding=2, groups=channels)
        self.conv_spatial_dilated = DilatedDepthwiseConv3d(channels, 7, dilation=3)
        self.conv_channel = PackedConv3d(channels, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.conv_channel(self.conv_spatial_dilated(self.conv_spatial_local(self.norm(x))))
        return x * attention


class LKAAttention(nn.Module):
    """Attention sub-block: ``1^3 conv -> GELU -> LKA -> 1^3 conv``, plus its own shortcut (as in VAN)."""

    def __init__(self, dim: int, groups: int = 1) -> None:
        super().__init__()
        channels = groups * dim
        self.proj_in = PackedConv3d(channels, channels, 1, groups=groups)
        self.act = nn.GELU()
        self.lka = LKA3D(dim, groups)
        self.proj_out = PackedConv3d(channels, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.lka(self.act(self.proj_in(x)))) + x


class ConvMLP(nn.Module):
    """``1^3 conv (dim -> ratio*dim) -> depth-wise 3^3 -> GELU -> 1^3 conv back``; no dropout."""

    def __init__(self, dim: int, mlp_ratio: int, groups: int = 1) -> None:
        super().__init__()
        hidden = groups * dim * mlp_ratio
        self.fc_in = PackedConv3d(groups * dim, hidden, 1, groups=groups)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc_out = PackedConv3d(hidden, groups * dim, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.dwconv(self.fc_in(x))))


class LKABlock(nn.Module):
    """Pre-norm residual block of the paper's Algorithm 2, with VAN's layer scale (init 1e-2)::

        x = x + s1 * Attn(BN(x))
        x = x + s2 * MLP(BN(x))

    (The authors' development code adds each branch to its own output instead of to ``x``; we follow the paper.)
    Shapes: ``(B, g*dim, D, H, W) -> same``.
    """

    def __init__(self, dim: int, mlp_ratio: int, groups: int = 1, layer_scale_init: float = 1e-2) -> None:
        super().__init__()
        channels = groups * dim
        self.norm_attn = nn.BatchNorm3d(channels)
        self.attn = LKAAttention(dim, groups)
        self.norm_mlp = nn.BatchNorm3d(channels)
        self.mlp = ConvMLP(dim, mlp_ratio, groups)
        self.layer_scale_attn = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.layer_scale_mlp = nn.Parameter(torch.full((channels,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_attn.view(1, -1, 1, 1, 1) * self.attn(self.norm_attn(x))
        return x + self.layer_scale_mlp.view(1, -1, 1, 1, 1) * self.mlp(self.norm_mlp(x))
