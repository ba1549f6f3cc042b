"""Pure loss functions: tensors in, tensor out. Each names its paper and equation.

Computed in fp32 whatever the autocast dtype, since softmax over 65536 prototypes at
temperature 0.04 loses too much in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(student_logits: list[Tensor], teacher_logits: list[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float) -> Tensor:
    """DINO cross-entropy (Caron et al. 2021, Eq. 3 and Algorithm 1).

    student_logits: one [B, K] tensor per student view (the global views first, in the teacher's
    order, then the local views). teacher_logits: one [B, K] tensor per global view. center: [1, K].
    For every pair (teacher global view a, student view v != a): mean over the batch of
    -sum_k q_a log p_v, with q_a = softmax((t_a - c) / teacher_temp) (no gradient) and
    p_v = softmax(s_v / student_temp); averaged over the 2 * n_views - 2 pairs.
    """
    targets = [F.softmax((t.float() - center.float()) / teacher_temp, dim=-1).detach() for t in teacher_logits]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for a, q in enumerate(targets):
        for v, log_p in enumerate(log_probs):
            if v == a:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            pairs += 1
    return total / pairs


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """SimSiam symmetrised negative cosine (Chen & He 2021, Eq. 1-2 and Algorithm 1).

    p1, p2: predictor outputs of views 1 and 2 [B, D]; z1, z2: projector outputs [B, D].
    L = -1/2 * (mean_b cos(p1_b, sg(z2_b)) + mean_b cos(p2_b, sg(z1_b))); sg = stop-gradient, so no
    gradient reaches z1 or z2 through this loss (only through p1, p2). Range [-1, 1].
    """
    def neg_cos(p: Tensor, z: Tensor) -> Tensor:  # [B, D], [B, D] -> scalar (eps 1e-8 as nn.CosineSimilarity)
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()

    return 0.5 * (neg_cos(p1, z2) + neg_cos(p2, z1))
