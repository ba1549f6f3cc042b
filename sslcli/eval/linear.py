"""Linear probe on a frozen backbone, DINO's protocol (`--protocol dino`; docs/evals.md "Linear probe").

The recipe of DINO's eval_linear.py, single process, for ImageNet reproductions (the papers'
linear rows). On small data it makes few optimiser steps (2,000 images at batch 1024: 2 per
epoch) and does not converge; the default protocol for other data is sslcli.eval.logreg.
- features (sslcli.eval.probe): ViT -> the CLS tokens of the last n blocks, each after the final
  norm, concatenated, plus (avgpool) the mean of the last block's patch tokens; CNN -> the pooled
  vector. Defaults (`default_probe`): ViT-S and smaller (embed_dim < 768) n = min(4, depth), no
  avgpool; ViT-B and larger n = 1 with avgpool; CNN (1, False).
- a linear layer (init N(0, 0.01), bias 0) trained with cross-entropy, SGD momentum 0.9, weight
  decay 0, lr = lr x batch_size / 256, CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once
  per epoch after training it (as DINO), no dropped last batch.
- "dino-linear" (default): every training batch goes through RandomResizedCrop(crop) (bilinear,
  torchvision's default, as DINO) + horizontal flip + normalise and then the frozen backbone
  (eval mode, no grad, bf16 autocast on CUDA only; the linear layer runs in float32).
- "fast-linear" (`fast=True`): the training features are extracted once with the evaluation
  transform (no augmentation) and the layer is trained on those cached tensors, same optimiser
  and schedule.
- evaluation: resize round(crop x 256 / 224) (bicubic) + center crop. The backbone is frozen and
  this transform deterministic, so the validation features are extracted once and the layer is
  scored on them after every epoch, which gives the numbers DINO's per-epoch validation pass gives.
Reported: the final epoch's top-1 / top-5 and, labelled "best_*", the best epoch's (DINO's
printed figure is the best top-1). Epochs are numbered from 1. Percentages 0-100; top-5 is
top-min(5, classes). Val classes are mapped to train's by name (sslcli.eval.classes).

Differences from DINO, on purpose: the avgpool vector is appended after the CLS tokens (DINO
interleaves them per channel; for a freshly initialised linear layer this is only a permutation
of its inputs) and avgpool may be combined with n > 1 (DINO's reshape allows only n = 1).
Determinism: `seed` seeds the linear init, the shuffling (torch.Generator) and the augmentation
(the global torch RNG is forked for the call and seeded, so the caller's RNG state is untouched;
DataLoader workers derive their seeds from the shuffling generator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.transforms import eval_transform
from sslcli.device import autocast
from sslcli.errors import DataError, TrainingError, UsageError
from sslcli.eval.classes import check_labels_seen, remap, val_label_map
from sslcli.eval.features import TransformedImages, extract_features
from sslcli.eval.probe import ProbeFeatures, describe_probe, resolve_probe
from sslcli.eval.weights import WeightsInfo
from sslcli.models.backbone import Backbone

PROTOCOLS = {False: "dino-linear", True: "fast-linear"}
LR_REFERENCE_BATCH = 256
INIT_STD = 0.01
MOMENTUM = 0.9


# ---------------------------------------------------------------- augmentation


def train_transform(crop_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """DINO's linear-probe augmentation: PIL -> [3, crop, crop] (RRC, flip, normalise)."""
    return T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(tuple(mean), tuple(std))])


# ---------------------------------------------------------------- classifier and optimiser


def scaled_lr(lr: float, batch_size: int) -> float:
    """The effective learning rate lr x batch_size / 256."""
    return lr * batch_size / LR_REFERENCE_BATCH


def make_classifier(feature_dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """nn.Linear(F -> C) with weight ~ N(0, 0.01) drawn from torch.Generator(seed), bias 0."""
    linear = nn.Linear(feature_dim, num_classes)
    with torch.no_grad():
        linear.weight.normal_(0.0, INIT_STD, generator=torch.Generator().manual_seed(seed))
        linear.bias.zero_()
    return linear


def make_optimizer(linear: nn.Module, lr: float, batch_size: int,
                   epochs: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """SGD(lr x batch / 256, momentum 0.9, wd 0) and its per-epoch cosine schedule to 0."""
    optimizer = torch.optim.SGD(linear.parameters(), lr=scaled_lr(lr, batch_size), momentum=MOMENTUM,
                                weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)


# ---------------------------------------------------------------- batches, training, scoring


def _on_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`, or left on the CPU when it does not fit there (batches move then)."""
    try:
        return t.to(device)
    except torch.OutOfMemoryError:
        return t


def _feature_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator,
                     device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over cached features x [N, F], y [N] -> ([B, F], [B]) on `device`."""
    order = torch.randperm(len(y), generator=generator).to(x.device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


def _image_batches(features: ProbeFeatures, loader: DataLoader,
                   device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass of augmented images through the frozen backbone -> ([B, F] float32, [B])."""
    for images, labels in loader:
        with torch.no_grad(), autocast(device):
            f = features(images.to(device, non_blocking=True))
        yield f.float(), labels.to(device, non_blocking=True)


def _train_epoch(linear: nn.Linear, optimizer: torch.optim.Optimizer,
                 batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """One epoch of cross-entropy SGD -> the mean loss, a 0-d tensor left on the device."""
    linear.train()
    total, count = torch.zeros((), device=linear.weight.device), 0
    for x, y in batches:
        loss = F.cross_entropy(linear(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(y)
        count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def score(linear: nn.Linear, x: Tensor, y: Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(top-1, top-min(5, C)) accuracy in percent of the classifier on features x [N, F], y [N].

    Hit counts stay on the classifier's device; one host sync at the end.
    """
    linear.eval()
    device = linear.weight.device
    k = min(5, linear.out_features)
    hits = torch.zeros(2, dtype=torch.long, device=device)
    for start in range(0, len(y), batch_size):
        logits = linear(x[start:start + batch_size].to(device))  # [B, C]
        target = y[start:start + batch_size].to(device)
        correct = logits.topk(k, dim=1).indices == target[:, None]  # [B, k]
        hits += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()])
    top1, top5 = hits.tolist()
    return 100.0 * top1 / len(y), 100.0 * top5 / len(y)


# ---------------------------------------------------------------- inputs


def _check_args(epochs: int, batch_size: int, lr: float, workers: int, image_size: int | None) -> None:
    for name, value, low in (("epochs", epochs, 1), ("batch size", batch_size, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"linear probe: {name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"linear probe: lr must be a positive number, got {lr!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise UsageError(f"linear probe: image size must be a positive integer, got {image_size!r}")


def _open_labeled(spec: str, role: str) -> ImageDataset:
    """The dataset of `spec`; DataError when it is unlabeled (labels -1)."""
    ds = open_dataset(spec)
    if len(ds) == 0:
        raise DataError(f"linear probe: the {role} dataset '{spec}' has no images")
    if not ds.classes or int(ds.labels.min()) < 0:
        raise DataError(f"linear probe: the {role} dataset '{spec}' is unlabeled; the probe needs "
                        "class folders (ROOT/<class>/<image>)")
    return ds


# ---------------------------------------------------------------- the protocol


def linear_probe(backbone: Backbone, info: WeightsInfo, train: str, val: str, device: torch.device | str,
                 epochs: int = 100, batch_size: int = 1024, lr: float = 0.001,
                 n_last_blocks: int | None = None, avgpool: bool | None = None, fast: bool = False,
                 workers: int = 4, image_size: int | None = None, seed: int = 0,
                 on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train and score a linear classifier on the frozen backbone's probe features (module doc).

    train / val: dataset specs (labelled folders or built-in names); val classes are mapped to
    train's by name, a val class that train lacks is a DataError (sslcli.eval.classes).
    crop = image_size or info.image_size; images normalised with info.mean / info.std.
    on_epoch(epoch, stats) after every epoch (1-based), stats = {"epoch", "loss", "lr", "top1",
    "top5", "best_top1", "best_epoch"}.

    Returns {"protocol": "dino-linear" | "fast-linear", "top1", "top5" (final epoch), "best_top1",
    "best_top5", "best_epoch", "epochs", "n_last_blocks", "avgpool", "feature" (in words), "feature_dim",
    "lr" (effective), "batch_size", "num_classes", "image_size", "n_train"}. Raises UsageError / DataError on bad input,
    TrainingError when the loss is not finite.
    """
    _check_args(epochs, batch_size, lr, workers, image_size)
    n, avg = resolve_probe(backbone, n_last_blocks, avgpool, info.model_name())
    train_ds, val_ds = _open_labeled(train, "train"), _open_labeled(val, "val")
    val_map = val_label_map(train_ds.classes, val_ds.classes, train_ds.name, val_ds.name, "linear probe")
    device = torch.device(device)
    crop = image_size or info.image_size
    was_training = backbone.training
    features = ProbeFeatures(backbone, n, avg).eval()  # extract_features restores this mode
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA RNG is not forked
            result = _run(features, train_ds, (val_ds, val_map), device, crop, info, epochs, batch_size, lr,
                          fast, workers, seed, on_epoch)
    finally:
        backbone.train(was_training)
    return dict(result, protocol=PROTOCOLS[bool(fast)], epochs=epochs, n_last_blocks=n, avgpool=avg,
                feature=describe_probe(backbone, n, avg), lr=scaled_lr(lr, batch_size), batch_size=batch_size,
                num_classes=len(train_ds.classes), image_size=crop, n_train=len(train_ds))


def _run(features: ProbeFeatures, train_ds: ImageDataset, val: tuple[ImageDataset, Tensor | None],
         device: torch.device, crop: int, info: WeightsInfo, epochs: int, batch_size: int, lr: float, fast: bool,
         workers: int, seed: int, on_epoch: Callable[[int, dict], None] | None) -> dict:
    """Extract what is cached, build the batches of each epoch, fit -> the accuracy figures.
    val = (dataset, its label map into train's classes or None)."""
    evaluation = eval_transform(crop, mean=info.mean, std=info.std)
    val_x, val_y = extract_features(features, val[0], evaluation, device, batch_size, workers)
    val_x, val_y = _on_device(val_x, device), _on_device(remap(val_y, val[1]), device)
    shuffle = torch.Generator().manual_seed(seed)
    if fast:
        train_x, train_y = extract_features(features, train_ds, evaluation, device, batch_size, workers)
        train_x, train_y = _on_device(train_x, device), _on_device(train_y, device)

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            return _feature_batches(train_x, train_y, batch_size, shuffle, device)
    else:
        loader = DataLoader(TransformedImages(train_ds, train_transform(crop, info.mean, info.std)),
                            batch_size=batch_size, shuffle=True, generator=shuffle, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0)

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            return _image_batches(features, loader, device)
    linear = make_classifier(val_x.shape[1], len(train_ds.classes), seed).to(device)
    return _fit(linear, lr, batch_size, epochs, batches, (val_x, val_y), on_epoch)


def _fit(linear: nn.Linear, lr: float, batch_size: int, epochs: int,
         batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], val: tuple[Tensor, Tensor],
         on_epoch: Callable[[int, dict], None] | None) -> dict:
    """Train for `epochs`, scoring after each -> final and best (first best top-1) figures."""
    optimizer, scheduler = make_optimizer(linear, lr, batch_size, epochs)
    best = {"best_top1": -1.0, "best_top5": 0.0, "best_epoch": 0}
    top1 = top5 = 0.0
    for epoch in range(1, epochs + 1):
        epoch_lr = optimizer.param_groups[0]["lr"]
        loss = float(_train_epoch(linear, optimizer, batches()))
        scheduler.step()
        if not math.isfinite(loss):
            raise TrainingError(f"linear probe: the loss is not finite at epoch {epoch} "
                                f"(lr {epoch_lr:.3g}); try a lower lr")
        top1, top5 = score(linear, *val)
        if top1 > best["best_top1"]:
            best = {"best_top1": top1, "best_top5": top5, "best_epoch": epoch}
        if on_epoch is not None:
            on_epoch(epoch, {"epoch": epoch, "loss": loss, "lr": epoch_lr, "top1": top1, "top5": top5,
                             "best_top1": best["best_top1"], "best_epoch": best["best_epoch"]})
    return dict(best, top1=top1, top5=top5, feature_dim=linear.in_features)


def linear_probe_features(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                          device: torch.device | str, epochs: int = 100, batch_size: int = 1024,
                          lr: float = 0.001, seed: int = 0,
                          on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """The fast protocol on precomputed features (feature files): train [N, F] / val [M, F] with
    labels; same classifier init, optimiser and schedule as linear_probe."""
    _check_args(epochs, batch_size, lr, 0, None)
    if train_y.min() < 0 or val_y.min() < 0:
        raise DataError("the linear probe needs labeled features (labels >= 0)")
    check_labels_seen(train_y, val_y, "linear probe")
    device = torch.device(device)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    train_x, train_y = _on_device(train_x, device), _on_device(train_y, device)
    val = (_on_device(val_x, device), _on_device(val_y, device))
    shuffle = torch.Generator().manual_seed(seed)
    linear = make_classifier(train_x.shape[1], num_classes, seed).to(device)
    result = _fit(linear, lr, batch_size, epochs,
                  lambda: _feature_batches(train_x, train_y, batch_size, shuffle, device), val, on_epoch)
    return dict(result, protocol=PROTOCOLS[True], epochs=epochs, lr=scaled_lr(lr, batch_size),
                batch_size=batch_size, num_classes=num_classes, feature_dim=train_x.shape[1], n_train=len(train_y))
