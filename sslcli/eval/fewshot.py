"""Few-shot nearest-centroid episodes (docs/evals.md "Few-shot", as in Ericsson et al.).

Each episode: `ways` classes drawn at random (without replacement) from the classes that have at
least shots + queries images; per class `shots` + `queries` distinct images; prototype = mean of
the support features; each query is assigned to the prototype at the smallest squared Euclidean
distance. Features are used raw (no L2, no centering). Sampling uses numpy's Generator(seed).

Small data (docs/evals.md "Small data"): a class with fewer than shots + queries images cannot
give distinct support and query images, so it is left out of the episodes (`skipped_classes`
lists them for the report's notes, never silently); fewer than `ways` classes left -> DataError.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from sslcli.errors import DataError, UsageError

METRICS = ("accuracy", "mean-per-class")
EPISODES_PER_BATCH = 64


def fewshot_episodes(
    features: Tensor,
    labels: Tensor,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    metric: str = "accuracy",
) -> dict:
    """Mean episode accuracy (percent) and its 95% interval 1.96 * std / sqrt(episodes).

    Shapes: features [N, D] float, labels [N] int (>= 0). std is the population std (ddof 0)
    of the per-episode accuracies. `metric="mean-per-class"` averages per-class accuracies within
    each episode (equal to accuracy for these balanced episodes) and is reported under its name.

    Returns {"accuracy", "ci95", "episodes", "ways", "shots", "queries", "metric"}.
    """
    _check_args(ways, shots, queries, episodes, metric)
    _check_data(features, labels)
    index = sample_episodes(labels, ways, shots, queries, episodes, seed)  # [E, W, S+Q]
    accs = np.concatenate(
        [
            _episode_accuracies(features, index[i : i + EPISODES_PER_BATCH], shots, metric)
            for i in range(0, episodes, EPISODES_PER_BATCH)
        ]
    )
    return {
        "accuracy": float(accs.mean()),
        "ci95": float(1.96 * accs.std() / math.sqrt(episodes)),
        "episodes": episodes,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "metric": metric,
    }


def sample_episodes(
    labels: Tensor, ways: int, shots: int, queries: int, episodes: int, seed: int
) -> np.ndarray:
    """Image indices of every episode, int64 [episodes, ways, shots + queries].

    labels [N]. For each episode: `ways` eligible classes (rng.choice without replacement over
    the sorted eligible class ids), then for each class in that order shots + queries distinct
    images (rng.choice without replacement over its images in index order); the first `shots`
    are the support, the rest the queries. Raises DataError when fewer than `ways` classes have
    shots + queries images.
    """
    per_class = shots + queries
    by_class = _indices_by_class(labels.detach().cpu().numpy())
    eligible = [c for c in sorted(by_class) if len(by_class[c]) >= per_class]
    if len(eligible) < ways:
        raise DataError(
            f"few-shot: {ways}-way needs {ways} classes with at least {per_class} images "
            f"({shots} shots + {queries} queries), but only {len(eligible)} of "
            f"{len(by_class)} classes have that many"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    out = np.empty((episodes, ways, per_class), dtype=np.int64)
    for e in range(episodes):
        for w, c in enumerate(rng.choice(eligible, size=ways, replace=False)):
            out[e, w] = rng.choice(by_class[int(c)], size=per_class, replace=False)
    return out


def skipped_classes(labels: Tensor, shots: int, queries: int) -> dict[int, int]:
    """{class id: image count} of the classes of labels [N] with fewer than shots + queries images
    (left out of every episode), in class order."""
    counts = np.bincount(labels.detach().cpu().numpy().astype(np.int64).clip(min=0))
    return {c: int(n) for c, n in enumerate(counts) if 0 < n < shots + queries}


def fewshot_notes(labels: Tensor, shots: int, queries: int, class_names: list[str] | None = None) -> list[str]:
    """The report's note naming the classes too small for an episode (none -> [])."""
    skipped = skipped_classes(labels, shots, queries)
    if not skipped:
        return []
    total = len(np.unique(labels.detach().cpu().numpy()))

    def name(c: int) -> str:
        return class_names[c] if class_names and c < len(class_names) else str(c)

    shown = ", ".join(f"{name(c)} ({n})" for c, n in list(skipped.items())[:8])
    more = f" (+{len(skipped) - 8} more)" if len(skipped) > 8 else ""
    return [f"few-shot: {len(skipped)} of {total} classes have fewer than shots + queries = {shots + queries} "
            f"images and never appear in an episode: {shown}{more}"]


def _episode_accuracies(features: Tensor, index: np.ndarray, shots: int, metric: str) -> np.ndarray:
    """Accuracy (percent) of each episode, float64 [E].

    index [E, W, S+Q] into features [N, D]; the first `shots` of each row are the support.
    """
    e, w, per_class = index.shape
    idx = torch.as_tensor(index, device=features.device)
    x = features[idx.reshape(-1)].reshape(e, w, per_class, -1)
    x = x.double() if features.dtype == torch.float64 else x.float()
    prototypes = x[:, :, :shots].mean(dim=2)  # [E, W, D]
    query = x[:, :, shots:].reshape(e, w * (per_class - shots), -1)  # [E, W*Q, D]
    # [E, W*Q, W]; argmin of the distance = argmin of the squared distance
    dist = torch.cdist(query, prototypes, compute_mode="donot_use_mm_for_euclid_dist")
    predicted = dist.argmin(dim=2).reshape(e, w, per_class - shots)  # [E, W, Q]
    truth = torch.arange(w, device=features.device).view(1, w, 1)
    correct = (predicted == truth).double()  # [E, W, Q]
    if metric == "mean-per-class":
        acc = correct.mean(dim=2).mean(dim=1)
    else:
        acc = correct.reshape(e, -1).mean(dim=1)
    return (acc * 100.0).cpu().numpy()


def _indices_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    """{class id: indices of its images in increasing order} for labels [N]."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {int(c): g for c, g in zip(classes, groups)}


def _check_args(ways: int, shots: int, queries: int, episodes: int, metric: str) -> None:
    """Integers ways >= 2, shots, queries, episodes >= 1; a known metric name."""
    for name, value, low in (
        ("ways", ways, 2),
        ("shots", shots, 1),
        ("queries", queries, 1),
        ("episodes", episodes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"few-shot: {name} must be an integer >= {low}, got {value!r}")
    if metric not in METRICS:
        raise UsageError(f"few-shot: unknown metric {metric!r} (choose from {', '.join(METRICS)})")


def _check_data(features: Tensor, labels: Tensor) -> None:
    """features [N, D], labels [N] integers >= 0."""
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise DataError(
            f"few-shot: features must be [N, D] with labels [N], "
            f"got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"few-shot: labels must be integers, got {labels.dtype}")
    if labels.numel() and int(labels.min()) < 0:
        raise DataError("few-shot: labels must be >= 0 (unlabeled images cannot form episodes)")
