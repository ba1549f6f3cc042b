"""AdaSim window distribution (docs/methods.md "Neighbour bootstrapping") on hand-made windows."""

from __future__ import annotations

import math

import pytest
import torch

from sslcli.bootstrap.adasim import adasim_choice, window_distribution
from sslcli.errors import UsageError


def _win(ids, sims):
    return torch.tensor(ids, dtype=torch.long), torch.tensor(sims, dtype=torch.float32)


def _m(cand, p):
    return dict(zip(cand.tolist(), p.tolist()))


def test_absent_counts_zero_and_divides_by_w():
    # anchor 0 in both slots (0.9, 0.7) -> 0.8; id 5 in one of 2 slots with 0.8 -> 0.4; id 7 -> 0.3
    ids, sims = _win([[0, 5], [0, 7]], [[0.9, 0.8], [0.7, 0.6]])
    cand, p = window_distribution(ids, sims, tau=1.0, top_k=10)
    assert cand.tolist() == [0, 5, 7]
    m = torch.tensor([0.8, 0.4, 0.3])
    assert torch.allclose(p, torch.softmax(m / 1.0, 0), atol=1e-6)


def test_p_win_matches_hand_softmax_and_sums_to_one():
    ids, sims = _win([[3, 1, 2]], [[0.9, 0.5, 0.1]])
    tau = 0.2
    cand, p = window_distribution(ids, sims, tau=tau, top_k=3)
    e = [math.exp(v / tau) for v in (0.9, 0.5, 0.1)]
    expected = [x / sum(e) for x in e]
    assert cand.tolist() == [3, 1, 2]
    assert p.tolist() == pytest.approx(expected, rel=1e-5)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)


def test_self_included_among_candidates():
    ids, sims = _win([[4, 9]], [[0.95, 0.9]])
    cand, p = window_distribution(ids, sims, tau=0.1, top_k=2)
    assert 4 in cand.tolist() and cand[0] == 4 and p[0] < 1


def test_top_candidate_not_self_returns_self():
    ids, sims = _win([[9, 4], [9, 4]], [[0.95, 0.9], [0.95, 0.9]])
    g = torch.Generator().manual_seed(0)
    assert all(adasim_choice(4, ids, sims, 10.0, 2, g) == 4 for _ in range(50))


def test_top_candidate_self_samples_from_p_win():
    ids, sims = _win([[4, 9]], [[0.9, 0.89]])
    g = torch.Generator().manual_seed(0)
    picks = {adasim_choice(4, ids, sims, 1.0, 2, g) for _ in range(200)}
    assert picks == {4, 9}


def test_tau_zero_one_hot_and_choice_is_anchor():
    ids, sims = _win([[4, 9]], [[0.9, 0.89]])
    cand, p = window_distribution(ids, sims, tau=0.0, top_k=2)
    assert cand.tolist() == [4, 9] and p.tolist() == [1.0, 0.0]
    g = torch.Generator().manual_seed(0)
    assert all(adasim_choice(4, ids, sims, 0.0, 2, g) == 4 for _ in range(20))


def test_ties_broken_by_smaller_id():
    ids, sims = _win([[8, 2, 5]], [[0.5, 0.5, 0.5]])
    cand, p = window_distribution(ids, sims, tau=0.2, top_k=3)
    assert cand.tolist() == [2, 5, 8]
    assert torch.allclose(p, torch.full((3,), 1 / 3))
    cand, _ = window_distribution(ids, sims, tau=0.2, top_k=2)
    assert cand.tolist() == [2, 5]


def test_negative_padding_ignored():
    ids, sims = _win([[1, -1], [-1, -1]], [[0.6, 0.0], [0.0, 0.0]])
    cand, p = window_distribution(ids, sims, tau=0.0, top_k=5)
    assert cand.tolist() == [1] and p.tolist() == [1.0]
    empty, pe = window_distribution(*_win([[-1, -1]], [[0.0, 0.0]]), tau=0.2, top_k=3)
    assert empty.numel() == 0 and pe.numel() == 0
    g = torch.Generator().manual_seed(0)
    assert adasim_choice(7, *_win([[-1, -1]], [[0.0, 0.0]]), 0.2, 3, g) == 7


def test_top_k_truncation():
    # m_win: 1 -> 0.9, 2 -> 0.35, 3 -> 0.3, 4 -> 0.25  (w = 2)
    ids, sims = _win([[1, 2, 3], [1, 4, -1]], [[0.9, 0.7, 0.6], [0.9, 0.5, 0.0]])
    cand, p = window_distribution(ids, sims, tau=0.5, top_k=2)
    assert cand.tolist() == [1, 2]
    assert p.tolist() == pytest.approx(torch.softmax(torch.tensor([0.9, 0.35]) / 0.5, 0).tolist())


def test_bad_arguments():
    ids, sims = _win([[1]], [[0.5]])
    with pytest.raises(UsageError):
        window_distribution(ids, sims, tau=-0.1, top_k=1)
    with pytest.raises(UsageError):
        window_distribution(ids, sims, tau=0.1, top_k=0)
