"""Logistic-regression linear probe, `--protocol logreg` (the default; docs/evals.md "Linear probe").

DINOv2's logistic-regression evaluation, in torch (no cuML / sklearn): it converges on any
dataset size, where DINO's SGD recipe (`--protocol dino`, sslcli.eval.linear) makes 2 steps per
epoch on 2,000 images. Steps:
1. Features: the probe features (sslcli.eval.probe: DINO's n last CLS tokens / patch average,
   capped at the model's depth) of every train and val image, extracted once with the evaluation
   transform (no augmentation) and cached with `--cache`.
2. Each fit standardises its training rows per dimension (mean 0, std 1; constant dimensions are
   only centred), so one small grid of strengths suits every backbone whatever its feature
   scale; the weights are mapped back to raw features afterwards.
3. Objective: mean cross-entropy + (l2 / 2) ||W||^2 on the standardised features (bias not
   penalised), minimised full batch by torch.optim.LBFGS (strong-Wolfe line search, history 20)
   from W = 0, preconditioned by the features' covariance (`Fit`), in float32 on the GPU when
   there is one (else the CPU), until max |gradient| <= GRAD_TOL, no further progress, or
   `max_iter` iterations (1000, as DINOv2); the report says whether it stopped before max_iter.
4. Choice of l2: a stratified, seeded holdout of `holdout` (20 %) of each class's train images
   (at least 1 and at most n_c - 1, none from single-image classes); every l2 of the grid is fitted
   on the rest (strongest first, each warm-started from the previous solution) and scored on the
   holdout; the best top-1 wins, ties going to the stronger l2. A one-value grid skips this.
5. Refit on all of train with the chosen l2; score val: top-1 / top-min(5, C), percent.
Differences from DINOv2: a 20 % stratified holdout instead of a random 10 % (on small data 10 %
is a few dozen images), standardised features, and a 7-value grid (1e-6 .. 1, one per decade)
instead of 45 values of C.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.errors import DataError, TrainingError, UsageError
from sslcli.eval.classes import remap, val_label_map
from sslcli.eval.featurefiles import FeatureCache
from sslcli.eval.linear import score
from sslcli.eval.pipelines import OnBatch, linear_features
from sslcli.eval.probe import describe_probe, resolve_probe
from sslcli.eval.weights import WeightsInfo
from sslcli.models.backbone import Backbone

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)  # one per decade: holdout accuracy varies slowly
HOLDOUT = 0.2  # fraction of each class's train images held out to choose l2
MAX_ITER = 1000
GRAD_TOL = {torch.float64: 1e-7, torch.float32: 1e-5}  # float32 sums cannot resolve finer gradients
CHUNK = 65536  # rows per logits block: memory is bounded by CHUNK x classes


# ---------------------------------------------------------------- one fit


def fit_logreg(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = MAX_ITER,
               init: tuple[Tensor, Tensor] | None = None,
               penalty: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """argmin over W [C, D], b [C] of mean_i CE(x_i W^T + b, y_i) + l2 / 2 sum_j p_j ||W[:, j]||^2,
    by L-BFGS; p = `penalty` [D] (default all 1: the plain l2 / 2 ||W||^2).

    x [N, D] float (its dtype and device are used), y [N] int64 in 0..C-1. init: (W, b) to start
    from (default zeros). Returns (W, b, iterations made). TrainingError if the weights end non-finite.
    """
    p = torch.ones(x.shape[1], dtype=x.dtype, device=x.device) if penalty is None else penalty
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 1,
                                  tolerance_grad=GRAD_TOL.get(x.dtype, 1e-5), tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:  # full-batch loss; logits built CHUNK rows at a time
        optimizer.zero_grad(set_to_none=False)
        reg = 0.5 * l2 * (w * w * p).sum()
        reg.backward()
        total = reg.detach()
        for start in range(0, len(y), CHUNK):
            part = F.cross_entropy(x[start:start + CHUNK] @ w.T + b, y[start:start + CHUNK],
                                   reduction="sum") / len(y)
            part.backward()
            total = total + part.detach()
        return total

    optimizer.step(closure)
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise TrainingError(f"logistic regression: the weights became non-finite (l2 {l2:g})")
    iterations = int(optimizer.state[w].get("n_iter", 0))
    return w.detach(), b.detach(), iterations


def standardize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D] -> (z = (x - mean) / scale [N, D], mean [D], scale [D]); scale = the std, or 1 for
    constant dimensions: std 0, or at most 1e-5 x the column's mean |x| (rounding noise around a
    constant, which dividing by the std would blow up to unit variance). Only centred, those."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    constant = (std == 0) | (std <= 1e-5 * x.abs().mean(dim=0))
    scale = torch.where(constant, torch.ones_like(std), std)
    return (x - mean) / scale, mean, scale


def to_linear(w: Tensor, b: Tensor, mean: Tensor, scale: Tensor) -> nn.Linear:
    """The classifier of standardised features as an nn.Linear on raw features (float32):
    z W^T + b = x (W / scale)^T + (b - (W / scale) mean)."""
    raw = w / scale
    linear = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
    with torch.no_grad():
        linear.weight.copy_(raw.float())
        linear.bias.copy_((b - raw @ mean).float())
    return linear.eval()


class Fit:
    """The l2-regularised fits of one training set x [N, D], y [N] (warm-started in call order).

    Objective (module doc): mean CE(z W^T + b) + l2 / 2 ||W||^2 on the standardised features z.
    Solved preconditioned, which changes the path, not the optimum: with the covariance
    z^T z / N = E diag(s) E^T, the features are rotated, r = z E [N, D], and scaled per axis by
    d = (s + l2)^-1/2; L-BFGS then fits V = W E / d with the penalty l2 / 2 sum_j d_j^2 ||V_j||^2
    (the same ||W||^2). Treating the cross-entropy curvature as one number c, its Hessian is near
    (c s_j + l2) / (s_j + l2) per axis instead of c s_j + l2: the spread of the feature variances
    (and a rank below D, as concatenated LayerNorm outputs have) no longer slows L-BFGS; what is
    left is the spread of c over the samples, which weak strengths on nearly separable features
    still feel (they may use the whole max_iter). W = (V d) E^T is mapped back by to_linear.
    """

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, max_iter: int):
        z, self.mean, self.scale = standardize(x)
        spectrum, self.basis = torch.linalg.eigh(z.T @ z / len(z))  # [D], [D, D]
        self.spectrum = spectrum.clamp_min(0)  # round-off makes null directions slightly negative
        self.rotated = z @ self.basis  # [N, D]
        self.y, self.num_classes, self.max_iter = y, num_classes, max_iter
        self.last: tuple[Tensor, Tensor] | None = None  # (W E [C, D], b [C]) of the previous fit
        self.iterations = 0

    def __call__(self, l2: float) -> nn.Linear:
        d = (self.spectrum + l2).rsqrt()  # [D]
        init = None if self.last is None else (self.last[0] / d, self.last[1])
        v, b, self.iterations = fit_logreg(self.rotated * d, self.y, self.num_classes, l2, self.max_iter, init,
                                           penalty=d * d)
        self.last = (v * d, b)
        return to_linear(self.last[0] @ self.basis.T, b, self.mean, self.scale)


# ---------------------------------------------------------------- choosing l2


def holdout_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, holdout indices), int64 sorted, of labels y [N]: per class, a seeded random
    max(1, round(fraction x n_c)) images, at most n_c - 1 (none from single-image classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = y.cpu()
    fit, held = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        h = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:h])
        fit.append(idx[h:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def select_l2(x: Tensor, y: Tensor, num_classes: int, grid: Sequence[float], holdout: float, seed: int,
              max_iter: int) -> tuple[float, dict]:
    """The l2 of `grid` with the best holdout top-1 (ties: the stronger) and the selection record
    {"holdout_top1": {"<l2>": top-1}, "n_fit", "n_holdout"}. x [N, D], y [N] on one device."""
    grid = sorted(grid, reverse=True)  # strongest first: each fit warm-starts the next, weaker one
    if len(grid) == 1:
        return grid[0], {"holdout_top1": {}, "n_fit": len(y), "n_holdout": 0}
    fit_idx, held_idx = (i.to(y.device) for i in holdout_split(y, holdout, seed))
    if len(held_idx) == 0:
        raise DataError("logistic regression: choosing the L2 strength needs a held-out part of train, "
                        "but no class has 2 training images; give a single --l2 value")
    fit = Fit(x[fit_idx], y[fit_idx], num_classes, max_iter)
    held_x, held_y = x[held_idx].float(), y[held_idx]
    scores = {l2: score(fit(l2), held_x, held_y)[0] for l2 in grid}
    best = max(grid, key=lambda l2: (scores[l2], l2))  # ties -> the larger l2
    return best, {"holdout_top1": {f"{l2:g}": scores[l2] for l2 in grid}, "n_fit": len(fit_idx),
                  "n_holdout": len(held_idx)}


# ---------------------------------------------------------------- the protocol on features


def _check_args(grid: Sequence[float], holdout: float, max_iter: int) -> None:
    if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                       for v in grid):
        raise UsageError(f"logistic regression: l2 needs one or more finite numbers > 0, got {list(grid)!r}")
    if not (isinstance(holdout, (int, float)) and 0 < holdout < 1):
        raise UsageError(f"logistic regression: holdout must be a fraction in (0, 1), got {holdout!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UsageError(f"logistic regression: max_iter must be an integer >= 1, got {max_iter!r}")


def _check_features(x: Tensor, y: Tensor, role: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DataError(f"logistic regression: {role} features must be [N, D] with labels [N], N > 0, got "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")
    if int(y.min()) < 0:
        raise DataError(f"logistic regression: {role} labels must be >= 0 (unlabeled images cannot be scored)")
    if not torch.isfinite(x).all():
        raise DataError(f"logistic regression: {role} features hold NaN or inf (a diverged backbone?)")


def _working_copy(x: Tensor, device: torch.device) -> Tensor:
    """x [N, D] as float32 on `device`, or on the CPU when it does not fit there."""
    try:
        return x.to(device=device, dtype=torch.float32)
    except torch.OutOfMemoryError:
        return x.to(dtype=torch.float32)


def logreg_probe_features(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                          device: torch.device | str, l2: Sequence[float] = L2_GRID, holdout: float = HOLDOUT,
                          seed: int = 0, max_iter: int = MAX_ITER, num_classes: int | None = None) -> dict:
    """The logreg protocol (module doc) on features: train [N, D] / val [M, D] float, labels int64
    with val labels among train's (callers check, sslcli.eval.classes). num_classes: default 1 +
    the largest train label.

    Returns {"protocol": "logreg", "top1", "top5", "l2" (chosen), "l2_grid", "holdout_top1"
    ({"<l2>": top-1}), "n_fit", "n_holdout", "iterations" (final fit), "converged" (stopped before
    max_iter), "max_iter", "feature_dim", "num_classes", "n_train", "n_val"}; percentages 0-100.
    """
    _check_args(l2, holdout, max_iter)
    _check_features(train_x, train_y, "train")
    _check_features(val_x, val_y, "val")
    device = torch.device(device)
    classes = int(train_y.max()) + 1 if num_classes is None else num_classes
    x, y = _working_copy(train_x, device), train_y.to(device)
    y = y.to(x.device)
    chosen, record = select_l2(x, y, classes, l2, holdout, seed, max_iter)
    final = Fit(x, y, classes, max_iter)
    linear = final(chosen)
    top1, top5 = score(linear, val_x.float(), val_y)
    return dict(record, protocol="logreg", top1=top1, top5=top5, l2=chosen, l2_grid=sorted(l2),
                iterations=final.iterations, converged=final.iterations < max_iter, max_iter=max_iter,
                feature_dim=train_x.shape[1], num_classes=classes, n_train=len(train_y), n_val=len(val_y))


# ---------------------------------------------------------------- the protocol on images


def logreg_probe(backbone: Backbone, info: WeightsInfo, train: str, val: str, device: torch.device | str,
                 n_last_blocks: int | None = None, avgpool: bool | None = None, l2: Sequence[float] = L2_GRID,
                 holdout: float = HOLDOUT, seed: int = 0, max_iter: int = MAX_ITER,
                 cache: FeatureCache | Path | None = None, image_size: int | None = None, batch_size: int = 256,
                 workers: int = 4, on_batch: OnBatch = None) -> dict:
    """The logreg protocol on labeled folders / built-in data `train` and `val` (module doc).

    Probe features as sslcli.eval.probe resolves them for this backbone (defaults: DINO's rule,
    capped at the depth), extracted once (cached in `cache`); val classes mapped to train's by
    name (DataError for a val class that train lacks, or an unlabeled dataset).
    Returns logreg_probe_features' dict plus "n_last_blocks", "avgpool", "feature" (in words) and
    "image_size" (crop, pixels).
    """
    n, avg = resolve_probe(backbone, n_last_blocks, avgpool, info.model_name())
    sets = [linear_features(backbone, info, spec, device, n, avg, cache, image_size, batch_size, workers,
                            on_batch) for spec in (train, val)]
    for fs, role, spec in zip(sets, ("train", "val"), (train, val)):
        if fs.labels is None:
            raise DataError(f"linear probe: the {role} dataset '{spec}' is unlabeled; the probe needs "
                            "class folders (ROOT/<class>/<image>)")
    tr, va = sets
    classes = json.loads(tr.meta["classes"])
    mapping = val_label_map(classes, json.loads(va.meta["classes"]), train, val, "linear probe")
    result = logreg_probe_features(tr.features, tr.labels, va.features, remap(va.labels, mapping), device, l2,
                                   holdout, seed, max_iter, num_classes=len(classes))
    return dict(result, n_last_blocks=n, avgpool=avg, feature=describe_probe(backbone, n, avg),
                image_size=image_size or info.image_size)
