"""The LoGoNet network family: sizes from the paper, batched local branch, every registered model trains."""
from __future__ import annotations

import pytest
import torch

from logonet.nets import available_models, build_model
from logonet.nets.complexity import count_parameters
from logonet.nets.logonet import split_into_cubes, stitch_cubes

PAPER_PARAMS_M = {("ulkanet", "S"): 40.2, ("logonet", "S"): 67.5, ("ulkanet", "L"): 121.2, ("logonet", "L"): 172.5}

# At 32^3 the deepest feature map of a 5-level U-Net is 1^3, on which batch/instance norms cannot train;
# one side of 64 gives it two elements at a quarter of the cost of 64^3.
SMALL = (32, 32, 64)
# Small settings per baseline so forward+backward stays fast on 2 cores (the architectures are unchanged).
SMALL_KWARGS = {"swinunetr": {"feature_size": 12}, "unetr": {"img_size": SMALL, "feature_size": 8, "hidden_size": 96,
                                                               "mlp_dim": 192, "num_heads": 4},
                "segresnetvae": {"img_size": SMALL}, "logonet": {"preset": "T"}, "ulkanet": {"preset": "T"}}


@pytest.mark.parametrize("name,preset", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_the_paper(name: str, preset: str) -> None:
    model = build_model(name, in_channels=1, out_channels=14, preset=preset)
    millions = count_parameters(model) / 1e6
    assert millions == pytest.approx(PAPER_PARAMS_M[(name, preset)], rel=0.015)


def test_registry_lists_every_model() -> None:
    assert set(available_models()) == {"logonet", "ulkanet", "swinunetr", "unetr", "segresnetvae", "dynunet",
                                       "unetplusplus", "attentionunet"}
    with pytest.raises(ValueError, match="unknown model 'vnet'.*logonet"):
        build_model("vnet", out_channels=2)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("logonet", out_channels=2, preset="XXL")


@pytest.mark.parametrize("name", ["logonet", "ulkanet", "swinunetr", "unetr", "segresnetvae", "dynunet",
                                  "unetplusplus", "attentionunet"])
def test_registry_metadata_matches_the_built_network(name: str) -> None:
    """The registry's facts (preset, fixed input size, size multiple) are what the built network enforces."""
    from logonet.nets import model_info, parse_spec

    info = model_info(name.upper())
    assert info.name == name and info.preset_for("T") == ("T" if name in ("logonet", "ulkanet") else None)
    kwargs = info.size_kwargs(32)
    assert kwargs == ({"img_size": [32, 32, 32]} if name in ("unetr", "segresnetvae") else {})
    if name == "swinunetr":
        kwargs["feature_size"] = 12
    net = build_model(name, out_channels=2, preset=info.preset_for("T"), **kwargs)
    built = getattr(net, "multiple", None) or getattr(net, "size_multiple", None) or max(net.size_multiples)
    assert built == info.size_multiple
    assert getattr(net, "fixed_size", None) == ((32, 32, 32) if info.fixed_input_size else None)
    assert parse_spec(f"{name}:T") == (name, "T") and parse_spec(name) == (name, None)
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        model_info("vnet")


def test_cubes_split_and_stitch_are_inverse_and_ordered() -> None:
    x = torch.arange(2 * 3 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 3, 4, 6, 8)
    cubes = split_into_cubes(x, (2, 2, 2))
    assert cubes.shape == (2, 24, 2, 3, 4)
    # cube 5 = (d=1, h=0, w=1): channels 15..17 hold x[:, :, 2:, :3, 4:]
    assert torch.equal(cubes[:, 15:18], x[:, :, 2:, :3, 4:])
    assert torch.equal(stitch_cubes(cubes, (2, 2, 2)), x)


@pytest.mark.parametrize("train_mode", [False, True])
def test_batched_local_branch_equals_the_loop(train_mode: bool) -> None:
    torch.manual_seed(0)
    model = build_model("logonet", out_channels=3, preset="T")
    # Random BN statistics and affine parameters, so eval mode is not the identity everywhere.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    model.train(train_mode)
    x = torch.randn(2, 1, 32, 64, 32)
    networks = model.unpacked_local_networks()
    assert len(networks) == 8 and all(n.groups == 1 for n in networks)
    # the unpacked networks really hold different weights
    assert not torch.equal(networks[0].head_out[1][0].weight, networks[1].head_out[1][0].weight)
    with torch.no_grad():
        batched = model.local_branch(x)
        looped = model.local_branch_loop(x, networks)
    assert batched.shape == (2, 3, 32, 64, 32)
    # Eval mode is the acceptance bound; batch statistics in train mode divide by small variances, which
    # magnifies float32 rounding of the (different) summation orders a little.
    assert (batched - looped).abs().max().item() < (1e-4 if train_mode else 1e-5)


@pytest.mark.parametrize("name", sorted(available_models()))
def test_forward_and_backward_every_model(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, out_channels=3, **SMALL_KWARGS.get(name, {}))
    x = torch.randn(1, 1, *SMALL)
    out = model(x)
    assert out.shape == (1, 3, *SMALL)
    out.float().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5]) and any(g.abs().sum() > 0 for g in grads if g is not None)


@pytest.mark.parametrize("name", ["logonet", "ulkanet", "dynunet"])
def test_bfloat16_autocast_and_channels_last(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, out_channels=2, **SMALL_KWARGS.get(name, {})).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, *SMALL).to(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (1, 2, *SMALL) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    reference = model.eval()(x.contiguous())
    assert torch.isfinite(reference).all()


def test_any_multiple_of_32_works_and_other_sizes_are_refused() -> None:
    model = build_model("logonet", out_channels=2, preset="T").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 64, 96)).shape == (1, 2, 32, 64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 1, 48, 64, 64))
    with pytest.raises(ValueError, match="1 input channel"):
        model(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="5-D"):
        model(torch.randn(1, 32, 32, 32))
    unetr = build_model("unetr", out_channels=2, **SMALL_KWARGS["unetr"])
    with pytest.raises(ValueError, match="img_size"):
        unetr(torch.randn(1, 1, 64, 64, 96))


@pytest.mark.parametrize("cin, cout", [(1, 32), (6, 14), (96, 3)])
def test_packed_conv_pads_for_speed_but_computes_and_counts_the_plain_conv(cin: int, cout: int) -> None:
    from logonet.nets.complexity import count_macs
    from logonet.nets.layers import PackedConv3d

    torch.manual_seed(0)
    conv = PackedConv3d(8 * cin, 8 * cout, 3, padding=1, groups=8)
    x = torch.randn(2, 8 * cin, 6, 5, 4)
    plain = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1, groups=8)
    with torch.no_grad():
        assert (conv(x) - plain).abs().max().item() < 1e-5
    # fvcore traces the module: the count is the real maths (8 groups x cout x cin x 27 per voxel), no padding.
    assert count_macs(conv, size=4, in_channels=8 * cin) == 4 ** 3 * 8 * cout * cin * 27


def test_tiny_feature_maps_are_convolved_in_float32_under_bfloat16_autocast() -> None:
    """oneDNN's bf16 weight gradient at 2x2x2 maps (a 64^3 crop's bottleneck) sporadically returned 1e30/inf
    and wrecked training; maps of <= 64 voxels run in float32, larger ones keep the fast bf16 path."""
    from logonet.nets.layers import PackedConv3d

    torch.manual_seed(0)
    conv = PackedConv3d(32, 32, 3, padding=1)
    tiny = torch.randn(2, 32, 2, 2, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_tiny = conv(tiny)
        out_large = conv(torch.randn(2, 32, 6, 5, 4))
    assert out_tiny.dtype == torch.float32 and out_large.dtype == torch.bfloat16
    plain = torch.nn.functional.conv3d(tiny, conv.weight, conv.bias, padding=1)
    assert (out_tiny - plain).abs().max().item() < 1e-5
    out_tiny.square().sum().backward()
    expected, = torch.autograd.grad(plain.square().sum(), conv.weight)
    assert torch.allclose(conv.weight.grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(12, 6, 9), (8, 7, 5), (2, 3, 1)])
def test_dilated_depthwise_conv_by_phases_equals_the_plain_dilated_conv(size, monkeypatch) -> None:
    """LKA's 7^3 dilation-3 depth-wise convolution runs on the CPU, where no gradient is wanted, as an undilated one
    over the 27 phase grids (20x faster in oneDNN). Same values as nn.Conv3d's dilated convolution (max abs diff
    < 1e-4), also for sides that are not multiples of 3 (zero-padded, cropped) or smaller than the kernel's reach.
    Training takes the plain convolution and its own backward (the phases' backward is slower); a traced export
    and fvcore's count see the plain convolution."""
    from logonet.nets.complexity import count_macs
    from logonet.nets.layers import DilatedDepthwiseConv3d

    torch.manual_seed(0)
    conv = DilatedDepthwiseConv3d(4, 7, dilation=3)
    assert (conv.padding, conv.dilation, conv.groups) == ((9, 9, 9), (3, 3, 3), 4)
    assert tuple(conv.weight.shape) == (4, 1, 7, 7, 7)
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        plain = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=9, dilation=3, groups=4)
        real_conv3d, batches = torch.nn.functional.conv3d, []
        def spy(inp, *args, **kwargs):
            batches.append(inp.shape[0])
            return real_conv3d(inp, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "conv3d", spy)
        out = conv(x)
        monkeypatch.undo()
    assert batches == [2 * 27]  # the phase grids of both cases, stacked along the batch
    assert out.shape == plain.shape == (2, 4, *size) and out.is_contiguous()
    assert (out - plain).abs().max().item() < 1e-4
    trained = conv(x.requires_grad_())
    assert type(trained.grad_fn).__name__ == "ConvolutionBackward0"  # the dilated convolution's own backward
    assert (trained.detach() - plain).abs().max().item() < 1e-4
    traced = torch.jit.trace(conv, torch.randn(1, 4, 6, 6, 6))
    assert "aten::_convolution" in str(traced.graph) and "aten::permute" not in str(traced.graph)
    assert count_macs(conv, size=6, in_channels=4) == 6 ** 3 * 4 * 343
