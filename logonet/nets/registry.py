"""``build_model(name, ...)``: LoGoNet, ULKANet and the paper's MONAI baselines under one call (timm-style registry).

Each entry carries what its callers must know about it (:class:`ModelInfo`): whether it takes a size preset,
whether it is built for one fixed input size (``img_size``) and the multiple its input sides must be, so the
training commands and the benchmarks hold no lists of model names of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layers import check_input
from .logonet import LoGoNet
from .presets import DEFAULT_PRESET, get_preset
from .ulkanet import ULKANet

Builder = Callable[..., nn.Module]
SizeSpec = Union[int, Sequence[int]]


@dataclass(frozen=True)
class ModelInfo:
    """A registered network and the facts about it that callers need."""

    name: str
    builder: Builder
    #: accepts ``preset`` (T/S/L); the baselines ignore it and their cards record none
    takes_preset: bool = False
    #: built for one input size: the constructor needs ``img_size`` (the training crop)
    fixed_input_size: bool = False
    #: every input side must be a multiple of this
    size_multiple: int = 32

    def preset_for(self, preset: Optional[str]) -> Optional[str]:
        """The preset to build and record: ``preset`` for the ULKA family, None for the others."""
        return preset if self.takes_preset else None

    def size_kwargs(self, size: SizeSpec) -> Dict[str, Any]:
        """Constructor arguments that fix the input size (``{"img_size": [x, y, z]}``), or ``{}``."""
        return {"img_size": list(_size3(size))} if self.fixed_input_size else {}


_REGISTRY: Dict[str, ModelInfo] = {}


def register(name: str, *, takes_preset: bool = False, fixed_input_size: bool = False,
             size_multiple: int = 32) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        _REGISTRY[name] = ModelInfo(name, builder, takes_preset, fixed_input_size, size_multiple)
        return builder

    return decorator


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name`` (case-insensitive); ValueError naming the choices when unknown."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[key]


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"logonet:T"`` -> ``("logonet", "T")``; ``"swinunetr"`` -> ``("swinunetr", None)``."""
    name, _, preset = spec.partition(":")
    return name, preset or None


def available_models() -> List[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def build_model(name: str, *, in_channels: int = 1, out_channels: int, preset: Optional[str] = None,
                **kwargs: Any) -> nn.Module:
    """Build a segmentation network ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` logits.

    Args:
        name: one of :func:`available_models`.
        in_channels: image channels.
        out_channels: classes, background included (or feature width, for pre-training backbones).
        preset: ``T``/``S``/``L`` for LoGoNet and ULKANet (default ``S``); ignored by the baselines.
        kwargs: passed to the constructor (e.g. ``img_size`` for UNETR/SegResNetVAE, ``feature_size``).
    """
    return model_info(name).builder(in_channels=in_channels, out_channels=out_channels, preset=preset, **kwargs)


@register("logonet", takes_preset=True)
def _logonet(in_channels: int, out_channels: int, preset: Optional[str], **kwargs: Any) -> nn.Module:
    p = get_preset(preset or DEFAULT_PRESET)
    return LoGoNet(in_channels, out_channels, p.dims, p.depths, p.mlp_ratios, local_stages=p.local_stages, **kwargs)


@register("ulkanet", takes_preset=True)
def _ulkanet(in_channels: int, out_channels: int, preset: Optional[str], **kwargs: Any) -> nn.Module:
    p = get_preset(preset or DEFAULT_PRESET)
    return ULKANet(in_channels, out_channels, p.dims, p.depths, p.mlp_ratios, **kwargs)


class BaselineWrapper(nn.Module):
    """Gives a MONAI network the registry's contract: input checked with a clear ``ValueError`` and one logits
    tensor out (SegResNetVAE returns ``(logits, vae_loss)``, UNet++ a list)."""

    def __init__(self, net: nn.Module, name: str, in_channels: int, multiple: int = 32,
                 fixed_size: Optional[Tuple[int, int, int]] = None) -> None:
        super().__init__()
        self.net, self.name, self.in_channels = net, name, in_channels
        self.multiple, self.fixed_size = multiple, fixed_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.multiple, self.name)
        if self.fixed_size is not None and tuple(x.shape[2:]) != self.fixed_size:
            raise ValueError(f"{self.name} was built for inputs of size {self.fixed_size} (img_size); "
                             f"got {tuple(x.shape[2:])}: rebuild it with img_size={tuple(x.shape[2:])}")
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


def _size3(size: SizeSpec) -> Tuple[int, int, int]:
    return (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)  # type: ignore[return-value]


@register("swinunetr")
def _swinunetr(in_channels: int, out_channels: int, preset: Optional[str], feature_size: int = 48,
               **kwargs: Any) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, **kwargs)
    return BaselineWrapper(net, "SwinUNETR", in_channels)


@register("unetr", fixed_input_size=True, size_multiple=16)
def _unetr(in_channels: int, out_channels: int, preset: Optional[str], feature_size: int = 32,
           img_size: SizeSpec = 96, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import UNETR

    size = _size3(img_size)
    net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=size, feature_size=feature_size,
                **kwargs)
    return BaselineWrapper(net, "UNETR", in_channels, multiple=16, fixed_size=size)


@register("segresnetvae", fixed_input_size=True, size_multiple=8)
def _segresnetvae(in_channels: int, out_channels: int, preset: Optional[str], img_size: SizeSpec = 96,
                  **kwargs: Any) -> nn.Module:
    from monai.networks.nets import SegResNetVAE

    size = _size3(img_size)
    net = SegResNetVAE(input_image_size=size, in_channels=in_channels, out_channels=out_channels, **kwargs)
    return BaselineWrapper(net, "SegResNetVAE", in_channels, multiple=8, fixed_size=size)


@register("dynunet")
def _dynunet(in_channels: int, out_channels: int, preset: Optional[str], **kwargs: Any) -> nn.Module:
    """nnU-Net-style 3-D full-resolution U-Net: 6 levels, 3^3 kernels, filters capped at 320."""
    from monai.networks.nets import DynUNet

    net = DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, kernel_size=[3] * 6,
                  strides=[1, 2, 2, 2, 2, 2], upsample_kernel_size=[2] * 5, filters=[32, 64, 128, 256, 320, 320],
                  norm_name=("INSTANCE", {"affine": True}), deep_supervision=False, **kwargs)
    return BaselineWrapper(net, "DynUNet", in_channels)


@register("unetplusplus", size_multiple=16)
def _unetplusplus(in_channels: int, out_channels: int, preset: Optional[str], **kwargs: Any) -> nn.Module:
    from monai.networks.nets import BasicUNetPlusPlus

    net = BasicUNetPlusPlus(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs)
    return BaselineWrapper(net, "UNet++", in_channels, multiple=16)


@register("attentionunet", size_multiple=16)
def _attentionunet(in_channels: int, out_channels: int, preset: Optional[str], **kwargs: Any) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    kwargs.setdefault("channels", (32, 64, 128, 256, 512))
    kwargs.setdefault("strides", (2, 2, 2, 2))
    net = AttentionUnet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs)
    return BaselineWrapper(net, "AttentionUnet", in_channels, multiple=16)
