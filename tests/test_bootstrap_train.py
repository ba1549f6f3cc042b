"""Bootstrapping inside `ssl pretrain`: the data path, tau = 0 identity, sharding, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from sslcli.data.datasets import open_dataset
from sslcli.data.loader import TrainSet
from sslcli.data.transforms import MultiCropTransform
from sslcli.errors import Interrupted
from sslcli.train.pretrain import RunOptions, pretrain
from run_checks import InterruptAt, losses

ADASIM = ["bootstrap.name=adasim", "bootstrap.tau=0.2", "bootstrap.window=1", "bootstrap.top_k=3",
          "train.epochs=3"]


def records(run_dir, key):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if key in json.loads(line)]


def bootstrap_state(run_dir, checkpoint="last"):
    with safe_open(str(run_dir / "checkpoints" / f"{checkpoint}.safetensors"), framework="pt") as f:
        return {k.removeprefix("extra/bootstrap."): f.get_tensor(k) for k in f.keys()
                if k.startswith("extra/bootstrap.")}


def test_second_view_comes_from_j_star(tiny_config):
    cfg = tiny_config()
    dataset = open_dataset(cfg.data.path)
    trainset = TrainSet(dataset, MultiCropTransform(cfg.data), base_seed=0)
    plain, same, swapped = trainset[(1, 4)], trainset[(1, 4, 4)], trainset[(1, 4, 30)]
    assert all(torch.equal(a, b) for a, b in zip(plain["crops"], same["crops"]))
    assert torch.equal(swapped["crops"][0], plain["crops"][0])  # view 1 is always x_i
    assert all(torch.equal(a, b) for a, b in zip(swapped["crops"][2:], plain["crops"][2:]))  # locals too
    assert not torch.equal(swapped["crops"][1], plain["crops"][1])
    assert (swapped["index"], swapped["second"], plain["second"]) == (4, 30, 4)


def test_tau_zero_is_the_standard_run(tiny_config, tmp_path):
    pretrain(tiny_config("train.epochs=3"), RunOptions(out=tmp_path / "none", device="cpu"))
    cfg = tiny_config(*ADASIM, "bootstrap.tau=0", "train.checkpoint_every=1")
    pretrain(cfg, RunOptions(out=tmp_path / "tau0", device="cpu"))
    assert losses(tmp_path / "tau0") == losses(tmp_path / "none")  # exactly
    boots = records(tmp_path / "tau0", "bootstrap_ratio")
    assert [r["epoch"] for r in boots] == [1, 2, 3] and all(r["bootstrap_ratio"] == 0 for r in boots)
    assert all(0 <= r["nn_acc"] <= 100 and 0 <= r["nn2_acc"] <= 100 for r in boots)
    state = bootstrap_state(tmp_path / "tau0")
    assert state["window_ids"].shape == (1, 48, 3) and int(state["epochs_done"][0]) == 3
    # query-before-insert: an image that found itself in epoch 3 met its epoch-2 vector, not the
    # epoch-3 one (which would give similarity 1)
    z2 = bootstrap_state(tmp_path / "tau0", "epoch-0002")["z"]
    z3, ids, sims = state["z"], state["window_ids"][0], state["window_sims"][0]
    rows, cols = (ids == torch.arange(48)[:, None]).nonzero(as_tuple=True)
    assert rows.numel() > 0
    expected = (z3[rows] * z2[rows]).sum(1)
    assert torch.allclose(sims[rows, cols], expected, atol=1e-5)
    assert float(expected.min()) < 1 - 1e-5


def test_nn_bootstraps_every_pair_after_the_first_epoch(tiny_config, tmp_path):
    cfg = tiny_config("bootstrap.name=nn", "bootstrap.top_k=3", "train.epochs=3")
    pretrain(cfg, RunOptions(out=tmp_path / "nn", device="cpu"))
    ratios = [r["bootstrap_ratio"] for r in records(tmp_path / "nn", "bootstrap_ratio")]
    assert ratios[0] == 0 and ratios[2] == 100.0  # epoch 2 plans from epoch 1's full support


def test_sharded_cache_matches_one_process(tiny_config, tmp_path):
    cfg = tiny_config(*ADASIM)
    pretrain(cfg, RunOptions(out=tmp_path / "one", device="cpu"))
    pretrain(cfg, RunOptions(out=tmp_path / "two", device="cpu", procs=2))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one, two = records(tmp_path / "one", "bootstrap_ratio"), records(tmp_path / "two", "bootstrap_ratio")
    assert one == two
    s1, s2 = bootstrap_state(tmp_path / "one"), bootstrap_state(tmp_path / "two")
    assert torch.equal(s1["window_ids"], s2["window_ids"])
    assert torch.allclose(s1["window_sims"], s2["window_sims"], atol=1e-4)
    assert torch.allclose(s1["z"], s2["z"], atol=1e-4)


def test_resume_with_adasim_active_is_exact(tiny_config, tmp_path):
    cfg = tiny_config(*ADASIM)
    pretrain(cfg, RunOptions(out=tmp_path / "full", device="cpu"))
    assert records(tmp_path / "full", "bootstrap_ratio")[2]["bootstrap_ratio"] > 0  # active in epoch 3
    with pytest.raises(Interrupted):
        pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu"), InterruptAt(step=8))
    pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu", resume=True))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert records(tmp_path / "cut", "bootstrap_ratio") == records(tmp_path / "full", "bootstrap_ratio")
    full, cut = bootstrap_state(tmp_path / "full"), bootstrap_state(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_bootstrapping_needs_no_change_for_simsiam(tiny_config, tmp_path):
    """The same bootstrap code drives SimSiam: its anchor is the encoder's pooled feature."""
    cfg = tiny_config("train.epochs=2", "method.name=simsiam", "method.out_dim=32", "method.hidden_dim=32",
                      "method.pred_dim=8", "data.local_crops=0", "optim.name=sgd", "optim.lr=0.05",
                      "optim.warmup_epochs=0", "bootstrap.name=nn", "bootstrap.top_k=3")
    pretrain(cfg, RunOptions(out=tmp_path / "simsiam", device="cpu"))
    ratios = [r["bootstrap_ratio"] for r in records(tmp_path / "simsiam", "bootstrap_ratio")]
    # epoch 2 pairs every image with its epoch-1 nearest neighbour, except the 16 of epoch 1's first
    # batch: they queried an empty cache and have no neighbour yet
    assert ratios == [0.0, pytest.approx(100 * 32 / 48)]
    state = bootstrap_state(tmp_path / "simsiam")
    assert state["z"].shape == (48, 32)  # the tiny ViT's embed_dim, not the projector's width


def test_unreadable_neighbour_gives_a_standard_pair(tiny_config, tmp_path):
    cfg = tiny_config()
    folder = tmp_path / "data"
    shutil.copytree(cfg.data.path, folder)
    dataset = open_dataset(str(folder))
    broken = folder / dataset.paths[30]
    broken.write_bytes(b"not an image")
    trainset = TrainSet(dataset, MultiCropTransform(cfg.data), base_seed=0)
    plain, swapped = trainset[(1, 4)], trainset[(1, 4, 30)]
    assert (swapped["second"], swapped["bad"]) == (4, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain["crops"], swapped["crops"]))
