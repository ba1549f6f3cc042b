"""`ssl runs`: what a set of run directories holds, read from their files alone.

`find_runs(paths)`: a path holding config.yaml is a run; any other folder contributes its direct
sub-folders that are runs (default `./runs`). `describe(run)` gives one row per run:
  name, preset (config `name`), method (`dino+adasim` with bootstrapping), arch, status, epoch (completed, from the last checkpoint)
  / epochs, last logged loss, k-NN top-1, wall seconds of the last invocation (summary.json), path.
Status, from the files only (no process inspection):
  running      another process holds the run lock (RUN_DIR/.lock, see sslcli.runfiles.run_lock);
  finished     summary.json is there and covers the last checkpoint's step;
  diverged     run.log's last ERROR line says the training diverged;
  interrupted  anything else (killed, Ctrl-C, a failure other than divergence).
k-NN: the newest of the monitor's final figure (summary.json) and `ssl eval knn` reports saved in
RUN_DIR/evals/knn.json. `compare(runs)`: the config keys whose values differ between the runs
(a sweep's axes, found automatically) next to each run's row. `curves(runs, metrics)`: each
metric's points from metrics.jsonl against epochs (fractional for the per-interval training lines),
each run labelled by its values of the sweep's axes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslcli import runfiles
from sslcli.config import Config, flatten, to_dict
from sslcli.errors import CheckpointError, UsageError, hint

COLUMNS = ("name", "method", "arch", "status", "epoch", "epochs", "loss", "knn_top1", "wall_s", "path")
EVALS_DIR = "evals"


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths` and their direct sub-folders, sorted; UsageError when none."""
    runs: list[Path] = []
    for path in paths:
        if (path / runfiles.CONFIG_FILE).is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p for p in path.iterdir() if (p / runfiles.CONFIG_FILE).is_file())
        else:
            raise UsageError(f"'{path}' is not a folder (give run directories or folders of runs)")
    if not runs:
        raise UsageError(f"no run directory (a folder with {runfiles.CONFIG_FILE}) in {', '.join(map(str, paths))}")
    return runs


def status(run: Path, checkpoint_step: int | None = None) -> str:
    """running | finished | diverged | interrupted (module doc); `checkpoint_step`: the last
    checkpoint's step when the caller has read it already."""
    if runfiles.is_locked(run):
        return "running"
    summary = runfiles.read_json(run / runfiles.SUMMARY_FILE)
    step = _checkpoint_header(run)[1] if checkpoint_step is None else checkpoint_step
    if summary is not None and summary.get("steps", -1) >= step:
        return "finished"
    errors = [line for line in _read_lines(run / runfiles.LOG_FILE) if " ERROR " in line]
    if errors and "training diverged" in errors[-1]:
        return "diverged"
    return "interrupted"


def describe(run: Path, cfg: Config | None = None) -> dict[str, Any]:
    """The row of one run (COLUMNS; None where a figure is missing); `cfg`: its config if read."""
    cfg = cfg or runfiles.read_run_config(run)
    records = runfiles.read_jsonl(run / runfiles.METRICS_FILE)
    losses = [r for r in records if "loss" in r]
    summary = runfiles.read_json(run / runfiles.SUMMARY_FILE) or {}
    epoch, step = _checkpoint_header(run)
    return {"name": run.name, "preset": cfg.name, "method": cfg.method.name + ("" if cfg.bootstrap.name == "none" else f"+{cfg.bootstrap.name}"), "arch": cfg.model.arch,
            "status": status(run, step), "epoch": max(epoch, 0),
            "epochs": cfg.train.epochs, "loss": losses[-1]["loss"] if losses else None,
            "knn_top1": _knn(run, summary, records), "wall_s": summary.get("wall_seconds"), "path": str(run)}


def compare(runs: list[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """(the dotted config keys that differ between the runs, one row per run: its describe() row
    plus its value of each of those keys)."""
    typed = [runfiles.read_run_config(run) for run in runs]
    configs = [flatten(to_dict(cfg)) for cfg in typed]
    axes = _axes(configs)
    rows = [{**describe(run, cfg), **{k: c.get(k) for k in axes}} for run, cfg, c in zip(runs, typed, configs)]
    return axes, rows


@dataclass(frozen=True)
class Curve:
    """One metric of one run, as metrics.jsonl logged it."""

    run: str  # the run directory's name
    label: str  # its values of the sweep's axes ("optim.lr=0.001"), or its name when nothing differs
    metric: str
    x: list[float]  # epochs (training lines: step / steps per epoch), or steps (Curves.x_unit)
    y: list[float]


@dataclass(frozen=True)
class Curves:
    x_unit: str  # "epoch", or "step" when a run's epoch length is unknown (checkpoints before 0.2)
    curves: list[Curve]  # one per (run, metric) with at least one point, runs in the given order


def curves(runs: list[Path], metrics: list[str]) -> Curves:
    """The points of each metric of each run; UsageError naming a metric no run logged."""
    records = [runfiles.read_jsonl(run / runfiles.METRICS_FILE) for run in runs]
    logged = sorted({k for rs in records for r in rs for k in r} - {"epoch", "step"})
    for metric in metrics:
        if metric not in logged:
            near = hint(metric, logged) or f" (logged: {', '.join(logged)})"
            raise UsageError(f"no run logged metric '{metric}'{near}")
    labels = _labels(runs)
    lengths = [_steps_per_epoch(run, rs) for run, rs in zip(runs, records)]
    unit = "epoch" if all(lengths) else "step"
    found = []
    for run, label, rs, length in zip(runs, labels, records, lengths):
        scale = length if unit == "epoch" else 1
        for metric in metrics:
            points = [(r["step"] / scale, r[metric]) for r in rs if isinstance(r.get(metric), (int, float))]
            if points:
                found.append(Curve(run.name, label, metric, [p[0] for p in points], [p[1] for p in points]))
    return Curves(unit, found)


MAX_LABEL_KEYS = 3  # a legend entry names at most this many differing keys


def _labels(runs: list[Path]) -> list[str]:
    """Each run's values of the keys that differ between the runs; its name when none differ or
    two runs would read the same."""
    configs = [flatten(to_dict(runfiles.read_run_config(run))) for run in runs]
    axes = _axes(configs)
    shown, more = axes[:MAX_LABEL_KEYS], ", ..." if len(axes) > MAX_LABEL_KEYS else ""
    labels = [", ".join(f"{k}={c.get(k)}" for k in shown) + more if axes else run.name for run, c in zip(runs, configs)]
    if len(set(labels)) < len(labels):
        labels = [f"{run.name}: {label}" if axes else label for run, label in zip(runs, labels)]
    return labels


def _axes(configs: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values differ between flattened configs (names and sources aside)."""
    keys = sorted({k for c in configs for k in c if k not in ("name", "notes") and not k.startswith("source.")})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _steps_per_epoch(run: Path, records: list[dict]) -> int:
    """From the last checkpoint's header, else from a line written at an epoch's end (k-NN
    monitor, bootstrap figures: step = epoch x steps per epoch); 0 when unknown."""
    try:
        length = runfiles.read_checkpoint_header(runfiles.last_checkpoint(run)).steps_per_epoch
    except CheckpointError:
        length = 0
    ends = [r["step"] // r["epoch"] for r in records if r.get("epoch", 0) > 0 and "loss" not in r
            and ("knn_top1" in r or "bootstrap_ratio" in r)]
    return length or (ends[0] if ends else 0)


def _knn(run: Path, summary: dict, records: list[dict]) -> float | None:
    metrics = (runfiles.read_json(run / EVALS_DIR / "knn.json") or {}).get("metrics", {})
    if isinstance(metrics, dict) and isinstance(metrics.get("top1"), (int, float)):
        return metrics["top1"]
    if summary.get("knn_top1_final") is not None:
        return summary["knn_top1_final"]
    knn = [r["knn_top1"] for r in records if "knn_top1" in r]
    return knn[-1] if knn else None


def _checkpoint_header(run: Path) -> tuple[int, int]:
    """(epochs completed, step) of the run's last checkpoint; (-1, -1) without one."""
    try:
        header = runfiles.read_checkpoint_header(runfiles.last_checkpoint(run))
    except CheckpointError:
        return -1, -1
    return header.epoch, header.step


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
