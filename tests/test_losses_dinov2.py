"""DINOv2-family losses: Sinkhorn-Knopp, DINO cross-entropy on given targets, iBOT patch loss,
KoLeo and SimDINOv2's cosine patch loss, each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslcli.losses import (cosine_patch_loss, dino_cross_entropy, dino_loss, ibot_patch_loss, koleo_loss,
                           sinkhorn_knopp, sinkhorn_knopp_reduced)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_sinkhorn_rows_sum_to_one_and_columns_to_n_over_k():
    logits = randn(12, 4)
    q = sinkhorn_knopp(logits, temp=1.0, iterations=3)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-6)
    imbalance = (q.sum(0) - 3.0).abs().max()  # 3 iterations: far more balanced than a softmax
    assert imbalance < 0.5 * (F.softmax(logits, -1).sum(0) - 3.0).abs().max()
    q = sinkhorn_knopp(logits, temp=1.0, iterations=200)
    assert torch.allclose(q.sum(0), torch.full((4,), 3.0), atol=1e-4)  # converged: exactly balanced


def test_sinkhorn_by_hand_one_iteration():
    logits = randn(3, 2)
    q = torch.exp(logits).T
    q = q / q.sum()
    q = q / q.sum(1, keepdim=True) / 2
    q = q / q.sum(0, keepdim=True) / 3
    assert torch.allclose(sinkhorn_knopp(logits, 1.0, iterations=1), (q * 3).T, atol=1e-6)


def test_sinkhorn_over_split_rows_equals_one_process():
    """Two 'processes' holding halves of the rows, reducing sums in lockstep, give the same rows."""
    logits = randn(10, 5)
    halves = [logits[:4], logits[4:]]
    # lockstep simulation: each reduction sums the same statistic computed on both halves
    def run(iterations):
        qs = [torch.exp(h / 0.5).T for h in halves]
        total = sum(q.sum() for q in qs)
        qs = [q / total for q in qs]
        for _ in range(iterations):
            rows = sum(q.sum(1, keepdim=True) for q in qs)
            qs = [q / rows / 5 for q in qs]
            qs = [q / q.sum(0, keepdim=True) / 10 for q in qs]
        return torch.cat([(q * 10).T for q in qs])
    assert torch.allclose(run(3), sinkhorn_knopp(logits, 0.5), atol=1e-6)
    # and the reduced entry point with an identity reduction is the one-process function
    assert torch.equal(sinkhorn_knopp_reduced(logits, 0.5, 3, 10, lambda t: t), sinkhorn_knopp(logits, 0.5))


def test_dino_cross_entropy_is_dino_loss_on_given_targets():
    student = [randn(4, 6, seed=s) for s in range(4)]
    teacher = [randn(4, 6, seed=10 + s) for s in range(2)]
    probs = [F.softmax(t / 0.04, dim=-1) for t in teacher]
    expected = dino_loss(student, teacher, torch.zeros(1, 6), 0.1, 0.04)
    assert dino_cross_entropy(student, probs, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    # by hand: pairs (0,1) (0,2) (0,3) (1,0) (1,2) (1,3)
    pairs = [(a, v) for a in range(2) for v in range(4) if v != a]
    ce = [-(probs[a] * F.log_softmax(student[v] / 0.1, -1)).sum(-1).mean() for a, v in pairs]
    assert expected.item() == pytest.approx(torch.stack(ce).mean().item(), rel=1e-6)


def test_ibot_patch_loss_by_hand_with_an_unmasked_crop_counted():
    masks = torch.tensor([[True, False, True, False], [False, False, False, False]])  # crop 2: no mask
    student, teacher = randn(2, 3, seed=1), F.softmax(randn(2, 3, seed=2), -1)
    ce = -(teacher * F.log_softmax(student / 0.1, -1)).sum(-1)  # (2,) the two masked patches of crop 1
    expected = (ce[0] + ce[1]) / 2 / 2  # crop 1: mean over its 2 patches; G = 2 crops
    assert ibot_patch_loss(student, teacher, masks, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ibot_rows_follow_row_major_mask_order():
    masks = torch.tensor([[False, True, False], [True, False, True]])  # crop 1: 1 patch; crop 2: 2 patches
    student, teacher = randn(3, 4, seed=3), F.softmax(randn(3, 4, seed=4), -1)
    ce = -(teacher * F.log_softmax(student / 0.1, -1)).sum(-1)
    expected = (ce[0] / 1 + (ce[1] + ce[2]) / 2) / 2
    assert ibot_patch_loss(student, teacher, masks, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_koleo_on_the_square_and_on_a_close_pair():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 5  # norms do not matter
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    close = torch.tensor([[1.0, 0.0], [math.cos(0.01), math.sin(0.01)], [-1.0, 0.0]])
    # points 0 and 1 are each other's neighbour at chord 2 sin(0.005); point 2's is 1 (chord ~2)
    chord = 2 * math.sin(0.005)
    far = math.dist((-1.0, 0.0), (math.cos(0.01), math.sin(0.01)))
    expected = -(2 * math.log(chord) + math.log(far)) / 3
    assert koleo_loss(close).item() == pytest.approx(expected, rel=1e-3)


def test_cosine_patch_loss_by_hand():
    student, teacher = randn(2, 3, 4, seed=5), randn(2, 3, 4, seed=6)
    masks = torch.tensor([[True, True, False], [False, False, False]])
    cos = F.cosine_similarity(student, teacher, dim=-1)
    expected = -((cos[0, 0] + cos[0, 1]) / 2 + 0) / 2
    assert cosine_patch_loss(student, teacher, masks).item() == pytest.approx(expected.item(), rel=1e-6)
    student.requires_grad_()
    cosine_patch_loss(student, teacher, masks).backward()
    assert student.grad[0, 2].abs().sum() == 0 and student.grad[1].abs().sum() == 0  # unmasked: no gradient
