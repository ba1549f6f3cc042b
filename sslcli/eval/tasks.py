"""One function per `ssl eval` command: resolve inputs, run the protocol, return the report.

Report (docs/evals.md, common to all evals): {"task", "metrics", "config", "weights", "data", "notes",
"seconds", "version"}; percentages 0-100; `notes`: caveats of small data (k above the class sizes,
classes too small for an episode, a DINO probe with few optimiser steps), never silent.
Every task takes either `--weights` + images (features extracted, cached with `--cache DIR`) or
precomputed feature files. Each runner takes its task's typed options (sslcli.eval.options),
built from CLI flags or from a suite entry.
`progress(description, total)` -> advance(n) is how long work reports itself (the CLI draws a
rich bar on stderr; None = silent).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import sslcli
from sslcli.device import pick_device
from sslcli.errors import DataError, UsageError
from sslcli.eval.classes import check_labels_seen, remap, val_label_map
from sslcli.eval.davis import run_davis
from sslcli.eval.davis_score import evaluate_davis
from sslcli.eval.featurefiles import FeatureCache, FeatureSet, check_same_dim, load_features
from sslcli.eval.fewshot import fewshot_episodes, fewshot_notes
from sslcli.eval.knn import knn_classify, knn_notes
from sslcli.eval.linear import linear_probe, linear_probe_features
from sslcli.eval.logreg import logreg_probe, logreg_probe_features
from sslcli.eval.options import DavisOptions, FewshotOptions, KnnOptions, LinearOptions, RetrievalOptions
from sslcli.eval.pipelines import fewshot_features, knn_features, retrieval_features
from sslcli.eval.retrieval import evaluate_retrieval, load_gnd
from sslcli.eval.weights import WeightsInfo, load_backbone

Progress = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class Source:
    """Where features come from when they are not given as files."""

    weights: str | None = None
    which: str = "teacher"
    device: str = "auto"
    cache: Path | None = None
    image_size: int | None = None
    batch_size: int = 256
    workers: int = 4

    def __post_init__(self) -> None:
        self.workers = min(self.workers, os.cpu_count() or 1)  # more workers than cores only thrash

    def torch_device(self) -> torch.device:
        return pick_device(self.device)

    def backbone(self):
        if not self.weights:
            raise UsageError("give --weights (a run directory, checkpoint or exported backbone) or feature files")
        return load_backbone(self.weights, self.which, self.torch_device())


DINO_IMAGENET_STEPS = 125_100  # DINO's linear recipe on ImageNet: 1,251 steps per epoch x 100 epochs


def report(task: str, metrics: dict, config: dict, info: WeightsInfo | None, data: dict, started: float,
           notes: list[str] | None = None) -> dict:
    return {"task": task, "metrics": metrics, "config": config,
            "weights": info.to_dict() if info is not None else None, "data": data, "notes": list(notes or []),
            "seconds": round(time.time() - started, 2), "version": sslcli.__version__}


def _classes(fs: FeatureSet) -> list[str] | None:
    """Class names (index = label) of features extracted from a labeled folder, or of a feature file
    whose meta["classes"] holds a JSON list of names; None otherwise (integer labels only)."""
    try:
        names = json.loads(fs.meta.get("classes", "null"))
    except ValueError:  # a feature file's own metadata, not ours
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def aligned_val_labels(tr: FeatureSet, va: FeatureSet, train: str, val: str, what: str):
    """va.labels in tr's class indexing (sslcli.eval.classes): by name when both sets came from
    folders, else checked to occur among tr.labels. DataError for a val class train lacks."""
    train_classes, val_classes = _classes(tr), _classes(va)
    if train_classes is not None and val_classes is not None:
        return remap(va.labels, val_label_map(train_classes, val_classes, train, val, what))
    check_labels_seen(tr.labels, va.labels, what)
    return va.labels


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _advance(progress: Progress | None, description: str, total: int | None):
    return progress(description, total) if progress is not None else None


def _classify_set(src: Source, spec: str | None, features: Path | None, kind: str, backbone, info,
                  progress: Progress | None) -> FeatureSet:
    """Features of one labeled split, from a file or extracted with the protocol's preprocessing."""
    if features is not None:
        return load_features(features)
    if spec is None:
        raise UsageError(f"give the {kind} data (a folder or builtin:NAME) or its feature file")
    extract = knn_features if kind in ("train", "val") else fewshot_features
    return extract(backbone, info, spec, src.torch_device(), FeatureCache(src.cache), src.image_size,
                   src.batch_size, src.workers, _advance(progress, f"features {spec}", None))


def _needs_backbone(*files: Path | None) -> bool:
    return any(f is None for f in files)


def run_knn(src: Source, opts: KnnOptions, progress: Progress | None = None) -> dict:
    started = time.time()
    train, val = opts.train, opts.val
    train_features, val_features = _path(opts.train_features), _path(opts.val_features)
    backbone, info = src.backbone() if _needs_backbone(train_features, val_features) else (None, None)
    tr = _classify_set(src, train, train_features, "train", backbone, info, progress)
    va = _classify_set(src, val, val_features, "val", backbone, info, progress)
    check_same_dim(tr, va, "train features", "val features")
    for fs, name in ((tr, "train"), (va, "val")):
        if fs.labels is None:
            raise UsageError(f"k-NN needs labels: the {name} data has none (use an ImageFolder layout)")
    train_name, val_name = train or str(train_features), val or str(val_features)
    val_labels = aligned_val_labels(tr, va, train_name, val_name, "k-NN")
    device = src.torch_device()
    metrics = knn_classify(tr.features.to(device), tr.labels.to(device), va.features.to(device),
                           val_labels.to(device), ks=opts.k, temperature=opts.temperature)
    config = {"k": list(opts.k), "temperature": opts.temperature, "image_size": src.image_size}
    data = {"train": train_name, "val": val_name, "n_train": len(tr.features), "n_val": len(va.features)}
    return report("knn", metrics, config, info, data, started, knn_notes(tr.labels, opts.k))


def run_fewshot(src: Source, opts: FewshotOptions, progress: Progress | None = None) -> dict:
    started = time.time()
    features = _path(opts.features)
    backbone, info = src.backbone() if features is None else (None, None)
    fs = _classify_set(src, opts.data, features, "fewshot", backbone, info, progress)
    if fs.labels is None:
        raise UsageError("few-shot needs labels: use an ImageFolder layout (one folder per class)")
    metrics = fewshot_episodes(fs.features, fs.labels, opts.ways, opts.shots, opts.queries, opts.episodes,
                               opts.seed, opts.metric)
    config = {"ways": opts.ways, "shots": opts.shots, "queries": opts.queries, "episodes": opts.episodes,
              "seed": opts.seed, "metric": opts.metric, "image_size": src.image_size}
    notes = fewshot_notes(fs.labels, opts.shots, opts.queries, _classes(fs))
    return report("fewshot", metrics, config, info, {"data": opts.data or str(features), "n": len(fs.features)},
                  started, notes)


def _labeled_files(opts: LinearOptions) -> tuple[FeatureSet, FeatureSet, Tensor] | None:
    """(train, val, val labels aligned to train) from the two feature files, or None when not given."""
    if opts.train_features is None or opts.val_features is None:
        return None
    tr, va = load_features(Path(opts.train_features)), load_features(Path(opts.val_features))
    check_same_dim(tr, va, "train features", "val features")
    if tr.labels is None or va.labels is None:
        raise UsageError("the linear probe needs labels in both feature files")
    for fs, name in ((tr, "train"), (va, "val")):
        if len(fs.labels) == 0 or int(fs.labels.min()) < 0:
            raise DataError(f"the linear probe needs labeled {name} features (labels >= 0)")
    return tr, va, aligned_val_labels(tr, va, opts.train_features, opts.val_features, "linear probe")


def run_linear(src: Source, opts: LinearOptions, progress: Progress | None = None) -> dict:
    """The linear probe: logreg (default) or DINO's protocol, on images or on two feature files."""
    if opts.protocol == "logreg":
        return _run_logreg(src, opts, progress)
    return _run_dino_linear(src, opts, progress)


def _run_logreg(src: Source, opts: LinearOptions, progress: Progress | None) -> dict:
    started = time.time()
    config = {"protocol": "logreg", "l2": list(opts.l2), "seed": opts.seed, "fast": opts.fast,
              "n_last_blocks": opts.n_last_blocks, "avgpool": opts.avgpool, "image_size": src.image_size}
    files = _labeled_files(opts)
    if files is not None:
        tr, va, val_labels = files
        metrics = logreg_probe_features(tr.features, tr.labels, va.features, val_labels, src.torch_device(),
                                        opts.l2, seed=opts.seed)
        data = {"train": opts.train_features, "val": opts.val_features, "n_train": len(tr), "n_val": len(va)}
        return report("linear", metrics, config, None, data, started)
    if not opts.train or not opts.val:
        raise UsageError("give --train and --val (labeled folders or builtin:NAME) or --train-features/--val-features")
    backbone, info = src.backbone()
    metrics = logreg_probe(backbone, info, opts.train, opts.val, src.torch_device(), opts.n_last_blocks,
                           opts.avgpool, opts.l2, seed=opts.seed, cache=FeatureCache(src.cache),
                           image_size=src.image_size, batch_size=src.batch_size, workers=src.workers,
                           on_batch=_advance(progress, "linear probe features", None))
    data = {"train": opts.train, "val": opts.val, "n_train": metrics["n_train"], "n_val": metrics["n_val"]}
    return report("linear", metrics, config, info, data, started)


def _run_dino_linear(src: Source, opts: LinearOptions, progress: Progress | None) -> dict:
    """DINO linear protocol on images, or the fast protocol on feature files when both are given."""
    started = time.time()
    advance = _advance(progress, "linear probe (epochs)", opts.epochs)
    on_epoch = (lambda epoch, stats: advance(1)) if advance else None
    config = {"protocol": "dino", "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr,
              "fast": opts.fast, "seed": opts.seed}
    files = _labeled_files(opts)
    if files is not None:
        tr, va, val_labels = files
        metrics = linear_probe_features(tr.features, tr.labels, va.features, val_labels, src.torch_device(),
                                        opts.epochs, opts.batch_size, opts.lr, opts.seed, on_epoch)
        data = {"train": opts.train_features, "val": opts.val_features, "n_train": len(tr), "n_val": len(va)}
        return report("linear", metrics, dict(config, fast=True), None, data, started,
                      _dino_notes(len(tr), opts))
    if not opts.train or not opts.val:
        raise UsageError("give --train and --val (labeled folders or builtin:NAME) or --train-features/--val-features")
    backbone, info = src.backbone()
    metrics = linear_probe(backbone, info, opts.train, opts.val, src.torch_device(), opts.epochs, opts.batch_size,
                           opts.lr, opts.n_last_blocks, opts.avgpool, opts.fast, src.workers, src.image_size,
                           opts.seed, on_epoch)
    data = {"train": opts.train, "val": opts.val, "n_train": metrics["n_train"]}
    return report("linear", metrics, config, info, data, started, _dino_notes(metrics["n_train"], opts))


def _dino_notes(n_train: int, opts: LinearOptions) -> list[str]:
    """A note when DINO's recipe makes far fewer SGD steps than on ImageNet (it may not converge)."""
    steps = math.ceil(n_train / opts.batch_size) * opts.epochs
    if steps >= DINO_IMAGENET_STEPS // 10:
        return []
    return [f"linear probe: DINO's recipe made {steps:,} SGD steps here ({n_train:,} images at batch "
            f"{opts.batch_size}, {opts.epochs} epochs; {DINO_IMAGENET_STEPS:,} on ImageNet) and may stop far "
            "from convergence; the default protocol logreg converges on any data size"]


def run_davis_eval(src: Source, opts: DavisOptions, progress: Progress | None = None) -> dict:
    """Propagate labels with the backbone into opts.out_dir and score them, or score opts.predictions alone."""
    started = time.time()
    info = None
    davis_root, predictions = Path(opts.davis), _path(opts.predictions)
    if predictions is None:
        backbone, info = src.backbone()
        advance = _advance(progress, "propagating", None)
        predictions = run_davis(backbone, davis_root, Path(opts.out_dir), opts.split, opts.sequences,
                                src.torch_device(), opts.short_side,
                                on_frame=(lambda: advance(1)) if advance else None)
    metrics = evaluate_davis(davis_root, predictions, opts.split, opts.sequences)
    config = {"split": opts.split, "sequences": opts.sequences, "short_side": opts.short_side}
    return report("davis", metrics, config, info, {"davis": str(davis_root), "predictions": str(predictions)},
                  started)


def run_retrieval_eval(src: Source, opts: RetrievalOptions, progress: Progress | None = None) -> dict:
    started = time.time()
    info = None
    query_features, db_features, gnd_file = _path(opts.query_features), _path(opts.db_features), _path(opts.gnd)
    if query_features is not None or db_features is not None:
        if None in (query_features, db_features, gnd_file):
            raise UsageError("bring-your-own-features mode needs --query-features, --db-features and --gnd")
        queries, database, gnd = load_features(query_features), load_features(db_features), load_gnd(gnd_file)
        data = {"query_features": str(query_features), "db_features": str(db_features), "gnd": str(gnd_file)}
    else:
        if not opts.data:
            raise UsageError("give --data ROOT (revisitop layout) or --query-features/--db-features/--gnd")
        backbone, info = src.backbone()
        queries, database, gnd = retrieval_features(backbone, info, Path(opts.data), opts.dataset,
                                                    src.torch_device(), opts.imsize, opts.multiscale, opts.query_crop,
                                                    FeatureCache(src.cache),
                                                    _advance(progress, "retrieval features", None), src.workers)
        data = {"root": str(Path(opts.data)), "dataset": opts.dataset}
    check_same_dim(queries, database, "query features", "database features")
    if len(queries.features) != len(gnd["gnd"]):
        raise UsageError(f"{len(queries.features)} query features but the ground truth has {len(gnd['gnd'])} queries")
    metrics = evaluate_retrieval(queries.features, database.features, gnd["gnd"])
    config = {"dataset": opts.dataset, "imsize": opts.imsize, "multiscale": opts.multiscale,
              "query_crop": opts.query_crop}
    return report("retrieval", metrics, config, info, data, started)
