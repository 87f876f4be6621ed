"""Pre-training head shapes/masking and the loss of Eq. 4-5 against a hand-computed case."""
from __future__ import annotations

import math

import pytest
import torch

from logonet.nets.pretrain_head import PretrainHead
from logonet.ssl.loss import masked_cluster_loss


def _nll(row, target, tau):
    """-log softmax(row / tau)[target], written out."""
    exps = [math.exp(v / tau) for v in row if v != float("-inf")]
    return -(row[target] / tau - math.log(sum(exps)))


LOGITS = torch.tensor([[  # B=1, S=3, N=2, K=3; clusterer 1 has K=2 (third logit -inf)
    [[1.0, 0.0, -1.0], [0.5, 0.2, float("-inf")]],
    [[9.0, 9.0, 9.0], [9.0, -9.0, float("-inf")]],  # unmasked slice: must not count, whatever its values
    [[0.1, 0.3, 0.2], [-0.4, 0.4, float("-inf")]],
]])
TARGETS = torch.tensor([[[0, 1], [2, 1], [2, 0]]])
MASK = torch.tensor([[True, False, True]])


@pytest.mark.parametrize("tau", [0.1, 1.0, 2.5])
def test_loss_matches_hand_computation_on_masked_slices_only(tau):
    loss, metrics = masked_cluster_loss(LOGITS, TARGETS, MASK, tau=tau)
    rows = [([1.0, 0.0, -1.0], 0), ([0.5, 0.2, float("-inf")], 1), ([0.1, 0.3, 0.2], 2), ([-0.4, 0.4, float("-inf")], 0)]
    expected = sum(_nll(r, t, tau) for r, t in rows) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["masked_slices"] == 2
    assert metrics["cluster_acc"] == pytest.approx(1 / 4)  # only the first row's arg-max is its target
    # Changing the unmasked slice changes nothing.
    other = LOGITS.clone()
    other[0, 1] = torch.tensor([[-5.0, 3.0, 1.0], [2.0, 1.0, float("-inf")]])
    assert masked_cluster_loss(other, TARGETS, MASK, tau=tau)[0].item() == pytest.approx(loss.item())


def test_temperature_sharpens_as_eq5():
    # A correct, confident prediction: lower tau -> lower loss; a wrong one: lower tau -> higher loss.
    right = torch.tensor([[[[2.0, 0.0, 0.0]]]])
    wrong_target, right_target, mask = torch.tensor([[[1]]]), torch.tensor([[[0]]]), torch.tensor([[True]])
    losses_right = [masked_cluster_loss(right, right_target, mask, tau=t)[0].item() for t in (0.1, 1.0, 10.0)]
    losses_wrong = [masked_cluster_loss(right, wrong_target, mask, tau=t)[0].item() for t in (0.1, 1.0, 10.0)]
    assert losses_right[0] < losses_right[1] < losses_right[2] < math.log(3)
    assert losses_wrong[0] > losses_wrong[1] > losses_wrong[2] > math.log(3)
    # tau scales logits exactly: tau=2 on 2x logits equals tau=1.
    a = masked_cluster_loss(LOGITS * 2, TARGETS, MASK, tau=2.0)[0]
    b = masked_cluster_loss(LOGITS, TARGETS, MASK, tau=1.0)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_no_masked_slice_gives_zero_with_graph():
    logits = torch.randn(2, 4, 2, 3, requires_grad=True)
    loss, _ = masked_cluster_loss(logits, torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("axis", [0, 2])
def test_head_shapes_invalid_ids_and_gradients(axis):
    head = PretrainHead(in_channels=8, ks=[3, 5, 2], slice_axis=axis)
    features = torch.randn(2, 8, 12, 10, 6, requires_grad=True)
    # Zero-initialised projection: every clusterer starts from uniform predictions over its own K_n.
    start = head(features)
    assert torch.equal(start[:, :, 1], torch.zeros_like(start[:, :, 1]))
    torch.nn.init.normal_(head.proj.weight)  # a trained head, so that gradients reach the features
    logits = head(features)
    slices = features.shape[2 + axis]
    assert logits.shape == (2, slices, 3, 5)
    assert torch.isinf(logits[:, :, 0, 3:]).all() and torch.isinf(logits[:, :, 2, 2:]).all()
    assert torch.isfinite(logits[:, :, 1]).all() and torch.isfinite(logits[:, :, 0, :3]).all()
    mask = torch.zeros(2, slices, dtype=torch.bool)
    mask[:, 1] = True
    loss, _ = masked_cluster_loss(logits, torch.ones(2, slices, 3, dtype=torch.long), mask)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    # Only learnt tensors are saved (the -inf mask is derived from ks).
    assert sorted(head.state_dict()) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
