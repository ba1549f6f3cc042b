"""Neighbour cache and decision rules (docs/methods.md "Neighbour bootstrapping") on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslcli.bootstrap import Bootstrapper, NeighbourCache
from sslcli.bootstrap.adasim import (adasim_decide, window_candidates, window_distribution,
                                     window_probabilities)
from sslcli.bootstrap.rules import PlanInput, oracle_p_std, plan_adasim, plan_nn
from sslcli.config import BootstrapConfig
from sslcli.errors import ConfigError


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_batched_candidates_equal_the_one_anchor_form():
    g = torch.Generator().manual_seed(0)
    rows, w, k = 64, 4, 5
    ids = torch.randint(-1, 12, (rows, w, k), generator=g)  # repeats across slots, padding
    for r in range(rows):  # ids within one slot are distinct (a top-K), padding aside
        for s in range(w):
            seen = set()
            for c in range(k):
                if int(ids[r, s, c]) in seen:
                    ids[r, s, c] = -1
                seen.add(int(ids[r, s, c]))
    sims = torch.rand(rows, w, k, generator=g)
    cand, m = window_candidates(ids, sims, top_k=6)
    p = window_probabilities(m, tau=0.1)
    for r in range(rows):
        c1, p1 = window_distribution(ids[r], sims[r], tau=0.1, top_k=6)
        keep = cand[r] >= 0
        assert cand[r][keep].tolist() == c1.tolist()
        assert torch.equal(p[r][keep], p1)
        assert bool((p[r][~keep] == 0).all())


def test_adasim_decide_inverse_cdf():
    anchors = torch.tensor([5, 5, 5, 7])
    cand = torch.tensor([[5, 3, 9], [5, 3, 9], [5, 3, 9], [1, 7, -1]])
    p = torch.tensor([[0.5, 0.3, 0.2]] * 3 + [[0.6, 0.4, 0.0]])
    u = torch.tensor([0.49, 0.51, 0.95, 0.1])
    # cdf 0.5, 0.8, 1.0: u=0.49 -> 5, 0.51 -> 3, 0.95 -> 9; anchor 7 is not its top -> itself
    assert adasim_decide(anchors, cand, p, u).tolist() == [5, 3, 9, 7]


def test_query_before_insert_and_self_similarity_below_one():
    n, d = 6, 8
    cache = NeighbourCache(n, d, top_k=3, window=2)
    first, second = unit(n, d, 0), unit(n, d, 0) + 0.3 * unit(n, d, 1)
    cache.observe(torch.arange(n), first)
    # the cache was empty when the batch queried it: no supports in the first step
    assert bool((cache.current_ids == -1).all())
    cache.end_epoch()
    cache.observe(torch.arange(n), second)
    second = F.normalize(second, dim=1)
    expected = second @ first.T  # against the previous epoch's vectors, self included
    for i in range(n):
        ids, sims = cache.current_ids[i].tolist(), cache.current_sims[i]
        assert ids == expected[i].topk(3).indices.tolist()
        assert torch.allclose(sims, expected[i].topk(3).values, atol=1e-6)
        if i in ids:
            assert float(sims[ids.index(i)]) < 1.0 - 1e-4
    assert torch.allclose(cache.z, second)


def test_end_epoch_shifts_the_window_oldest_first():
    cache = NeighbourCache(4, 3, top_k=2, window=2)
    cache.observe(torch.arange(4), unit(4, 3, 0))
    cache.end_epoch()
    cache.observe(torch.arange(4), unit(4, 3, 1))
    latest = cache.current_ids.clone()
    cache.end_epoch()
    assert cache.epochs_done == 2
    oldest, newest = cache.slot_order()
    assert newest == cache.newest and torch.equal(cache.window_ids[newest], latest)
    assert bool((cache.window_ids[oldest] == -1).all())  # epoch 0 found nothing (empty cache)
    cache.observe(torch.arange(4), unit(4, 3, 2))
    third = cache.current_ids.clone()
    cache.end_epoch()  # the oldest slot (epoch 0) is overwritten
    assert cache.slot_order() == [newest, oldest] and torch.equal(cache.window_ids[oldest], third)
    assert torch.equal(cache.state_dict()["window_ids"], torch.stack([latest, third]))
    assert bool((cache.current_ids == -1).all())


def test_state_round_trip_onto_another_world_size():
    full_cache = NeighbourCache(7, 4, top_k=3, window=2)
    for epoch in range(3):
        full_cache.observe(torch.arange(7), unit(7, 4, epoch))
        full_cache.end_epoch()
    state = full_cache.state_dict()
    shard = NeighbourCache(7, 4, top_k=3, window=2, rank=1, world=2)  # owns ids 1, 3, 5
    shard.load_state_dict(state)
    assert torch.equal(shard.window_ids, full_cache.window_ids[full_cache.slot_order()][:, 1::2])
    assert torch.equal(shard.z, full_cache.z[1::2])
    assert shard.epochs_done == 3
    with pytest.raises(ValueError, match="window_ids"):
        NeighbourCache(7, 4, top_k=3, window=3).load_state_dict(state)


def _input(cfg, window_ids, window_sims, epochs_done, anchors=None, labels=None, epoch=1, epochs=10):
    rows = window_ids.shape[1]
    anchors = torch.arange(rows) if anchors is None else anchors
    return PlanInput(cfg, anchors, window_ids, window_sims, epochs_done, epoch, epochs,
                     torch.full((2, rows), 0.5), labels, torch.device("cpu"))


def test_nn_never_picks_self():
    cfg = BootstrapConfig(name="nn", top_k=3)
    ids = torch.tensor([[[0, 2, 1], [3, 1, 0], [-1, -1, -1], [3, -1, -1]]], dtype=torch.int32)
    sims = torch.rand(1, 4, 3)
    assert plan_nn(_input(cfg, ids, sims, epochs_done=1)).tolist() == [2, 3, 2, 3]
    assert plan_nn(_input(cfg, ids, sims, epochs_done=0)).tolist() == [0, 1, 2, 3]  # first epoch


def test_adasim_standard_pairs_until_the_window_is_full():
    cfg = BootstrapConfig(name="adasim", tau=1.0, window=2, top_k=2)
    ids = torch.tensor([[[0, 1]], [[0, 1]]], dtype=torch.int32)  # anchor 0 trusts itself
    sims = torch.tensor([[[0.9, 0.89]], [[0.9, 0.89]]])
    u = torch.full((2, 1), 0.9)  # p_win ~ (0.5025, 0.4975): u = 0.9 picks neighbour 1
    inp = _input(cfg, ids, sims, epochs_done=1)
    inp.uniforms = u
    assert plan_adasim(inp).tolist() == [0]
    inp.epochs_done = 2
    assert plan_adasim(inp).tolist() == [1]
    inp.cfg = BootstrapConfig(name="adasim", tau=0.0, window=2, top_k=2)
    assert plan_adasim(inp).tolist() == [0]


def test_oracle_picks_other_images_of_the_same_class():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 1])
    boot = Bootstrapper(BootstrapConfig(name="oracle", p=0.0), 8, 4, labels, epochs=3, seed=0)
    plan = boot.plan(2)  # last epoch: p_std = p = 0, every pair bootstrapped (but class 2 has one image)
    for i, j in enumerate(plan.tolist()):
        assert labels[j] == labels[i]
        assert (j != i) == (i != 3)
    assert boot.plan(0).tolist() == list(range(8))  # p_std = 1 at the start
    assert oracle_p_std(0.5, 0, 11) == 1.0 and oracle_p_std(0.5, 10, 11) == 0.5
    assert oracle_p_std(0.5, 5, 11) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="labeled"):
        Bootstrapper(BootstrapConfig(name="oracle"), 3, 4, torch.tensor([0, -1, 1]), epochs=3, seed=0)


def test_oracle_ratio_follows_p_std():
    labels = torch.arange(4000) % 10
    boot = Bootstrapper(BootstrapConfig(name="oracle", p=0.5), 4000, 4, labels, epochs=5, seed=1)
    boot.plan(2)  # p_std = 0.75
    assert boot.ratio == pytest.approx(0.25, abs=0.03)


def test_epoch_metrics_nn_acc():
    labels = torch.tensor([0, 0, 1, 1])
    boot = Bootstrapper(BootstrapConfig(name="adasim", top_k=2), 4, 2, labels, epochs=3, seed=0)
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    boot.observe(torch.arange(4), z)
    boot.end_epoch()
    boot.observe(torch.arange(4), z)  # supports: self first, then the same-class twin
    record = boot.end_epoch()
    assert record["nn_acc"] == 100.0 and record["nn2_acc"] == 100.0
    assert record["bootstrap_ratio"] == 0.0


def test_query_in_blocks_equals_one_block(monkeypatch):
    from sslcli.bootstrap import cache as cache_module

    z_old, z_new = unit(50, 8, 0), unit(20, 8, 1)
    results = []
    for block in (2**26, 7 * 51):  # everything at once, then blocks of 7 queries
        monkeypatch.setattr(cache_module, "SIM_BLOCK", block)
        cache = NeighbourCache(50, 8, top_k=4, window=1)
        cache.observe(torch.arange(50), z_old)
        cache.observe(torch.arange(20), z_new)
        results.append((cache.current_ids.clone(), cache.current_sims.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
