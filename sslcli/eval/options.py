"""Typed options of each eval task: one dataclass per `ssl eval TASK`, the one home of its defaults.

The single-task commands build them from their flags (sslcli/cli/evals.py); a suite entry is
turned into one by `parse_options(task, entry)`, which goes through the training config's
`from_dict`: an unknown key or a value of the wrong type is a ConfigError (exit 2) naming the
dotted key (e.g. 'knn.temperature') and the closest valid names. Range and membership checks
run once, in `__post_init__`, whichever way the options were built.

File and folder fields are strings (a folder may also be a `builtin:NAME` spec); the runners in
sslcli.eval.tasks turn them into Paths. None means "not given".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sslcli.config import KNN_KS, KNN_TEMPERATURE
from sslcli.errors import ConfigError, hint
from sslcli.eval.fewshot import METRICS
from sslcli.eval.logreg import L2_GRID
from sslcli.eval.pipelines import RETRIEVAL_DATASETS
from sslcli.typed import from_dict


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}{hint(value, choices)}")


@dataclass
class KnnOptions:
    """Weighted k-NN (DINO protocol): labeled train / val data, or their feature files."""

    train: str | None = None  # labeled folder or builtin:NAME
    val: str | None = None
    train_features: str | None = None  # feature file with labels (instead of `train`)
    val_features: str | None = None
    k: list[int] = field(default_factory=lambda: list(KNN_KS))  # neighbour counts
    temperature: float = KNN_TEMPERATURE  # softmax temperature of the vote

    def __post_init__(self) -> None:
        _require(bool(self.k) and all(k >= 1 for k in self.k), "knn.k", "a list of integers >= 1", self.k)
        _require(self.temperature > 0, "knn.temperature", "> 0", self.temperature)


LINEAR_PROTOCOLS = ("logreg", "dino")  # the first is the default
DINO_ONLY = {"epochs": 100, "batch_size": 1024, "lr": 0.001}  # SGD settings, and their defaults


@dataclass
class LinearOptions:
    """Linear probe. protocol `logreg` (default): L-BFGS logistic regression on cached features,
    its L2 strength chosen on a held-out part of train (sslcli.eval.logreg); `dino`: DINO's SGD
    recipe, the papers' linear rows (`fast`: on cached features, no augmentation)."""

    train: str | None = None
    val: str | None = None
    train_features: str | None = None  # both feature files given: the probe runs on them
    val_features: str | None = None
    protocol: str = LINEAR_PROTOCOLS[0]
    l2: list[float] = field(default_factory=lambda: list(L2_GRID))  # logreg: strengths to choose from
    epochs: int = DINO_ONLY["epochs"]  # dino only, as the two below
    batch_size: int = DINO_ONLY["batch_size"]  # probe batch (CLI: --probe-batch-size)
    lr: float = DINO_ONLY["lr"]  # per 256 images
    n_last_blocks: int | None = None  # ViT: concatenated CLS of the last n blocks (None: DINO's rule)
    avgpool: bool | None = None  # also the mean patch token (None: DINO's rule)
    fast: bool = False  # dino: cached features; logreg always runs on cached features
    seed: int = 0  # dino: init, shuffling, augmentation; logreg: the held-out split

    def __post_init__(self) -> None:
        _one_of("linear.protocol", self.protocol, LINEAR_PROTOCOLS)
        _require(self.epochs >= 1, "linear.epochs", ">= 1", self.epochs)
        _require(self.batch_size >= 1, "linear.batch_size", ">= 1", self.batch_size)
        _require(self.lr > 0, "linear.lr", "> 0", self.lr)
        _require(bool(self.l2) and all(v > 0 for v in self.l2), "linear.l2", "a list of numbers > 0", self.l2)
        # a setting the chosen protocol does not read would be silently ignored: refuse it instead
        if self.protocol == "logreg":
            changed = [k for k, default in DINO_ONLY.items() if getattr(self, k) != default]
            if changed:
                raise ConfigError(f"{', '.join('linear.' + k for k in changed)} apply to protocol dino only "
                                  "(logreg has no epochs, lr or batches); set protocol dino (--protocol dino) "
                                  "to use them")
        elif list(self.l2) != list(L2_GRID):
            raise ConfigError("linear.l2 applies to protocol logreg only (dino trains without weight decay)")


@dataclass
class FewshotOptions:
    """Few-shot nearest-centroid episodes over an ImageFolder (all classes pooled)."""

    data: str | None = None
    features: str | None = None  # feature file with labels (instead of `data`)
    ways: int = 5
    shots: int = 5
    queries: int = 15  # per class and episode
    episodes: int = 600
    seed: int = 0
    metric: str = METRICS[0]  # accuracy | mean-per-class

    def __post_init__(self) -> None:
        _one_of("fewshot.metric", self.metric, METRICS)


@dataclass
class DavisOptions:
    """DAVIS-2017 label propagation into `out_dir` and J&F scoring, or scoring of `predictions`."""

    davis: str | None = None  # DAVIS-2017 root (required)
    predictions: str | None = None  # score these masks instead of propagating
    out_dir: str = "davis-predictions"  # where propagated masks go
    split: str = "val"
    sequences: list[str] | None = None  # subset of the split (None: all)
    short_side: int = 480  # frames resized to this short side (pixels)

    def __post_init__(self) -> None:
        if not self.davis:
            raise ConfigError("davis.davis is required: the DAVIS-2017 root folder")


@dataclass
class RetrievalOptions:
    """Revisited Oxford / Paris retrieval: images under `data`, or query / database feature files."""

    data: str | None = None  # ROOT with <dataset>/jpg and the gnd file
    dataset: str = RETRIEVAL_DATASETS[0]  # roxford5k | rparis6k
    query_features: str | None = None
    db_features: str | None = None
    gnd: str | None = None  # gnd_<dataset>.pkl, for feature files
    imsize: int | None = None  # long side in pixels (None: 224 Oxford, 512 Paris)
    multiscale: bool = False
    query_crop: bool = True

    def __post_init__(self) -> None:
        _one_of("retrieval.dataset", self.dataset, RETRIEVAL_DATASETS)


TASK_OPTIONS: dict[str, type] = {"knn": KnnOptions, "linear": LinearOptions, "fewshot": FewshotOptions,
                                 "davis": DavisOptions, "retrieval": RetrievalOptions}


def parse_options(task: str, entry: dict[str, Any]) -> Any:
    """The options dataclass of `task` from a suite entry (keys as the dataclass fields).

    ConfigError (exit 2): unknown task, unknown key or wrong type (named 'TASK.key'), bad value.
    """
    if task not in TASK_OPTIONS:
        raise ConfigError(f"unknown task '{task}'{hint(task, TASK_OPTIONS)}")
    return from_dict(TASK_OPTIONS[task], entry, prefix=f"{task}.")
