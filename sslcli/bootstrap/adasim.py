"""AdaSim window distribution and decision (Lebailly et al., "Adaptive Similarity Bootstrapping
for Self-Distillation based Representation Learning", ICCV 2023, Eq. 4-11 and Algorithm 1;
see docs/methods.md "Neighbour bootstrapping").

For anchor i, with w window slots (one per past epoch) of K recorded neighbours:
- ids:  [w, K], neighbour ids of slot s (negative ids, e.g. -1, are padding; ignored).
- sims: [w, K], the matching cosine similarities.
m_win(j) = (1/w) * sum_s sim_s(j), counting 0 in slots where j is absent (divide by w, not by the
number of appearances). Candidates = union of the slots' ids, kept to the `top_k` largest m_win,
sorted by decreasing m_win; ties are broken by the smaller id first. p_win = softmax(m_win / tau)
over the candidates (self included); tau == 0 gives a one-hot on the top candidate.
Decision: if the top candidate is not the anchor, j* = anchor (the latent space around i is not
trusted); else j* ~ p_win (may be the anchor). Ids within one slot are assumed distinct (top-K of
a similarity query).

`window_candidates` / `adasim_decide` do this for R anchors at once (the per-epoch decision for a
whole dataset shard, no per-image Python); `window_distribution` / `adasim_choice` are the
one-anchor forms built on them, so both give bit-identical numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslcli.errors import UsageError


def _check(tau: float, top_k: int) -> None:
    if tau < 0:
        raise UsageError(f"bootstrap tau must be >= 0, got {tau}")
    if top_k < 1:
        raise UsageError(f"bootstrap top_k must be >= 1, got {top_k}")


def window_candidates(ids: Tensor, sims: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Candidates of R anchors: (cand int64 [R, k], m_win float32 [R, k]), k = min(top_k, w*K).

    ids / sims: [R, w, K]. Row r lists its candidates by decreasing m_win (ties: smaller id
    first); missing entries (fewer distinct ids than k) are id -1 with m_win -inf.
    """
    rows, w = ids.shape[0], ids.shape[1]
    flat_ids = ids.reshape(rows, -1).long()  # (R, wK)
    flat_sims = sims.reshape(rows, -1).float()
    width = flat_ids.shape[1]
    # Stable sort by id: each id's entries become one contiguous segment, kept in slot order,
    # so the segment sums below add in the same order as a per-anchor scatter_add would.
    sorted_ids, order = torch.sort(flat_ids, dim=1, stable=True)
    sorted_sims = flat_sims.gather(1, order)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = starts.long().cumsum(1) - 1  # (R, wK) segment index of each entry
    m_win = torch.zeros_like(sorted_sims).scatter_add_(1, segment, sorted_sims) / w
    seg_ids = torch.full_like(sorted_ids, -1).scatter_(1, segment, sorted_ids)  # ascending per row
    used = torch.arange(width, device=ids.device) <= segment[:, -1:]
    valid = used & (seg_ids >= 0)
    m_win = m_win.masked_fill(~valid, float("-inf"))
    # Stable sort on -m_win: equal m_win keep the ascending-id order, i.e. smaller id first.
    top = torch.sort(-m_win, dim=1, stable=True).indices[:, :top_k]
    cand, m = seg_ids.gather(1, top), m_win.gather(1, top)
    return cand.masked_fill(m == float("-inf"), -1), m


def window_probabilities(m_win: Tensor, tau: float) -> Tensor:
    """p_win [R, k] = softmax(m_win / tau) over valid candidates (-inf -> 0); tau 0: one-hot on
    column 0 (the top candidate). Rows without any candidate are all zero."""
    valid = m_win > float("-inf")
    if tau == 0:
        p = torch.zeros_like(m_win)
        p[:, 0] = 1.0
    else:
        p = torch.softmax((m_win / tau).masked_fill(~valid, float("-inf")), dim=1)
    return torch.where(valid, p, torch.zeros_like(p)).nan_to_num(0.0)


def adasim_decide(anchors: Tensor, cand: Tensor, p_win: Tensor, u: Tensor) -> Tensor:
    """j* [R] for anchors [R] given their candidates / p_win [R, k] and uniforms u [R] in [0, 1).

    j* = anchor unless its top candidate is itself; then the candidate whose cumulative p_win
    first exceeds u (inverse-CDF sampling, so the draw is a pure function of u).
    """
    trusted = cand[:, 0] == anchors
    cdf = p_win.cumsum(1)
    last = (cand >= 0).sum(1).clamp_min(1) - 1  # guard against cdf rounding just below u
    pick = torch.minimum((cdf <= u[:, None]).sum(1), last)
    sampled = cand.gather(1, pick[:, None]).squeeze(1)
    return torch.where(trusted, sampled, anchors)


def window_distribution(ids: Tensor, sims: Tensor, tau: float, top_k: int) -> tuple[Tensor, Tensor]:
    """(candidate ids [k'], p_win [k']) for one anchor's window [w, K], k' = min(top_k, #distinct ids)."""
    _check(tau, top_k)
    cand, m = window_candidates(ids[None], sims[None], top_k)
    p = window_probabilities(m, tau)
    keep = cand[0] >= 0
    return cand[0][keep], p[0][keep]


def adasim_choice(anchor: int, ids: Tensor, sims: Tensor, tau: float, top_k: int,
                  generator: torch.Generator) -> int:
    """j* for one `anchor`: itself unless the top candidate is itself, then a sample from p_win."""
    _check(tau, top_k)
    cand, m = window_candidates(ids[None], sims[None], top_k)
    if cand[0, 0] < 0:
        return int(anchor)
    u = torch.rand(1, generator=generator)
    anchors = torch.tensor([int(anchor)])
    return int(adasim_decide(anchors, cand, window_probabilities(m, tau), u)[0])
