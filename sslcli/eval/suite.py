"""`ssl eval all --suite FILE.yaml`: several evals of one backbone, one feature cache, one report.

Suite file:
    evals:
      - {task: knn, train: /data/imagenet/train, val: /data/imagenet/val, k: [10, 20]}
      - {task: linear, train: ..., val: ..., fast: true, epochs: 100}
      - {task: fewshot, data: /data/aircraft, ways: 5, shots: 5}
      - {task: davis, davis: /data/DAVIS, out_dir: preds/davis}
      - {task: retrieval, data: /data/revisitop, dataset: roxford5k, multiscale: true}
Each entry takes the options of its `ssl eval TASK` command (snake_case); unknown tasks or keys are
input errors (exit 2). Report: {"weights", "results": [one report per eval], "reported"} where
`reported` is the preset's paper numbers when the weights come from a preset run; the Markdown
table puts each headline figure beside the paper's number under the same key (knn, linear, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from sslcli.errors import UsageError, hint
from sslcli.eval import tasks
from sslcli.eval.weights import read_weights_info


def _knn(src, e, progress):
    return tasks.run_knn(src, e.get("train"), e.get("val"), _path(e.get("train_features")),
                         _path(e.get("val_features")), tuple(e.get("k", (10, 20, 100, 200))),
                         float(e.get("temperature", 0.07)), progress)


def _linear(src, e, progress):
    return tasks.run_linear(src, e.get("train"), e.get("val"), int(e.get("epochs", 100)),
                            int(e.get("batch_size", 1024)), float(e.get("lr", 0.001)), e.get("n_last_blocks"),
                            e.get("avgpool"), bool(e.get("fast", False)), int(e.get("seed", 0)),
                            _path(e.get("train_features")), _path(e.get("val_features")), progress)


def _fewshot(src, e, progress):
    return tasks.run_fewshot(src, e.get("data"), _path(e.get("features")), int(e.get("ways", 5)),
                             int(e.get("shots", 5)), int(e.get("queries", 15)), int(e.get("episodes", 600)),
                             int(e.get("seed", 0)), e.get("metric", "accuracy"), progress)


def _davis(src, e, progress):
    return tasks.run_davis_eval(src, Path(e["davis"]), _path(e.get("predictions")),
                                _path(e.get("out_dir", "davis-predictions")), e.get("split", "val"),
                                e.get("sequences"), int(e.get("short_side", 480)), progress)


def _retrieval(src, e, progress):
    return tasks.run_retrieval_eval(src, _path(e.get("data")), e.get("dataset", "roxford5k"),
                                    _path(e.get("query_features")), _path(e.get("db_features")),
                                    _path(e.get("gnd")), e.get("imsize"), bool(e.get("multiscale", False)),
                                    bool(e.get("query_crop", True)), progress)


# task -> (runner, accepted keys, required keys)
TASKS: dict[str, tuple[Callable, set[str], set[str]]] = {
    "knn": (_knn, {"train", "val", "train_features", "val_features", "k", "temperature"}, set()),
    "linear": (_linear, {"train", "val", "train_features", "val_features", "epochs", "batch_size", "lr",
                         "n_last_blocks", "avgpool", "fast", "seed"}, set()),
    "fewshot": (_fewshot, {"data", "features", "ways", "shots", "queries", "episodes", "seed", "metric"}, set()),
    "davis": (_davis, {"davis", "predictions", "out_dir", "split", "sequences", "short_side"}, {"davis"}),
    "retrieval": (_retrieval, {"data", "dataset", "query_features", "db_features", "gnd", "imsize", "multiscale",
                               "query_crop"}, set()),
}
HEADLINE = {"knn": "top1", "linear": "top1", "fewshot": "accuracy", "davis": "J&F-Mean", "retrieval": "mAP-M"}


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def read_suite(path: Path) -> list[dict]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read suite file '{path}': {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"suite file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    entries = data.get("evals") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"suite file '{path}' needs a non-empty list under 'evals:'")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{path}: evals[{i}]")
    return entries


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or "task" not in entry:
        raise UsageError(f"{where} must be a mapping with a 'task' key")
    task = entry["task"]
    if task not in TASKS:
        raise UsageError(f"{where}: unknown task '{task}'{hint(str(task), TASKS)}")
    _, accepted, required = TASKS[task]
    for key in entry:
        if key != "task" and key not in accepted:
            raise UsageError(f"{where}: unknown key '{key}' for {task}{hint(key, accepted)}")
    missing = required - set(entry)
    if missing:
        raise UsageError(f"{where}: {task} needs {', '.join(sorted(missing))}")


def run_suite(src: tasks.Source, suite_file: Path, progress: tasks.Progress | None = None) -> dict:
    """Run every entry (features cached in src.cache) and collect the reports."""
    entries = read_suite(suite_file)
    reported = read_weights_info(src.weights, src.which)[0].reported if src.weights else {}
    results = [TASKS[e["task"]][0](src, e, progress) for e in entries]
    return {"weights": src.weights, "which": src.which, "results": results, "reported": reported}


def markdown_table(suite_report: dict) -> str:
    """| task | data | metric | value | paper |, one row per eval's headline figure."""
    lines = ["| task | data | metric | value | paper |", "|---|---|---|---|---|"]
    reported = suite_report.get("reported") or {}
    for r in suite_report["results"]:
        key = HEADLINE[r["task"]]
        value = r["metrics"].get(key)
        paper = reported.get(r["task"], "")
        data = ", ".join(str(v) for k, v in r["data"].items() if k != "n" and not k.startswith("n_"))
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"| {r['task']} | {data} | {key} | {shown} | {paper} |")
    return "\n".join(lines) + "\n"
