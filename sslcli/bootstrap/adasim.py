"""AdaSim window distribution and decision (Lebailly et al., "Adaptive Similarity Bootstrapping
for Self-Distillation", Eq. 4-11 and Algorithm 1; spec: methods.md "Neighbour bootstrapping").

For ONE anchor i, with w window slots (one per past epoch) of K recorded neighbours:
- ids:  LongTensor[w, K], neighbour ids of slot s (negative ids, e.g. -1, are padding; ignored).
- sims: Tensor[w, K], the matching cosine similarities.
m_win(j) = (1/w) * sum_s sim_s(j), counting 0 in slots where j is absent (divide by w, not by the
number of appearances). Candidates = union of the slots' ids, kept to the `top_k` largest m_win,
sorted by decreasing m_win; ties are broken by the smaller id first. p_win = softmax(m_win / tau)
over the candidates (self included); tau == 0 gives a one-hot on the top candidate.
Decision: if the top candidate is not the anchor, j* = anchor; else j* ~ p_win (may be the anchor).
Ids within one slot are assumed distinct (top-K of a similarity query).
"""

from __future__ import annotations

import torch

from sslcli.errors import UsageError


def _check(tau: float, top_k: int) -> None:
    if tau < 0:
        raise UsageError(f"bootstrap tau must be >= 0, got {tau}")
    if top_k < 1:
        raise UsageError(f"bootstrap top_k must be >= 1, got {top_k}")


def window_distribution(
    ids: torch.Tensor, sims: torch.Tensor, tau: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate ids [k'], p_win [k']) for one anchor's window, k' = min(top_k, #distinct ids)."""
    _check(tau, top_k)
    w = ids.shape[0]
    flat_ids, flat_sims = ids.reshape(-1).long(), sims.reshape(-1)
    keep = flat_ids >= 0
    flat_ids, flat_sims = flat_ids[keep], flat_sims[keep]
    uniq, inverse = torch.unique(flat_ids, sorted=True, return_inverse=True)  # ascending ids
    m_win = torch.zeros(uniq.numel(), dtype=flat_sims.dtype, device=flat_sims.device)
    m_win = m_win.scatter_add_(0, inverse, flat_sims)
    m_win = m_win / max(w, 1)
    # Stable sort on -m_win: equal m_win keep the ascending-id order, i.e. smaller id first.
    order = torch.sort(-m_win, stable=True).indices[:top_k]
    cand, m = uniq[order], m_win[order]
    if cand.numel() == 0:
        return cand, m
    if tau == 0:
        p = torch.zeros_like(m)
        p[0] = 1.0
    else:
        p = torch.softmax(m / tau, dim=0)
    return cand, p


def adasim_choice(
    anchor: int,
    ids: torch.Tensor,
    sims: torch.Tensor,
    tau: float,
    top_k: int,
    generator: torch.Generator,
) -> int:
    """j* for `anchor`: itself unless the top candidate is itself, then a sample from p_win."""
    cand, p = window_distribution(ids, sims, tau, top_k)
    if cand.numel() == 0 or int(cand[0]) != int(anchor) or tau == 0:
        return int(anchor)
    return int(cand[torch.multinomial(p, 1, generator=generator)].item())
