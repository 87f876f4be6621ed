"""Sequence masking: statistics match the settings, unmasked slices are untouched, seeds reproduce."""
from __future__ import annotations

import pytest
import torch

from logonet.errors import UserError
from logonet.ssl.masking import MaskingConfig, mask_crop, slice_mask


def test_share_of_masked_slices_matches_chain_formula():
    phi1, chain = 0.1, 5
    mask = slice_mask(2000, 400, phi1, chain, torch.Generator().manual_seed(1))
    interior = mask[:, : 400 - (chain - 1)].float().mean().item()  # the last M-1 slices have fewer anchors
    assert abs(interior - (1 - (1 - phi1) ** chain)) < 0.01
    # A chain ends at its anchor: the last slice is masked only when it is itself an anchor.
    assert abs(mask[:, -1].float().mean().item() - phi1) < 0.025


def test_chains_are_runs_of_at_least_m_slices():
    mask = slice_mask(16, 200, 0.05, 5, torch.Generator().manual_seed(2))
    for row in mask:
        runs, length = [], 0
        for value in row.tolist() + [False]:
            if value:
                length += 1
            elif length:
                runs.append(length)
                length = 0
        # A run that does not touch the start of the sequence is a full chain of >= M slices.
        starts_at_zero = bool(row[0])
        assert all(r >= 5 for r in (runs[1:] if starts_at_zero else runs))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_zeroed_share_and_untouched_slices(axis):
    config = MaskingConfig(phi1=0.1, chain=5, phi2=0.7, slice_axis=axis)
    crop = torch.rand(32, 1, 48, 40, 32) + 0.5  # strictly positive: a zero means "zeroed by masking"
    masked, smask = mask_crop(crop, config, torch.Generator().manual_seed(3))
    assert masked.shape == crop.shape and smask.dtype == torch.bool
    assert smask.shape == (32, crop.shape[2 + axis])
    seq_in, seq_out = crop.movedim(2 + axis, 2), masked.movedim(2 + axis, 2)
    # Unmasked slices are bit-identical; masked slices only lose voxels (set to 0) and keep the rest.
    assert torch.equal(seq_out.permute(0, 2, 1, 3, 4)[~smask], seq_in.permute(0, 2, 1, 3, 4)[~smask])
    on_masked = seq_out.permute(0, 2, 1, 3, 4)[smask]
    kept = on_masked != 0
    assert torch.equal(on_masked[kept], seq_in.permute(0, 2, 1, 3, 4)[smask][kept])
    assert abs((~kept).float().mean().item() - 0.7) < 0.05


def test_seeded_masks_repeat_and_differ_between_seeds():
    crop = torch.rand(2, 1, 32, 32, 32)
    a = mask_crop(crop, generator=torch.Generator().manual_seed(7))
    b = mask_crop(crop, generator=torch.Generator().manual_seed(7))
    c = mask_crop(crop, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_large_patch_clips_to_slice():
    # Only the 96 size: on a 32x32 slice it is one patch, so each masked slice is all zero or untouched.
    config = MaskingConfig(phi1=0.3, patch_sizes=(96,), slice_axis=2)
    masked, smask = mask_crop(torch.ones(8, 1, 32, 32, 32), config, torch.Generator().manual_seed(4))
    per_slice = masked.movedim(4, 2)[:, 0].flatten(2)  # (B, S, H*W)
    assert torch.all((per_slice == 0).all(-1) | (per_slice == 1).all(-1))
    zeroed = (per_slice == 0).all(-1)
    assert not torch.any(zeroed & ~smask) and zeroed.any()


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError):
        MaskingConfig(phi1=1.5)
    with pytest.raises(UserError):
        MaskingConfig(slice_axis=3)
    with pytest.raises(UserError):
        mask_crop(torch.zeros(1, 32, 32, 32))
