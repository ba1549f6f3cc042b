"""Decision rules: for each anchor i of a shard, the image j* its second view is cropped from.

See docs/methods.md "Neighbour bootstrapping". Every rule is a pure function of a `PlanInput`
(the shard's window, the epoch, pre-drawn uniforms, labels) and returns j* for every anchor of
the shard, vectorised (no per-image Python). The uniforms are drawn for all N images from one
generator seeded by (seed, epoch), so j* does not depend on how the ids are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslcli.bootstrap.adasim import adasim_decide, window_candidates, window_probabilities
from sslcli.config import BootstrapConfig

CHUNK = 65536  # anchors per vectorised block (bounds the [chunk, w*K] sort's memory)


@dataclass
class PlanInput:
    cfg: BootstrapConfig
    anchors: Tensor  # (R,) int64 ids of the shard's anchors
    window_ids: Tensor  # (w, R, K) int32, slots in any order (m_win sums them), -1 = absent
    window_sims: Tensor  # (w, R, K) float32
    epochs_done: int  # completed epochs (window slots that hold real supports)
    epoch: int  # the epoch being planned (0-based)
    epochs: int  # length of the run
    uniforms: Tensor  # (2, R) float in [0, 1)
    labels: Tensor | None  # (N,) int64 class ids of all images (-1 unlabeled)
    device: torch.device  # where to compute
    newest: int = -1  # index of the latest epoch's slot in window_ids (a ring)


def plan_none(inp: PlanInput) -> Tensor:
    return inp.anchors.clone()


def plan_nn(inp: PlanInput) -> Tensor:
    """NN: from the second epoch on, the most similar cached image other than i in the latest
    epoch's support, always."""
    if inp.epochs_done < 1:
        return inp.anchors.clone()
    ids = inp.window_ids[inp.newest].long()  # (R, K), decreasing similarity
    other = (ids != inp.anchors[:, None]) & (ids >= 0)
    first = other.int().argmax(1)  # first True (0 when none)
    nearest = ids.gather(1, first[:, None]).squeeze(1)
    return torch.where(other.any(1), nearest, inp.anchors)


def plan_adasim(inp: PlanInput) -> Tensor:
    """AdaSim: standard pairs until w epochs are complete, then adasim_decide on the window."""
    cfg = inp.cfg
    if inp.epochs_done < cfg.window or cfg.tau == 0:
        return inp.anchors.clone()  # tau 0: p_win is one-hot on the top, which is i or rejected
    out = torch.empty_like(inp.anchors)
    for lo in range(0, inp.anchors.numel(), CHUNK):
        hi = min(lo + CHUNK, inp.anchors.numel())
        ids = inp.window_ids[:, lo:hi].permute(1, 0, 2).to(inp.device)  # (r, w, K)
        sims = inp.window_sims[:, lo:hi].permute(1, 0, 2).to(inp.device)
        cand, m_win = window_candidates(ids, sims, cfg.top_k)
        p_win = window_probabilities(m_win, cfg.tau)
        anchors, u = inp.anchors[lo:hi].to(inp.device), inp.uniforms[0, lo:hi].to(inp.device)
        out[lo:hi] = adasim_decide(anchors, cand, p_win, u).cpu()
    return out


def oracle_p_std(p: float, epoch: int, epochs: int) -> float:
    """Probability of a standard pair in `epoch`: linear from 1 (first epoch) to p (last)."""
    return 1.0 + (p - 1.0) * epoch / max(epochs - 1, 1)


def plan_oracle(inp: PlanInput) -> Tensor:
    """Supervised oracle: with probability 1 - p_std a uniformly random *other* image of the same
    class, else i. Classes with one image always give i."""
    labels = inp.labels
    if labels is None or bool((labels < 0).any()):
        raise ValueError("the oracle bootstrap needs class labels for every image")
    order = torch.argsort(labels, stable=True)  # ids grouped by class
    counts = torch.bincount(labels)
    offsets = counts.cumsum(0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())  # each id's place inside its class block
    cls = labels[inp.anchors]
    n_c, pos = counts[cls], position[inp.anchors] - offsets[cls]
    pick = (inp.uniforms[1] * (n_c - 1).clamp_min(1)).long().clamp_max((n_c - 2).clamp_min(0))
    pick = pick + (pick >= pos).long()  # skip the anchor itself
    other = order[(offsets[cls] + pick).clamp_max(order.numel() - 1)]
    swap = (inp.uniforms[0] < 1.0 - oracle_p_std(inp.cfg.p, inp.epoch, inp.epochs)) & (n_c > 1)
    return torch.where(swap, other, inp.anchors)


RULES = {"none": plan_none, "nn": plan_nn, "adasim": plan_adasim, "oracle": plan_oracle}
