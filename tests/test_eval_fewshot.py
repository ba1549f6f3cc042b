"""Few-shot nearest-centroid episodes (sslcli.eval.fewshot)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.errors import DataError, UsageError
from sslcli.eval.featurefiles import FeatureSet, save_features
from sslcli.eval.fewshot import fewshot_episodes, fewshot_notes, sample_episodes, skipped_classes


def separable(num_classes=8, per_class=25, dim=4, seed=0):
    """Tight clusters far apart: features [C*per_class, dim], labels."""
    g = torch.Generator().manual_seed(seed)
    centres = 100.0 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.01 * torch.randn(len(labels), dim, generator=g), labels


def test_separable_clusters_give_100_with_zero_interval():
    x, y = separable()
    out = fewshot_episodes(x, y, episodes=50)
    assert out == {"accuracy": 100.0, "ci95": 0.0, "episodes": 50, "ways": 5, "shots": 5,
                   "queries": 15, "metric": "accuracy"}


def two_way_line():
    """1-D features: class 0 = {0, 2}, class 1 = {1, 3} (2 images each)."""
    return torch.tensor([[0.0], [2.0], [1.0], [3.0]]), torch.tensor([0, 0, 1, 1])


def test_known_expected_accuracy_falls_in_interval():
    # 2-way 1-shot 1-query: both classes in every episode; each class's support/query split is
    # one of 2 equally likely orders -> 4 equally likely episodes (support0, query0 | s1, q1):
    #   s0=0,q0=2 | s1=1,q1=3: q0=2 -> d(0)=4 > d(1)=1 wrong; q1=3 -> 9 vs 4 right   -> 50 %
    #   s0=0,q0=2 | s1=3,q1=1: q0=2 -> 4 vs 1 wrong;        q1=1 -> 1 vs 4 wrong   ->  0 %
    #   s0=2,q0=0 | s1=1,q1=3: q0=0 -> 4 vs 1 wrong;        q1=3 -> 1 vs 4 wrong   ->  0 %
    #   s0=2,q0=0 | s1=3,q1=1: q0=0 -> 4 vs 9 right;        q1=1 -> 1 vs 4 wrong   -> 50 %
    # Expected accuracy = (50 + 0 + 0 + 50) / 4 = 25 %, episode std = 25,
    # ci95 ~ 1.96 * 25 / sqrt(600) = 2.0.
    x, y = two_way_line()
    out = fewshot_episodes(x, y, ways=2, shots=1, queries=1, episodes=600, seed=0)
    assert abs(out["accuracy"] - 25.0) <= out["ci95"]
    assert out["ci95"] == pytest.approx(1.96 * 25.0 / np.sqrt(600), rel=0.02)


def test_reproducible_with_seed_and_seed_matters():
    x, y = two_way_line()
    a = fewshot_episodes(x, y, ways=2, shots=1, queries=1, episodes=200, seed=3)
    b = fewshot_episodes(x, y, ways=2, shots=1, queries=1, episodes=200, seed=3)
    c = fewshot_episodes(x, y, ways=2, shots=1, queries=1, episodes=200, seed=4)
    assert a == b
    assert a["accuracy"] != c["accuracy"]


def test_episodes_are_well_formed():
    _, y = separable(num_classes=7, per_class=22)
    index = sample_episodes(y, ways=5, shots=5, queries=15, episodes=30, seed=1)
    assert index.shape == (30, 5, 20)
    for episode in index:
        classes = y[torch.as_tensor(episode)]
        assert (classes == classes[:, :1]).all()  # one class per row
        assert len(set(classes[:, 0].tolist())) == 5  # distinct classes
        assert len(set(episode.ravel().tolist())) == 100  # distinct images


def test_small_classes_are_excluded():
    x, y = separable(num_classes=6, per_class=25)
    x, y = x[:-10], y[:-10]  # class 5 keeps 15 < 20 images: never sampled
    index = sample_episodes(y, ways=5, shots=5, queries=15, episodes=40, seed=0)
    assert 5 not in set(y[torch.as_tensor(index.ravel())].tolist())


def test_small_classes_are_named_in_the_notes():
    _, y = separable(num_classes=6, per_class=25)
    y = torch.cat([y[y < 4], y[y == 4][:19], y[y == 5][:3]])  # class 4: 19 images, class 5: 3
    assert skipped_classes(y, shots=5, queries=15) == {4: 19, 5: 3}
    names = ["a", "b", "c", "d", "emu", "fox"]
    assert fewshot_notes(y, 5, 15, names) == [
        "few-shot: 2 of 6 classes have fewer than shots + queries = 20 images and never appear in an "
        "episode: emu (19), fox (3)"]
    assert fewshot_notes(y, 5, 14) == [  # 19 images are enough for class 4; no names: the ids
        "few-shot: 1 of 6 classes have fewer than shots + queries = 19 images and never appear in an "
        "episode: 5 (3)"]
    assert fewshot_notes(y, 1, 1) == []


def test_cli_report_notes_the_skipped_classes(tmp_path):
    x, y = separable(num_classes=4, per_class=8)
    save_features(tmp_path / "f.safetensors", FeatureSet(x[:-6], y[:-6]))  # class 3 keeps 2 images
    result = CliRunner().invoke(app, ["eval", "fewshot", "--features", str(tmp_path / "f.safetensors"), "--ways",
                                      "3", "--shots", "2", "--queries", "3", "--episodes", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metrics"]["accuracy"] == 100.0
    assert report["notes"] == ["few-shot: 1 of 4 classes have fewer than shots + queries = 5 images and never "
                               "appear in an episode: 3 (2)"]


def test_too_few_eligible_classes_names_the_counts():
    x, y = separable(num_classes=6, per_class=25)
    keep = y < 4
    x = torch.cat([x[keep], x[y == 4][:19], x[y == 5][:3]])
    y = torch.cat([y[keep], y[y == 4][:19], y[y == 5][:3]])
    with pytest.raises(DataError, match=r"at least 20 images.*only 4 of 6 classes"):
        fewshot_episodes(x, y)


def test_mean_per_class_equals_accuracy_on_balanced_episodes():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(200, 3, generator=g), torch.arange(10).repeat(20)
    acc = fewshot_episodes(x, y, episodes=40)
    mpc = fewshot_episodes(x, y, episodes=40, metric="mean-per-class")
    assert mpc["metric"] == "mean-per-class"
    assert mpc["accuracy"] == pytest.approx(acc["accuracy"])
    assert 0.0 < acc["accuracy"] < 100.0


def test_raw_features_are_not_normalised():
    # Along one ray: L2-normalising would make both classes identical (chance); raw distances
    # separate them perfectly.
    x = torch.tensor([[1.0], [1.1], [0.9], [1.0], [10.0], [10.1], [9.9], [10.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = fewshot_episodes(x, y, ways=2, shots=2, queries=2, episodes=20)
    assert out["accuracy"] == 100.0


def test_bad_arguments():
    x, y = separable()
    with pytest.raises(UsageError):
        fewshot_episodes(x, y, metric="f1")
    with pytest.raises(UsageError):
        fewshot_episodes(x, y, shots=0)
    with pytest.raises(DataError):
        fewshot_episodes(x, y[:-1])
    with pytest.raises(DataError):
        fewshot_episodes(x, torch.full_like(y, -1))
