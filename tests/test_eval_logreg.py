"""Logistic-regression linear probe (sslcli.eval.logreg): solver, choice of l2, protocol, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslcli.config import ModelConfig
from sslcli.errors import DataError, UsageError
from sslcli.eval.logreg import Fit, fit_logreg, holdout_split, logreg_probe, logreg_probe_features, select_l2
from sslcli.eval.weights import WeightsInfo
from sslcli.models import create_backbone
from test_eval_linear import MeanColour

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def planted(n: int, dim: int = 16, classes: int = 4, margin: float = 1.0, seed: int = 0):
    """Gaussian features labelled by a planted linear rule argmax(x W*^T), kept only where the
    best class wins by `margin`: a linearly separable problem with a gap. -> x [n, dim], y [n]."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(classes, dim, generator=g)
    xs, ys = [], []
    while sum(len(y) for y in ys) < n:
        x = torch.randn(4 * n, dim, generator=g)
        top2 = (x @ w_true.T).topk(2, dim=1)
        keep = top2.values[:, 0] - top2.values[:, 1] > margin
        xs.append(x[keep])
        ys.append(top2.indices[keep, 0])
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def newton(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 15):
    """Reference minimiser of mean CE(x W^T + b, y) + l2 / 2 ||W||^2, written independently of the
    code under test: Newton's method in float64 on T = [W | b] [C, D + 1] with the textbook gradient
    (P - Y)^T A / N + l2 [W | 0] and Hessian mean_i (diag(p_i) - p_i p_i^T) kron a_i a_i^T +
    l2 I kron diag(1, .., 1, 0), where a_i = [x_i, 1]; pseudo-inverse, as the loss does not change
    when every bias moves by the same amount. Returns (W [C, D], b [C], final max |gradient|)."""
    n, dim = x.shape
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # [N, D + 1]
    onehot = F.one_hot(y, classes).double()
    mask = torch.ones(dim + 1, dtype=torch.float64)
    mask[-1] = 0  # the bias is not penalised
    theta = torch.zeros(classes, dim + 1, dtype=torch.float64)

    def gradient(theta):
        p = torch.softmax(a @ theta.T, dim=1)  # [N, C]
        return (p - onehot).T @ a / n + l2 * theta * mask, p

    for _ in range(steps):
        grad, p = gradient(theta)
        curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
        hessian = torch.einsum("ncd,ni,nj->cidj", curvature, a, a).reshape(classes * (dim + 1), -1) / n
        hessian += l2 * torch.kron(torch.eye(classes, dtype=torch.float64), torch.diag(mask))
        theta = theta - (torch.linalg.pinv(hessian) @ grad.flatten()).view(classes, dim + 1)
    return theta[:, :dim], theta[:, dim], float(gradient(theta)[0].abs().max())


# ---------------------------------------------------------------- the solver


@pytest.mark.parametrize("l2", [0.01, 0.1, 1.0])
def test_two_point_problem_matches_its_hand_solved_optimum(l2):
    # x = +1 (class 1) and -1 (class 0): by symmetry b = 0 and W = [-d/2, d/2] where d minimises
    # log(1 + e^-d) + l2 d^2 / 4, i.e. l2 d / 2 = 1 / (1 + e^d), solved here by bisection.
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if l2 * mid / 2 > 1 / (1 + math.exp(mid)) else (mid, hi)
    x, y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([1, 0])
    w, b, _ = fit_logreg(x, y, 2, l2)
    torch.testing.assert_close(w, torch.tensor([[-lo / 2], [lo / 2]], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_matches_newtons_method_to_high_precision():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0],
                                                                          dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)  # random labels: not separable, a unique optimum
    w_ref, b_ref, grad = newton(x, y, 3, 0.05)
    assert grad < 1e-12  # the reference itself has converged
    w, b, iterations = fit_logreg(x, y, 3, 0.05)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)  # L-BFGS stops at max |gradient| 1e-7
    torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=0)
    assert 0 < iterations < 1000
    # the protocol's path (standardised, preconditioned, mapped back to raw features) reaches the
    # optimum of the same objective on standardised features
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    wz, bz, _ = newton(z, y, 3, 0.05)
    linear = Fit(x, y, 3, 1000)(0.05)
    torch.testing.assert_close(linear(x.float()).double(), z @ wz.T + bz, atol=1e-4, rtol=0)


def test_recovers_a_planted_linear_separator():
    x, y = planted(600)
    result = logreg_probe_features(x[:400], y[:400], x[400:], y[400:], "cpu")
    assert result["top1"] >= 99.0 and result["top5"] == 100.0
    assert result["protocol"] == "logreg" and result["l2"] in result["l2_grid"]
    assert result["n_fit"] + result["n_holdout"] == 400 and result["n_holdout"] == 80
    assert result["feature_dim"] == 16 and result["num_classes"] == 4 and result["n_val"] == 200
    again = logreg_probe_features(x[:400], y[:400], x[400:], y[400:], "cpu")
    assert again == result  # seeded and deterministic


def test_features_of_any_scale_give_the_same_classifier():
    # standardisation: a feature scaled by 1000 (a CNN's pooled vector vs a ViT's normed CLS)
    # changes nothing in the fitted predictions
    x, y = planted(300, dim=6, classes=3)
    scaled = x * torch.tensor([1000.0, 1, 1, 0.001, 1, 1])
    a = logreg_probe_features(x[:200], y[:200], x[200:], y[200:], "cpu", l2=[1e-2])
    b = logreg_probe_features(scaled[:200], y[:200], scaled[200:], y[200:], "cpu", l2=[1e-2])
    assert a["top1"] == b["top1"] >= 95.0


# ---------------------------------------------------------------- the choice of l2


def test_holdout_split_is_stratified_seeded_and_keeps_every_class_in_the_fit():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    fit, held = holdout_split(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(y)))
    assert torch.bincount(y[held], minlength=4).tolist() == [2, 1, 1, 0]  # round(0.2 n), >= 1, < n
    assert set(y[fit].tolist()) == {0, 1, 2, 3}
    assert torch.equal(holdout_split(y, 0.2, seed=0)[1], held)
    assert any(not torch.equal(holdout_split(y, 0.2, seed=s)[1], held) for s in (1, 2, 3))


def test_ties_go_to_the_stronger_l2_and_one_value_skips_the_holdout():
    x, y = planted(200, dim=4, classes=2, margin=3.0)  # every l2 below separates the holdout
    chosen, record = select_l2(x, y, 2, [1e-3, 1e-2, 1e-1], 0.2, 0, 1000)
    assert set(record["holdout_top1"].values()) == {100.0} and chosen == 1e-1
    chosen, record = select_l2(x, y, 2, [3e-2], 0.2, 0, 1000)
    assert chosen == 3e-2 and record == {"holdout_top1": {}, "n_fit": 200, "n_holdout": 0}


def test_no_image_to_hold_out_is_a_data_error_unless_one_l2_is_given():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])  # one image per class
    with pytest.raises(DataError, match="give a single --l2 value"):
        logreg_probe_features(x, y, x, y, "cpu")
    assert logreg_probe_features(x, y, x, y, "cpu", l2=[1e-3])["top1"] == 100.0


@pytest.mark.parametrize("kwargs", [{"l2": []}, {"l2": [0.0]}, {"l2": [-1e-3]}, {"l2": [float("nan")]},
                                    {"holdout": 0.0}, {"holdout": 1.0}, {"max_iter": 0}])
def test_bad_arguments_are_usage_errors(kwargs):
    x, y = planted(40, dim=4, classes=2)
    with pytest.raises(UsageError):
        logreg_probe_features(x, y, x, y, "cpu", **kwargs)


def test_bad_features_are_data_errors():
    x, y = planted(40, dim=4, classes=2)
    with pytest.raises(DataError, match="train features must be"):
        logreg_probe_features(x[:, None], y, x, y, "cpu")
    with pytest.raises(DataError, match="val labels must be >= 0"):
        logreg_probe_features(x, y, x, torch.full_like(y, -1), "cpu")
    with pytest.raises(DataError, match="train features hold NaN"):
        logreg_probe_features(torch.full_like(x, float("nan")), y, x, y, "cpu")


# ---------------------------------------------------------------- on images


def write_colours(root: Path, per_class: int, colours: dict = COLOURS) -> str:
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), tuple(max(0, c - 3 * i) for c in rgb)).save(root / name / f"{i:02d}.png")
    return str(root)


def test_images_end_to_end_with_val_classes_mapped_by_name(tmp_path):
    train = write_colours(tmp_path / "train", 6)
    val = write_colours(tmp_path / "val", 3, {"green": (0, 255, 0), "red": (255, 0, 0)})  # no blue
    fake = MeanColour().train()
    (tmp_path / "weights.safetensors").write_bytes(b"-")  # the cache key reads its size and mtime
    info = WeightsInfo(path=str(tmp_path / "weights.safetensors"), arch="mean-colour", image_size=32)
    result = logreg_probe(fake, info, train, val, "cpu", workers=0, cache=tmp_path / "cache")
    assert result["top1"] == 100.0 and result["num_classes"] == 3 and result["n_val"] == 6
    assert (result["n_last_blocks"], result["avgpool"], result["feature"]) == (1, False, "pooled vector")
    assert fake.modes == {False} and fake.training  # extracted in eval mode, mode restored
    cached = logreg_probe(MeanColour(), info, train, val, "cpu", workers=0, cache=tmp_path / "cache")
    assert cached == result
    extra = write_colours(tmp_path / "extra", 2, {"cyan": (0, 255, 255), "red": (255, 0, 0)})
    with pytest.raises(DataError, match="only in val: cyan"):
        logreg_probe(fake, info, train, extra, "cpu", workers=0)


def test_a_three_block_vit_gets_its_three_blocks_by_default(tmp_path):
    train = write_colours(tmp_path / "train", 4)
    vit = create_backbone(ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0, kwargs={
        "img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 3, "num_heads": 2})).eval()
    info = WeightsInfo(path="x", arch="vit_small_patch16_224", kwargs={"depth": 3, "embed_dim": 16}, image_size=16)
    result = logreg_probe(vit, info, train, train, "cpu", l2=[1e-2], workers=0)
    assert (result["n_last_blocks"], result["avgpool"], result["feature_dim"]) == (3, False, 48)
    assert result["feature"] == "CLS of the last 3 blocks (of 3)"
    with pytest.raises(UsageError, match=r"1\.\.3 for vit_small_patch16_224 \{depth: 3, embed_dim: 16\}, got 4"):
        logreg_probe(vit, info, train, train, "cpu", n_last_blocks=4, workers=0)
