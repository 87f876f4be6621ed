"""ULKANet: an encoder of large-kernel-attention stages and a convolutional decoder (paper section 3, appendix A).

``ULKANet`` is the standalone network (its own 1^3 classifier). ``ULKASubNet`` is the variant LoGoNet uses for its
global and local branches: a different head, no classifier, and ``groups`` networks packed in one module.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .layers import ChannelLayerNorm, ConvModule, PackedConv3d, Upsample, check_input, conv_pair, pack_channels
from .lka import LKABlock


class ULKAStage(nn.Module):
    """Patch embedding (Conv3d + BN) -> ``depth`` LKA blocks -> channel LayerNorm."""

    def __init__(self, in_dim: int, dim: int, depth: int, mlp_ratio: int, first: bool, groups: int = 1) -> None:
        super().__init__()
        kernel, stride = (7, 4) if first else (3, 2)
        self.embed = nn.Sequential(
            PackedConv3d(groups * in_dim, groups * dim, kernel, stride=stride, padding=kernel // 2, groups=groups),
            nn.BatchNorm3d(groups * dim),
        )
        self.blocks = nn.Sequential(*[LKABlock(dim, mlp_ratio, groups) for _ in range(depth)])
        self.norm = ChannelLayerNorm(dim, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))


class ULKAEncoder(nn.Module):
    """Stages of stride 4, 2, 2, ...: for a 96^3 crop, S gives 64@24^3, 128@12^3, 256@6^3, 512@3^3."""

    def __init__(self, in_channels: int, dims: Sequence[int], depths: Sequence[int], mlp_ratios: Sequence[int],
                 groups: int = 1) -> None:
        super().__init__()
        in_dims = [in_channels] + list(dims[:-1])
        self.stages = nn.ModuleList(
            ULKAStage(in_dims[i], dims[i], depths[i], mlp_ratios[i], first=(i == 0), groups=groups)
            for i in range(len(dims))
        )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ULKADecoder(nn.Module):
    """Upsampling path from the deepest stage to half the input resolution (Appendix A).

    Each level: two conv modules + trilinear x2; the encoder feature of the same size passes two conv modules,
    is concatenated, and two conv modules merge them. Output: ``(B, g*dims[0]/2, D/2, H/2, W/2)``.
    """

    def __init__(self, dims: Sequence[int], groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        channels = list(reversed(dims)) + [dims[0] // 2]  # c(0)=E, c(i)=E/2^i ... c(n)=dims[0]/2
        n = len(dims)
        self.upsample = nn.ModuleList(
            nn.Sequential(conv_pair(channels[i], channels[i + 1], groups), Upsample()) for i in range(n)
        )
        self.skip = nn.ModuleList(conv_pair(channels[i + 1], channels[i + 1], groups) for i in range(n - 1))
        self.merge = nn.ModuleList(conv_pair(channels[i], channels[i + 1], groups) for i in range(n - 1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        skips = list(reversed(features[:-1]))
        for i, upsample in enumerate(self.upsample):
            x = upsample(x)
            if i < len(skips):
                x = self.merge[i](pack_channels([x, self.skip[i](skips[i])], self.groups))
        return x


def _check_dims(dims: Sequence[int]) -> None:
    if any(b != 2 * a for a, b in zip(dims, dims[1:])) or dims[0] % 2:
        raise ValueError(f"encoder dims must be even and double at every stage, got {tuple(dims)}")


class ULKASubNet(nn.Module):
    """A ULKANet as LoGoNet's branches use it: encoder, decoder, and a head without classifier.

    Head (Appendix A): two conv modules, two more + trilinear x2 to full resolution, concatenation with the
    full-resolution skip of the raw input (``in -> dims[0]/2 -> dims[0]``), two conv modules to ``out_channels``.
    ``groups`` packs that many independent networks. Shapes: ``(B, g*in, D, H, W) -> (B, g*out, D, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, dims: Sequence[int], depths: Sequence[int],
                 mlp_ratios: Sequence[int], groups: int = 1) -> None:
        super().__init__()
        _check_dims(dims)
        self.groups = groups
        half = dims[0] // 2
        self.input_skip = nn.Sequential(ConvModule(in_channels, half, groups), ConvModule(half, dims[0], groups))
        self.encoder = ULKAEncoder(in_channels, dims, depths, mlp_ratios, groups)
        self.decoder = ULKADecoder(dims, groups)
        self.head_refine = conv_pair(half, half, groups)
        self.head_upsample = nn.Sequential(conv_pair(half, half, groups), Upsample())
        self.head_out = conv_pair(half + dims[0], out_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.input_skip(x)
        y = self.head_upsample(self.head_refine(self.decoder(self.encoder(x))))
        return self.head_out(pack_channels([y, skip], self.groups))


class ULKANet(nn.Module):
    """Standalone ULKANet segmentation network (the paper's single-extractor model).

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        dims, depths, mlp_ratios: one entry per encoder stage (see ``logonet.nets.presets``).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` logits; every side a multiple of
    ``2 ** (len(dims) + 1)`` (32 for four stages).
    """

    def __init__(self, in_channels: int, out_channels: int, dims: Sequence[int], depths: Sequence[int],
                 mlp_ratios: Sequence[int]) -> None:
        super().__init__()
        _check_dims(dims)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.size_multiple = 2 ** (len(dims) + 1)
        half = dims[0] // 2
        self.input_skip = nn.Sequential(ConvModule(in_channels, half), ConvModule(half, dims[0]))
        self.encoder = ULKAEncoder(in_channels, dims, depths, mlp_ratios)
        self.decoder = ULKADecoder(dims)
        self.head_refine = conv_pair(half, out_channels)
        self.head_upsample = nn.Sequential(conv_pair(out_channels, out_channels), Upsample())
        self.head_out = conv_pair(out_channels + dims[0], out_channels)
        self.classifier = nn.Conv3d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.size_multiple, "ULKANet")
        skip = self.input_skip(x)
        y = self.head_upsample(self.head_refine(self.decoder(self.encoder(x))))
        return self.classifier(self.head_out(torch.cat([y, skip], dim=1)))
