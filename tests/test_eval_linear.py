"""Linear probe (sslcli.eval.linear): features, classifier init, lr scaling, both protocols, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from sslcli.config import ModelConfig
from sslcli.errors import DataError, UsageError
from sslcli.eval.linear import (
    linear_probe,
    make_classifier,
    make_optimizer,
    scaled_lr,
    score,
)
from sslcli.eval.probe import default_probe, probe_features, resolve_probe
from sslcli.eval.weights import WeightsInfo
from sslcli.models import create_backbone

VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
KEYS = {"protocol", "top1", "top5", "best_top1", "best_epoch", "best_top5", "epochs", "n_last_blocks",
        "avgpool", "feature_dim", "lr", "batch_size"}


def tiny_vit(**extra):
    return create_backbone(ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0,
                                       kwargs=dict(VIT_KWARGS, **extra))).eval()


def info(size: int = 32) -> WeightsInfo:
    return WeightsInfo(path="x", arch="test", image_size=size)


def write_colours(root: Path, per_class: int, colours: dict = COLOURS, size: int = 40) -> Path:
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = tuple(max(0, c - 3 * i) for c in rgb)  # slightly different images
            Image.new("RGB", (size, size), shade).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """(train, val) folders: 3 classes of solid colours, 12 and 4 images each."""
    base = tmp_path_factory.mktemp("colours")
    return str(write_colours(base / "train", 12)), str(write_colours(base / "val", 4))


class MeanColour(torch.nn.Module):
    """A fake CNN 'backbone': the mean RGB of the image, [B, 3] (linearly separable colours)."""

    is_vit = False
    arch = "mean-colour"
    embed_dim = 3

    def __init__(self):
        super().__init__()
        self.modes = set()

    def forward(self, x):
        self.modes.add(self.training)
        return x.mean(dim=(2, 3))


# ---------------------------------------------------------------- features


def test_probe_features_vit_concatenates_cls_tokens_and_patch_mean():
    vit, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = probe_features(vit, x, 2, True)
        blocks = vit.last_blocks(x, 2)
        f1 = probe_features(vit, x, 1, False)
    assert f.shape == (2, 3 * 32)
    torch.testing.assert_close(f[:, :32], blocks[0][0])
    torch.testing.assert_close(f[:, 32:64], blocks[1][0])
    torch.testing.assert_close(f[:, 64:], blocks[1][1].mean(dim=1))
    assert f1.shape == (2, 32)
    torch.testing.assert_close(f1, vit(x), atol=1e-5, rtol=1e-5)  # last CLS after norm = forward


def test_probe_features_cnn_is_the_pooled_vector():
    resnet = create_backbone(ModelConfig(arch="resnet18", drop_path_rate=0.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = probe_features(resnet, x, 4, True)  # ignored for CNNs
        torch.testing.assert_close(f, resnet(x))
    assert f.shape == (2, 512)
    assert default_probe(resnet) == (1, False)
    assert resolve_probe(resnet, None, None) == (1, False)
    with pytest.raises(UsageError, match="ViTs only"):
        resolve_probe(resnet, 4, None)


def test_default_probe_follows_dino_capped_at_the_depth():
    assert default_probe(tiny_vit()) == (2, False)  # embed 32 < 768: ViT-S rule, 4 capped at 2 blocks
    assert default_probe(tiny_vit(depth=5)) == (4, False)
    big = create_backbone(ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0, kwargs=dict(
        VIT_KWARGS, embed_dim=768, depth=1, num_heads=12)))
    assert default_probe(big) == (1, True)
    assert resolve_probe(tiny_vit(), None, None) == (2, False)
    with pytest.raises(UsageError, match="1..2"):
        resolve_probe(tiny_vit(), 3, None)  # an explicit n is checked, not capped
    assert resolve_probe(tiny_vit(), 2, True) == (2, True)


# ---------------------------------------------------------------- classifier, optimiser, scoring


def test_classifier_init_is_seeded_normal_001_with_zero_bias():
    linear = make_classifier(2000, 100, seed=3)
    assert linear.weight.shape == (100, 2000)
    assert abs(linear.weight.std().item() - 0.01) < 2e-4
    assert abs(linear.weight.mean().item()) < 2e-4
    assert torch.count_nonzero(linear.bias) == 0
    torch.testing.assert_close(linear.weight, make_classifier(2000, 100, seed=3).weight, rtol=0, atol=0)
    assert not torch.equal(linear.weight, make_classifier(2000, 100, seed=4).weight)


def test_lr_scaling_and_cosine_schedule():
    assert scaled_lr(0.001, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.001, 256) == pytest.approx(0.001)
    optimizer, scheduler = make_optimizer(make_classifier(4, 2), 0.001, 512, epochs=4)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0.0)
    lrs = []
    for _ in range(4):
        lrs.append(group["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.002 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected)
    assert group["lr"] == pytest.approx(0.0)


def test_score_top1_top5():
    linear = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(6))  # logits = features
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0],   # y 0: rank 0
                      [1.0, 2, 0, 0, 0, 0],   # y 0: rank 1 (top-5 only)
                      [5.0, 4, 3, 2, 1, 0],   # y 5: rank 5 (miss)
                      [0.0, 0, 1, 0, 0, 0]])  # y 2: rank 0
    y = torch.tensor([0, 0, 5, 2])
    assert score(linear, x, y, batch_size=3) == pytest.approx((50.0, 75.0))
    two = torch.nn.Linear(6, 2, bias=False)  # fewer than 5 classes: top-5 = top-2 = 100
    assert score(two, x, torch.tensor([0, 1, 1, 0]))[1] == 100.0


# ---------------------------------------------------------------- protocols


def test_fast_protocol_separates_solid_colours(colours):
    train, val = colours
    epochs_seen = []
    result = linear_probe(MeanColour(), info(), train, val, "cpu", epochs=30, batch_size=8, lr=1.0,
                          fast=True, workers=0, on_epoch=lambda e, s: epochs_seen.append((e, s)))
    assert KEYS <= set(result)
    assert result["protocol"] == "fast-linear"
    assert result["top1"] == 100.0 and result["top5"] == 100.0
    assert result["best_top1"] == 100.0
    assert result["feature_dim"] == 3 and result["lr"] == pytest.approx(1.0 * 8 / 256)
    assert [e for e, _ in epochs_seen] == list(range(1, 31))
    assert epochs_seen[-1][1]["loss"] < epochs_seen[0][1]["loss"]
    again = linear_probe(MeanColour(), info(), train, val, "cpu", epochs=30, batch_size=8, lr=1.0,
                         fast=True, workers=0)
    assert again == result  # seeded


def test_full_protocol_runs_on_a_tiny_vit(colours):
    train, val = colours
    vit = tiny_vit()
    result = linear_probe(vit, info(), train, val, "cpu", epochs=2, batch_size=16, n_last_blocks=2,
                          avgpool=True, workers=0, image_size=32)
    assert KEYS <= set(result)
    assert result["protocol"] == "dino-linear"
    assert (result["n_last_blocks"], result["avgpool"], result["feature_dim"]) == (2, True, 96)
    assert result["epochs"] == 2 and result["batch_size"] == 16
    assert result["best_top1"] >= result["top1"] and 1 <= result["best_epoch"] <= 2
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert not vit.training
    assert result == linear_probe(vit, info(), train, val, "cpu", epochs=2, batch_size=16, n_last_blocks=2,
                                  avgpool=True, workers=0, image_size=32)


@pytest.mark.parametrize("fast", [False, True])
def test_backbone_runs_in_eval_mode_and_its_mode_is_restored(colours, fast):
    fake = MeanColour().train()
    linear_probe(fake, info(), *colours, "cpu", epochs=1, batch_size=16, fast=fast, workers=0)
    assert fake.modes == {False} and fake.training


def test_full_protocol_leaves_the_global_rng_alone(colours):
    train, val = colours
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    linear_probe(MeanColour(), info(), train, val, "cpu", epochs=1, batch_size=16, workers=0)
    torch.testing.assert_close(torch.rand(3), expected)


# ---------------------------------------------------------------- bad input


def test_unlabeled_folder_is_a_data_error(colours, tmp_path):
    train, val = colours
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match=f"'{tmp_path}' is unlabeled"):
        linear_probe(MeanColour(), info(), str(tmp_path), val, "cpu", epochs=1, fast=True, workers=0)
    with pytest.raises(DataError, match="val dataset .* is unlabeled"):
        linear_probe(MeanColour(), info(), train, str(tmp_path), "cpu", epochs=1, fast=True, workers=0)


def test_different_class_sets_are_a_data_error(colours, tmp_path):
    train, _ = colours
    other = write_colours(tmp_path / "val", 2, {"blue": (0, 0, 255), "cyan": (0, 255, 255),
                                                 "red": (255, 0, 0)})
    with pytest.raises(DataError, match=f"'{other}'.*only in train: green; only in val: cyan"):
        linear_probe(MeanColour(), info(), train, str(other), "cpu", epochs=1, fast=True, workers=0)


def test_missing_folder_is_a_data_error(colours, tmp_path):
    with pytest.raises(DataError):
        linear_probe(MeanColour(), info(), str(tmp_path / "nope"), colours[1], "cpu", fast=True, workers=0)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")},
                                    {"workers": -1}, {"image_size": 0}, {"n_last_blocks": 2}])
def test_bad_arguments_are_usage_errors(colours, kwargs):
    with pytest.raises(UsageError):
        linear_probe(MeanColour(), info(), *colours, "cpu", fast=True, **kwargs)
