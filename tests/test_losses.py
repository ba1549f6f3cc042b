import math

import torch
import torch.nn.functional as F

from sslcli.losses import dino_loss


def reference_dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, ncrops):
    """DINOLoss.forward of the authors' main_dino.py, transcribed (student/teacher as concatenations)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def test_dino_loss_hand_computed():
    # B = 1, K = 2, two global views, no local views; center c = [0, 0]; temperatures 1.
    # teacher view 0 logits [0, 0] -> q0 = [1/2, 1/2]; teacher view 1 logits [ln 3, 0] -> q1 = [3/4, 1/4]
    # student view 0 logits [0, 0] -> log p0 = [ln 1/2, ln 1/2]; view 1 [ln 3, 0] -> log p1 = [ln 3/4, ln 1/4]
    # pairs (a=0, v=1): -(1/2 ln 3/4 + 1/2 ln 1/4); (a=1, v=0): -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2
    t = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])]
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])]
    expected = (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + math.log(2)) / 2
    got = dino_loss(s, t, torch.zeros(1, 2), student_temp=1.0, teacher_temp=1.0)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_dino_loss_matches_reference_with_local_crops():
    torch.manual_seed(0)
    b, k, views = 4, 32, 6
    student = [torch.randn(b, k) for _ in range(views)]
    teacher = [torch.randn(b, k) for _ in range(2)]
    center = torch.randn(1, k) * 0.1
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    ref = reference_dino_loss(torch.cat(student), torch.cat(teacher), center, 0.1, 0.04, views)
    assert torch.allclose(got, ref, atol=1e-5)


def test_dino_loss_center_and_gradients():
    torch.manual_seed(1)
    student = [torch.randn(3, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(3, 8, requires_grad=True) for _ in range(2)]
    loss = dino_loss(student, teacher, torch.zeros(1, 8), 0.1, 0.04)
    loss.backward()
    assert all(t.grad is None for t in teacher)  # teacher targets are detached
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    shifted = dino_loss(student, teacher, torch.ones(1, 8) * 5.0, 0.1, 0.04)  # a constant centre cancels
    assert torch.allclose(loss, shifted, atol=1e-5)
