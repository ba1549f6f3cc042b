"""Weighted k-NN classification of frozen features (DINO protocol, docs/evals.md "k-NN").

For every test feature: cosine similarities to all training features, the top-k training items,
class score = sum of exp(s_j / T) over the top-k items of that class, classes ranked by score.
The test set is processed in chunks so memory stays bounded (chunk x N similarities at a time)
and any test-set size works. Everything runs on the device of `train_features`.

Small training sets (docs/evals.md "Small data"): a k above the number N of training images is
clipped to N (every training image votes; the key keeps the requested k), and a k above the image
count of the smallest training class means that class's images cannot fill their vote with
their own class. Both are computed as asked and reported by `knn_notes`, never silently.
Val labels must occur in train (sslcli.eval.classes checks that before the vote).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslcli.config import KNN_HEADLINE_K, KNN_KS, KNN_TEMPERATURE
from sslcli.errors import DataError, UsageError

# The k-NN protocol's defaults, defined here only (eval options, CLI flags and the online
# monitor read them): neighbour counts, the k of the headline top-1, the vote temperature.


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict:
    """Weighted k-NN top-1 / top-5 accuracy (percent) for every k in `ks`.

    Shapes: train_features [N, D], train_labels [N] int, test_features [M, D], test_labels [M] int.
    Features are L2-normalised here. A k larger than N is clipped to N (the key keeps the
    requested k). `num_classes` defaults to 1 + the largest label seen.

    Returns `{"k": {"10": {"top1": .., "top5": ..}, ...}, "top1": <top-1 at k=20, or at the
    first k when 20 is not requested>}`.
    """
    ks = _check_ks(ks)
    _check_args(temperature, chunk_size)
    _check_data(train_features, train_labels, test_features, test_labels)
    num_classes = _num_classes(train_labels, test_labels, num_classes)
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    clipped = [min(k, train.shape[0]) for k in ks]
    hits1 = torch.zeros(len(ks), dtype=torch.long, device=device)
    hits5 = torch.zeros(len(ks), dtype=torch.long, device=device)
    for start in range(0, test_features.shape[0], chunk_size):
        feats = test_features[start : start + chunk_size].to(device).float()
        targets = test_labels[start : start + chunk_size].to(device=device, dtype=torch.long)
        feats = F.normalize(feats, dim=1)
        h1, h5 = _chunk_hits(feats, targets, train, train_labels, clipped, temperature, num_classes)
        hits1 += h1
        hits5 += h5
    return _metrics(ks, hits1.tolist(), hits5.tolist(), test_features.shape[0])


@torch.no_grad()
def _chunk_hits(
    feats: Tensor,
    targets: Tensor,
    train: Tensor,
    train_labels: Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
) -> tuple[Tensor, Tensor]:
    """Top-1 and top-5 hit counts, each LongTensor [len(ks)], for one chunk.

    feats [B, D] and train [N, D] are L2-normalised; targets [B]; every k <= N.
    The top-max(k) neighbours are found once (sorted) and sliced for each k.
    """
    similarity = feats @ train.T  # [B, N]
    sims, indices = similarity.topk(max(ks), dim=1, largest=True, sorted=True)  # [B, kmax]
    neighbour_labels = train_labels[indices]  # [B, kmax]
    weights = (sims / temperature).exp()  # [B, kmax]
    hits1, hits5 = [], []
    for k in ks:
        scores = torch.zeros(feats.shape[0], num_classes, device=feats.device, dtype=weights.dtype)
        scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # [B, C]
        rank = _target_rank(scores, targets)
        hits1.append((rank == 0).sum())
        hits5.append((rank < min(5, k, num_classes)).sum())
    return torch.stack(hits1), torch.stack(hits5)


def _target_rank(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based position of each target class in a stable descending sort of its scores row.

    scores [B, C], targets [B] -> LongTensor [B]. Equal scores keep class-index order, which is
    what `scores.sort(1, descending=True, stable=True)` gives; it only matters for classes
    with equal (in practice: zero) scores.
    """
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    classes = torch.arange(scores.shape[1], device=scores.device)[None, :]  # [1, C]
    above = (scores > target_scores).sum(1)
    tied_before = ((scores == target_scores) & (classes < targets[:, None])).sum(1)
    return above + tied_before


def _metrics(ks: list[int], hits1: list[int], hits5: list[int], total: int) -> dict:
    """The spec's JSON metrics from hit counts (percentages 0-100)."""
    per_k = {
        str(k): {"top1": h1 * 100.0 / total, "top5": h5 * 100.0 / total}
        for k, h1, h5 in zip(ks, hits1, hits5)
    }
    headline = str(KNN_HEADLINE_K) if KNN_HEADLINE_K in ks else str(ks[0])
    return {"k": per_k, "top1": per_k[headline]["top1"]}


def _check_ks(ks: Sequence[int]) -> list[int]:
    """Positive integer ks, duplicates dropped, order kept."""
    if isinstance(ks, int):
        ks = [ks]
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"k-NN: every k must be a positive integer, got {k!r}")
        if k not in out:
            out.append(k)
    if not out:
        raise UsageError("k-NN: give at least one k")
    return out


def _check_args(temperature: float, chunk_size: int) -> None:
    """Temperature > 0 and a positive chunk size."""
    if not temperature > 0:
        raise UsageError(f"k-NN: temperature must be > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UsageError(f"k-NN: chunk size must be a positive integer, got {chunk_size!r}")


def _check_data(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
    """Shapes [N, D], [N], [M, D], [M] with N, M > 0, integer labels >= 0."""
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"k-NN: {name} features must be [N, D] with labels [N], "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            raise DataError(f"k-NN: the {name} set is empty")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise DataError(f"k-NN: {name} labels must be integers, got {y.dtype}")
        if int(y.min()) < 0:
            raise DataError(f"k-NN: {name} labels must be >= 0 (unlabeled images cannot be scored)")
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(
            f"k-NN: train and test feature sizes differ ({train_x.shape[1]} vs {test_x.shape[1]})"
        )


def _num_classes(train_y: Tensor, test_y: Tensor, num_classes: int | None) -> int:
    """The class count: given, or 1 + the largest label; labels must be below it."""
    largest = max(int(train_y.max()), int(test_y.max()))
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise DataError(f"k-NN: label {largest} is out of range for {num_classes} classes")
    return int(num_classes)


def knn_notes(train_labels: Tensor, ks: Sequence[int] = KNN_KS) -> list[str]:
    """The report's caveats for training labels [N] and the requested ks (module doc): ks above N
    (clipped, so their figures coincide) and ks above the smallest class's image count."""
    ks = _check_ks(ks)
    n = int(train_labels.numel())
    counts = torch.bincount(train_labels.detach().long().cpu().clamp_min(0))
    smallest = int(counts[counts > 0].min()) if n else 0
    notes = []
    clipped = [k for k in ks if k > n]
    if clipped:
        notes.append(f"k-NN: k = {_join(clipped)} exceed the {n} training images and are clipped to {n} "
                     "(every training image votes), so their figures coincide")
    above = [k for k in ks if min(k, n) > smallest]
    if above:
        notes.append(f"k-NN: k = {_join(above)} exceed the {smallest} training images of the smallest class: "
                     "the votes for its images necessarily include neighbours of other classes")
    return notes


def _join(ks: list[int]) -> str:
    return ", ".join(str(k) for k in ks)
