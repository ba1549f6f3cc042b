"""Pure loss functions: tensors in, tensor out. Each names its paper and equation.

Computed in fp32 whatever the autocast dtype, since softmax over 65536 prototypes at
temperature 0.04 loses too much in bf16, and a Cholesky factorisation needs fp32.
Single process: nothing here communicates; methods that need a global statistic (SimDINO's
Gram matrix) reduce it themselves and call the building block that takes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function


def dino_loss(student_logits: list[Tensor], teacher_logits: list[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float) -> Tensor:
    """DINO cross-entropy (Caron et al. 2021, Eq. 3 and Algorithm 1).

    student_logits: one [B, K] tensor per student view (the global views first, in the teacher's
    order, then the local views). teacher_logits: one [B, K] tensor per global view. center: [1, K].
    For every pair (teacher global view a, student view v != a): mean over the batch of
    -sum_k q_a log p_v, with q_a = softmax((t_a - c) / teacher_temp) (no gradient) and
    p_v = softmax(s_v / student_temp); averaged over the 2 * n_views - 2 pairs.
    """
    targets = [F.softmax((t.float() - center.float()) / teacher_temp, dim=-1) for t in teacher_logits]
    return dino_cross_entropy(student_logits, targets, student_temp)


def dino_cross_entropy(student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float) -> Tensor:
    """Mean over the pairs (teacher view a, student view v != a) of the batch-mean cross-entropy
    -sum_k q_a log softmax(s_v / student_temp) (DINO's Eq. 3; DINOv2's CLS loss).

    student_logits: [B, K] per student view (global views first, in the teacher's order);
    teacher_probs: [B, K] targets per global view (no gradient flows into them).
    """
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    return pairwise_cross_entropy(log_probs, [q.detach().float() for q in teacher_probs])


def pairwise_cross_entropy(log_probs: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Mean over the pairs (target view a, view v != a) of mean_b -sum_k q_a log p_v.

    log_probs: [B, K] per view (the targets' views first, in their order); targets: [B, K] each.
    """
    terms = [torch.sum(-q * log_p, dim=-1).mean() for a, q in enumerate(targets)
             for v, log_p in enumerate(log_probs) if v != a]
    return torch.stack(terms).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """SimSiam symmetrised negative cosine (Chen & He 2021, Eq. 1-2 and Algorithm 1).

    p1, p2: predictor outputs of views 1 and 2 [B, D]; z1, z2: projector outputs [B, D].
    L = -1/2 * (mean_b cos(p1_b, sg(z2_b)) + mean_b cos(p2_b, sg(z1_b))); sg = stop-gradient, so no
    gradient reaches z1 or z2 through this loss (only through p1, p2). Range [-1, 1].
    """
    def neg_cos(p: Tensor, z: Tensor) -> Tensor:  # [B, D], [B, D] -> scalar (eps 1e-8 as nn.CosineSimilarity)
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()

    return 0.5 * (neg_cos(p1, z2) + neg_cos(p2, z1))


# ----------------------------------------------------------------------------- SimDINO


def coding_rate_of_gram(gram: Tensor, n: int, eps2: float) -> Tensor:
    """R = 1/2 logdet(I_d + d / (n * eps2) * gram) for a Gram matrix gram = Z^T Z [d, d] of n rows.

    Cholesky in fp32: logdet = 2 sum log diag(L). I + c Z^T Z is positive definite for every finite
    Z; when the factorisation still fails (non-finite entries) the result is NaN, never an
    exception, so the training step needs no host sync (the engine's divergence check names it).
    """
    d = gram.shape[-1]
    eye = torch.eye(d, device=gram.device, dtype=torch.float32)
    with torch.autocast(gram.device.type, enabled=False):
        factor, info = torch.linalg.cholesky_ex(eye + (d / (n * eps2)) * gram.float())
        rate = factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # = 1/2 logdet
    return torch.where(info == 0, rate, torch.full_like(rate, float("nan")))


def coding_rate(z: Tensor, eps2: float) -> Tensor:
    """Coding rate of the rows of z [n, d] (Ma et al. 2007; SimDINO, Wu et al. 2025, Eq. 6):
    R(Z) = 1/2 logdet(I_d + d / (n * eps2) Z^T Z), uncentred, fp32. Zero for Z = 0."""
    z = z.float()
    return coding_rate_of_gram(z.T @ z, z.shape[0], eps2)


def simdino_alignment(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Mean cosine between each teacher global view a and each student view v != a.

    student: [B, d] per view (global views first, in the teacher's order); teacher: [B, d] per
    global view. Each pair is averaged over the batch; the mean is over the 2 (2 + L) - 2 pairs.
    """
    total, pairs = student[0].new_zeros((), dtype=torch.float32), 0
    for a, t in enumerate(teacher):
        t = t.detach().float()
        for v, s in enumerate(student):
            if v != a:
                total = total + F.cosine_similarity(s.float(), t, dim=-1).mean()
                pairs += 1
    return total / pairs


def expansion_inputs(student: list[Tensor], teacher: list[Tensor], expansion_input: str = "mean") -> list[Tensor]:
    """Z_a [B, d] per global view a: (s_a + sg(t_a)) / 2 ("mean", the authors' code) or s_a
    ("student", the paper's Eq. 9 and Algorithm 1)."""
    if expansion_input == "mean":
        return [(s.float() + t.detach().float()) / 2 for s, t in zip(student, teacher)]
    if expansion_input == "student":
        return [s.float() for s in student[: len(teacher)]]
    raise ValueError(f"expansion_input must be 'mean' or 'student', got {expansion_input!r}")


def simdino_gamma(n: int, d: int) -> float:
    """The authors' balancing weight of the coding rate: 1/n + 1/d (n rows in the global batch)."""
    return 1.0 / n + 1.0 / d


def simdino_loss(student: list[Tensor], teacher: list[Tensor], eps2: float, gamma: float | None = None,
                 expansion_input: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
    """SimDINO loss (Wu et al. 2025, Eq. 9-10; the authors' MCRLoss), one process.

    student: the L2-normalised head outputs [B, d] of every view (global first, then local);
    teacher: those of the 2 global views (no gradient). Returns (loss, alignment, expansion):
      alignment = simdino_alignment(student, teacher),
      expansion = gamma * mean_a R(Z_a), Z_a = expansion_inputs(...)[a], R = coding_rate(., eps2),
      loss = -alignment - expansion, gamma None -> 1/B + 1/d.
    """
    zs = expansion_inputs(student, teacher, expansion_input)
    n, d = zs[0].shape
    gamma = simdino_gamma(n, d) if gamma is None else gamma
    alignment = simdino_alignment(student, teacher)
    expansion = gamma * torch.stack([coding_rate(z, eps2) for z in zs]).mean()
    return -alignment - expansion, alignment, expansion


# ----------------------------------------------------------------------------- DINOv2 / iBOT


def sinkhorn_knopp_reduced(logits: Tensor, temp: float, iterations: int, total_rows: int | Tensor,
                           all_reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Sinkhorn-Knopp over rows spread across processes; `all_reduce` sums a tensor over them.

    logits: [n, K] this process's rows; total_rows: the rows of all processes together (B).
    Q = exp(logits / temp)^T in fp32 without max-shift (as dinov2), Q /= sum(Q); then
    `iterations` times: each prototype row of Q divided by its all-reduced sum, then by K; each
    sample column by its own sum, then by B. Returns (Q * B)^T: [n, K], every row sums to 1 and,
    over all processes, every column to B / K.
    """
    with torch.autocast(logits.device.type, enabled=False):
        q = torch.exp(logits.float() / temp).T  # (K, n)
        k = q.shape[0]
        q = q / all_reduce(q.sum())
        for _ in range(iterations):
            q = q / all_reduce(q.sum(dim=1, keepdim=True)) / k  # prototypes
            q = q / q.sum(dim=0, keepdim=True) / total_rows  # samples
        return (q * total_rows).T


def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's `sinkhorn_knopp_teacher`), one process.

    logits: [n, K] -> [n, K] assignments whose rows sum to 1 and columns to n / K.
    """
    return sinkhorn_knopp_reduced(logits, temp, iterations, logits.shape[0], lambda t: t)


def ibot_patch_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """iBOT masked-patch cross-entropy as DINOv2 computes it (Zhou et al. 2022, Eq. 2).

    student_logits, teacher_probs: [M, K], one row per masked patch, in the row-major order of
    `masks` [G, N] (G global crops of this process, N patches). Each crop's masked patches are
    averaged (weight 1 / M_i), crops are summed and divided by G, unmasked crops included:
    L = (1 / G) sum_i (1 / M_i) sum_{p masked in i} -sum_k q_p log softmax(s_p / student_temp).
    """
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1)  # (G, 1) masked patches per crop
    weights = (1.0 / counts).expand_as(masks)[masks]  # (M,) 1 / M_i of each masked patch's crop
    ce = torch.sum(-teacher_probs.detach().float() * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)
    return (ce * weights).sum() / masks.shape[0]


def koleo_loss(x: Tensor) -> Tensor:
    """Kozachenko-Leonenko entropy estimator of DINOv2 (Sablayrolles et al. 2019), one process.

    x: [B, D] (DINOv2: the student backbone CLS of one global view). With x^ = normalize(x, eps
    1e-8) and nn(i) = argmax_{j != i} x^_i . x^_j: -mean_i log(||x^_i - x^_nn(i) + 1e-8|| + 1e-8), fp32.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=1e-8)
        dots = x @ x.T  # (B, B)
        dots.fill_diagonal_(-1)  # never its own neighbour
        nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=1e-8)  # ||a - b + eps||
        return -torch.log(distances + 1e-8).mean()


def cosine_patch_loss(student: Tensor, teacher: Tensor, masks: Tensor) -> Tensor:
    """SimDINOv2's patch term: -(1 / G) sum_i mean over the masked patches of crop i of cos(s_p, t_p).

    student, teacher: [G, N, d] patch outputs (teacher without gradient); masks: [G, N] bool. A crop
    without masked patches contributes 0.
    """
    cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)  # (G, N)
    counts = masks.sum(dim=1).clamp_min(1)  # (G,)
    per_crop = (cos * masks).sum(dim=1) / counts
    return -per_crop.sum() / masks.shape[0]


# ----------------------------------------------------------------------------- SOVE


def sove_judges(memory: Tensor, anchors: Tensor, pool: Tensor, k: int, anchor_weight: float = 0.9, *,
                labels: str = "soft") -> tuple[Tensor, Tensor]:
    """The judges of P anchors and their soft labels (Silva et al., SOVE, Sec. 2.2.1, Eq. 1-2).

    memory: [M, d] unit vectors; anchors: [P] memory rows; pool: [M - P] the other rows. The judges
    of anchor p are its k nearest pool entries by cosine (descending), then the anchor itself:
    D [P (k + 1), d] stacks them anchor by anchor. Y [P (k + 1), P]: a judge's weight on its own
    anchor is its cosine to the anchor (labels "soft") or 1 ("onehot"), the anchor's own
    `anchor_weight`; the rest (1 - weight) is spread evenly over the other P - 1 anchors, so every
    row sums to 1. The losses never build Y (P (k + 1) x P is 2.4 GB at P = 8192): they use its
    structure (`_memberships`); this function returns it for inspection and tests.
    """
    judges, own = _judges(memory, anchors, pool, k, anchor_weight, labels)
    n = anchors.shape[0]
    rest = (1 - own.reshape(-1, 1)) / max(n - 1, 1)  # (P (k + 1), 1)
    y = rest.expand(-1, n).clone()
    owner = torch.arange(n, device=memory.device).repeat_interleave(k + 1)
    y[torch.arange(y.shape[0], device=memory.device), owner] = own.reshape(-1)
    return judges, y


def _judges(memory: Tensor, anchors: Tensor, pool: Tensor, k: int, anchor_weight: float, labels: str,
            chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(D [P (k + 1), d], own-anchor weights [P, k + 1]); the search runs `chunk` anchors at a time,
    so memory stays O(chunk x M) instead of O(P x M)."""
    anchor_emb, pool_emb = memory[anchors], memory[pool]  # (P, d), (M - P, d)
    with record_function("sove.judge_search"):  # named for benchmarks/throughput.py --profile
        near, near_cos = [], []
        for a in anchor_emb.split(chunk):
            sims = a @ pool_emb.T  # (chunk, M - P)
            cos, idx = sims.topk(k, dim=1) if k > 0 else (sims[:, :0], anchors.new_zeros(a.shape[0], 0))
            near.append(idx)
            near_cos.append(cos)
        near_idx, cos = torch.cat(near), torch.cat(near_cos)  # (P, k)
    judges = torch.cat([pool_emb[near_idx], anchor_emb[:, None]], dim=1)  # (P, k + 1, d)
    own = cos if labels == "soft" else torch.ones_like(cos)
    own = torch.cat([own, own.new_full((anchors.shape[0], 1), anchor_weight)], dim=1)  # (P, k + 1)
    return judges.reshape(-1, memory.shape[1]), own


def _memberships(u: Tensor, judges: Tensor, own: Tensor, temp: float) -> Tensor:
    """P(u) = softmax(u D^T / temp) Y without building Y: [n, d] -> [n, P] (fp32).

    With A = softmax(u D^T / temp) [n, P (k + 1)] and w = own [P, k + 1] (judges anchor by anchor),
    Y[r, c] = (1 - w_r) / (P - 1) + (w_r - (1 - w_r) / (P - 1)) [c = anchor of r], so
    (A Y)[:, c] = A (1 - w) / (P - 1) + sum over the judges r of anchor c of A[:, r] (w_r - (1 - w_r) / (P - 1)).
    """
    with record_function("sove.soft_labels"):
        p = own.shape[0]
        a = F.softmax(u.float() @ judges.float().T / temp, dim=-1)  # (n, P (k + 1))
        w = own.float().reshape(-1)
        spread = (1 - w) / max(p - 1, 1)  # (P (k + 1),)
        base = a @ spread  # (n,) the mass every anchor receives from every judge
        extra = (a * (w - spread)).reshape(a.shape[0], p, -1).sum(-1)  # (n, P)
        return base[:, None] + extra


def sove_cls_loss(student: list[Tensor], teacher: list[Tensor], memory: Tensor,
                  tasks: list[tuple[Tensor, Tensor]], k: int, student_temp: float, teacher_temp: float,
                  anchor_weight: float = 0.9, *, labels: str = "soft") -> Tensor:
    """SOVE's [CLS] loss (Eq. 2): mean over tasks and over the pairs (teacher global view a,
    student view v != a) of mean_b -sum P_t log P_s, with P from the task's judges and labels.

    student: [B, d] per view (global first); teacher: [B, d] per global view (no gradient);
    memory: [M, d]; tasks: (anchors [P], pool [M - P]) index pairs, one per task.
    """
    total = memory.new_zeros((), dtype=torch.float32)
    for anchors, pool in tasks:
        judges, own = _judges(memory, anchors, pool, k, anchor_weight, labels)
        targets = [_memberships(t.detach(), judges, own, teacher_temp) for t in teacher]
        log_p = [torch.log(_memberships(s, judges, own, student_temp).clamp_min(1e-12)) for s in student]
        total = total + pairwise_cross_entropy(log_p, targets)
    return total / len(tasks)


def sove_patch_loss(student: list[Tensor], teacher: list[Tensor], masks: list[Tensor], memory: Tensor,
                    anchors: Tensor, student_temp: float, teacher_temp: float, anchor_weight: float = 0.9) -> Tensor:
    """SOVE's non-parametric MIM loss (Eq. 4): per global view v, the student's masked patch
    tokens against the teacher's (unmasked input) at the same positions, over K patch anchors
    memory[anchors], each its own only judge (labels anchor_weight on the diagonal,
    (1 - anchor_weight) / (K - 1) elsewhere); per image the mean over its masked patches, the mean
    over the images (an image without masked patches counts 0), then the mean over the views.

    student, teacher: [B, N, d] per global view; masks: [B, N] bool per view; memory: [M, d].
    """
    judges = memory[anchors]  # (K, d): each anchor its own only judge
    own = judges.new_full((anchors.shape[0], 1), anchor_weight)  # anchor_weight on the diagonal of Y
    losses = []
    for s, t, m in zip(student, teacher, masks):
        q = _memberships(t[m].detach(), judges, own, teacher_temp)  # (M_v, K) masked patches, row-major
        log_p = torch.log(_memberships(s[m], judges, own, student_temp).clamp_min(1e-12))
        ce = torch.sum(-q * log_p, dim=-1)  # (M_v,)
        counts = m.sum(dim=1, keepdim=True).clamp_min(1)
        weights = (1.0 / counts).expand_as(m)[m]
        losses.append((ce * weights).sum() / m.shape[0])
    return torch.stack(losses).mean()
