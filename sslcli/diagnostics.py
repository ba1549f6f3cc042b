"""Collapse diagnostics on batches of outputs (pure functions, no host syncs).

DINO can collapse two ways (Caron et al. 2021, Sec. 5.3): to a uniform teacher output
(entropy -> log K, centering dominates) or to a one-hot output (entropy -> 0, sharpening
dominates); the student-teacher KL goes to 0 in both. A collapsed embedding has a per-dimension
std of the L2-normalised vectors near 0 (healthy: about 1/sqrt(d)) and an effective rank near 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of rows of probabilities [B, K]."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the batch std of L2-normalised embeddings [B, d]."""
    z = torch.nn.functional.normalize(z.float(), dim=-1)
    return z.std(0).mean()


def effective_rank(z: Tensor) -> Tensor:
    """exp(entropy of normalised singular values) of the centred batch [B, d] (Roy & Vetterli 2007)."""
    z = z.float() - z.float().mean(0, keepdim=True)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def prototype_collapse(record: dict, out_dim: int) -> list[tuple[str, str]]:
    """(kind, message) signals of the two prototype collapses in a metrics record (DINO family).

    uniform: per-image teacher entropy above 0.9 log K with KL ~ 0 (centering dominates);
    onehot: the batch-mean teacher output has entropy < 0.1 nats (sharpening dominates).
    """
    found = []
    entropy = record.get("teacher_entropy")
    if entropy is not None and record.get("kl", 1.0) < 1e-3 and entropy > 0.9 * math.log(out_dim):
        found.append(("uniform", "teacher output is near uniform and KL ~ 0: collapse "
                                 "(centering dominates; lower the teacher temperature?)"))
    marginal = record.get("teacher_marginal_entropy")
    if marginal is not None and marginal < 0.1:  # sharp per image is fine; one prototype for all is not
        found.append(("onehot", "the teacher puts the whole batch on one prototype: collapse "
                                "(sharpening dominates; check centering / temperature)"))
    return found
