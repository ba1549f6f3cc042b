"""Weighted k-NN (sslcli.eval.knn) against DINO's eval_knn.py loop and hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.errors import DataError, UsageError
from sslcli.eval.featurefiles import FeatureSet, save_features
from sslcli.eval.knn import knn_classify, knn_notes
from sslcli.eval.tasks import aligned_val_labels


@torch.no_grad()
def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
                        num_classes, imgs_per_chunk):
    """DINO's eval_knn.knn_classifier, transcribed; only the chunk size is a parameter
    (DINO's num_test // 100 is 0 below 100 test images). Features must be L2-normalised."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images = test_labels.shape[0]
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total


def clustered(n, num_classes, dim, noise, generator):
    """Features [n, dim] around one random centre per class, labels [n]."""
    centres = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return centres[labels] + noise * torch.randn(n, dim, generator=generator), labels


@pytest.mark.parametrize("seed", range(4))
def test_matches_dino_reference_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = clustered(600, 12, 16, 2.0, g)
    test_x, test_y = clustered(230, 12, 16, 2.0, g)
    ks = (5, 10, 20, 100, 200)
    ours = knn_classify(train_x, train_y, test_x, test_y, ks=ks, num_classes=12, chunk_size=64)
    train_n, test_n = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    for k in ks:
        top1, top5 = dino_knn_classifier(train_n, train_y, test_n, test_y, k, 0.07, 12, 50)
        assert ours["k"][str(k)]["top1"] == pytest.approx(top1, abs=1e-9)
        assert ours["k"][str(k)]["top5"] == pytest.approx(top5, abs=1e-9)
    assert 0 < ours["top1"] < 100  # a non-trivial case
    assert ours["top1"] == ours["k"]["20"]["top1"]


def test_matches_dino_reference_with_other_temperature_and_unused_classes():
    g = torch.Generator().manual_seed(7)
    train_x, train_y = clustered(300, 8, 8, 1.5, g)
    test_x, test_y = clustered(120, 8, 8, 1.5, g)
    ours = knn_classify(train_x, train_y, test_x, test_y, ks=(7, 30), temperature=0.5,
                        num_classes=11)
    train_n, test_n = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    for k in (7, 30):
        top1, top5 = dino_knn_classifier(train_n, train_y, test_n, test_y, k, 0.5, 11, 25)
        assert ours["k"][str(k)] == pytest.approx({"top1": top1, "top5": top5}, abs=1e-9)


def test_perfect_features_give_100():
    eye = torch.eye(6)
    train_x = torch.cat([eye * 3.0, eye * 0.5])  # scale does not matter: L2-normalised inside
    train_y = torch.arange(6).repeat(2)
    test_x, test_y = eye * 7.0, torch.arange(6)
    out = knn_classify(train_x, train_y, test_x, test_y, ks=(1, 2))
    assert out == {"k": {"1": {"top1": 100.0, "top5": 100.0}, "2": {"top1": 100.0, "top5": 100.0}},
                   "top1": 100.0}


def hand_case():
    """Train: a=(1,0) class 0, b=(0,1) class 1, c=(1,1) class 1. Test: (1,0) class 0 and (0,1)
    labelled class 0 (its neighbours are all class 1 but one)."""
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train_y = torch.tensor([0, 1, 1])
    test_x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    test_y = torch.tensor([0, 0])
    return train_x, train_y, test_x, test_y


def test_hand_computed_case():
    # Test 1 = (1,0): cosines a 1, c 1/sqrt2 = 0.7071, b 0.
    #   k=3, T=0.07: class 0 = e^(1/0.07) = e^14.286 = 1.6e6; class 1 = e^(0.7071/0.07) + e^0
    #   = e^10.10 + 1 = 24344 -> class 0: correct, although the majority of the 3 is class 1.
    # Test 2 = (0,1), label 0: cosines b 1, c 0.7071, a 0 -> class 1 first at every k: top-1 miss.
    #   top-5 window = min(5, k, C=2): k=1 -> 1 (miss); k=2 -> 2, class 0 (score 0) is second:
    #   hit; k=3 -> 2, class 0 (score e^0 = 1) is second: hit.
    # => top1 = 1/2 = 50 % at every k; top5 = 50 % at k=1, 100 % at k=2 and k=3.
    out = knn_classify(*hand_case(), ks=(1, 2, 3))
    assert out["k"]["1"] == {"top1": 50.0, "top5": 50.0}
    assert out["k"]["2"] == {"top1": 50.0, "top5": 100.0}
    assert out["k"]["3"] == {"top1": 50.0, "top5": 100.0}
    assert out["top1"] == 50.0  # no k=20 -> the first k


def test_temperature_weighting_by_hand():
    # T = 100: weights e^(s/100) ~ 1 for all three neighbours of test 1, so
    # class 0 = e^0.01 = 1.01005 < class 1 = e^0.007071 + e^0 = 2.00710 -> majority wins:
    # test 1 is now wrong, test 2 still wrong -> top1 0 % at k=3; at k=1 test 1 is right (50 %).
    out = knn_classify(*hand_case(), ks=(1, 3), temperature=100.0)
    assert out["k"]["3"]["top1"] == 0.0
    assert out["k"]["1"]["top1"] == 50.0
    assert math.exp(0.01) < math.exp(0.7071 / 100) + 1


def test_chunking_and_tiny_test_sets_do_not_change_results():
    g = torch.Generator().manual_seed(3)
    train_x, train_y = clustered(150, 5, 6, 1.0, g)
    test_x, test_y = clustered(37, 5, 6, 1.0, g)
    ref = knn_classify(train_x, train_y, test_x, test_y, chunk_size=1000)
    for chunk in (1, 7, 36, 37):
        assert knn_classify(train_x, train_y, test_x, test_y, chunk_size=chunk) == ref
    one = knn_classify(train_x, train_y, test_x[:1], test_y[:1])  # M = 1
    assert one["k"]["20"]["top1"] in (0.0, 100.0)


def test_k_larger_than_train_set_is_clipped():
    train_x, train_y, test_x, test_y = hand_case()
    out = knn_classify(train_x, train_y, test_x, test_y, ks=(3, 10, 20, 200))
    assert out["k"]["10"] == out["k"]["3"] == out["k"]["200"]
    assert set(out["k"]) == {"3", "10", "20", "200"}
    assert out["top1"] == out["k"]["20"]["top1"]


def test_default_ks_and_headline():
    g = torch.Generator().manual_seed(5)
    train_x, train_y = clustered(250, 6, 8, 1.0, g)
    test_x, test_y = clustered(40, 6, 8, 1.0, g)
    out = knn_classify(train_x, train_y, test_x, test_y)
    assert list(out["k"]) == ["10", "20", "100", "200"]
    assert out["top1"] == out["k"]["20"]["top1"]
    for v in out["k"].values():
        assert 0.0 <= v["top1"] <= v["top5"] <= 100.0


def test_bad_inputs_raise_typed_errors():
    train_x, train_y, test_x, test_y = hand_case()
    with pytest.raises(UsageError):
        knn_classify(train_x, train_y, test_x, test_y, ks=(0,))
    with pytest.raises(UsageError):
        knn_classify(train_x, train_y, test_x, test_y, temperature=0.0)
    with pytest.raises(UsageError):
        knn_classify(train_x, train_y, test_x, test_y, chunk_size=0)
    with pytest.raises(DataError):
        knn_classify(train_x, train_y, torch.zeros(2, 3), test_y)
    with pytest.raises(DataError):
        knn_classify(train_x, train_y, test_x, torch.tensor([0, -1]))
    with pytest.raises(DataError):
        knn_classify(train_x, train_y, test_x, test_y, num_classes=1)
    with pytest.raises(DataError):
        knn_classify(train_x[:0], train_y[:0], test_x, test_y)


def test_random_features_score_chance():
    """Features independent of the labels: top-1 ~ 1/C, top-5 ~ 5/C (10 classes, 1000 test images)."""
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(4000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, test_y = torch.randint(0, 10, (4000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    result = knn_classify(train, train_y, test, test_y, ks=(20,))
    assert 6.0 <= result["top1"] <= 14.0  # 10 % +- 4 points (binomial std ~0.95 points)
    assert 44.0 <= result["k"]["20"]["top5"] <= 56.0


# ---------------------------------------------------------------- small data (docs/evals.md "Small data")


def test_notes_name_ks_above_the_train_set_and_the_smallest_class():
    labels = torch.tensor([0] * 12 + [1] * 5 + [2] * 8)  # 25 images, smallest class 5
    notes = knn_notes(labels, (5, 10, 20, 100, 200))
    assert len(notes) == 2
    assert "k = 100, 200 exceed the 25 training images and are clipped to 25" in notes[0]
    assert "k = 10, 20, 100, 200 exceed the 5 training images of the smallest class" in notes[1]
    assert knn_notes(torch.arange(40) % 4, (10,)) == []  # 10 per class: nothing to say


def features(labels, meta=None):
    return FeatureSet(torch.randn(len(labels), 4), torch.tensor(labels), meta=meta or {})


def test_val_classes_are_mapped_to_train_by_name_and_unknown_ones_refused():
    train = features([0, 1, 2, 2], {"classes": json.dumps(["cat", "dog", "owl"])})
    val = features([0, 1, 1], {"classes": json.dumps(["dog", "owl"])})  # val folder without cats
    assert aligned_val_labels(train, val, "tr", "va", "k-NN").tolist() == [1, 2, 2]
    odd = features([0, 1], {"classes": json.dumps(["dog", "emu"])})
    with pytest.raises(DataError, match="only in train: cat, owl; only in val: emu"):
        aligned_val_labels(train, odd, "tr", "va", "k-NN")
    # feature files carry integer labels only: a val label no train feature has is refused
    assert aligned_val_labels(features([0, 1, 2]), features([2, 0]), "a", "b", "k-NN").tolist() == [2, 0]
    with pytest.raises(DataError, match=r"2 val features have labels that no train feature has \(3\)"):
        aligned_val_labels(features([0, 1, 2]), features([3, 3, 0]), "a", "b", "k-NN")


def test_cli_refuses_val_labels_absent_from_train_with_exit_2(tmp_path):
    save_features(tmp_path / "train.safetensors", features([0, 0, 1, 1]))
    save_features(tmp_path / "val.safetensors", features([0, 5]))
    result = CliRunner().invoke(app, ["eval", "knn", "--train-features", str(tmp_path / "train.safetensors"),
                                      "--val-features", str(tmp_path / "val.safetensors"), "--k", "1"])
    assert result.exit_code == 2 and "could never be classified correctly" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_report_carries_the_notes(tmp_path):
    save_features(tmp_path / "f.safetensors", features([0, 0, 1, 1, 2, 2]))
    f = str(tmp_path / "f.safetensors")
    result = CliRunner().invoke(app, ["eval", "knn", "--train-features", f, "--val-features", f, "--json"])
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert len(notes) == 2 and "clipped to 6" in notes[0] and "smallest class" in notes[1]
