"""`ssl eval all --suite FILE.yaml`: several evals of one backbone, one feature cache, one report.

Suite file:
    evals:
      - {task: knn, train: /data/imagenet/train, val: /data/imagenet/val, k: [10, 20]}
      - {task: linear, train: ..., val: ...}                   # logreg, the default protocol
      - {task: linear, train: ..., val: ..., protocol: dino}   # DINO's recipe (the papers' rows)
      - {task: fewshot, data: /data/aircraft, ways: 5, shots: 5}
      - {task: davis, davis: /data/DAVIS, out_dir: preds/davis}
      - {task: retrieval, data: /data/revisitop, dataset: roxford5k, multiscale: true}
Each entry takes the fields of its task's options dataclass (sslcli.eval.options: the options of
`ssl eval TASK`, snake_case, same defaults); an unknown task or key, or a value of the wrong type, is
an input error (exit 2) naming the entry and the dotted key, e.g. 'knn.temperature'.
Report: {"weights", "results": [one report per eval], "reported"} where `reported` is the
preset's paper numbers when the weights come from a preset run; the Markdown table puts each
headline figure beside the paper's number under the same key (knn, linear, ...). A linear row names
its protocol in the metric column ("top1 (logreg)"): the papers' linear numbers are DINO-protocol
figures (protocol dino), so a logreg figure beside them is not a reproduction check. The reports'
notes (small-data caveats) follow the table as a list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sslcli.errors import ConfigError, UsageError
from sslcli.eval import tasks
from sslcli.eval.options import parse_options
from sslcli.eval.weights import read_weights_info
from sslcli.typed import read_yaml_file

RUNNERS: dict[str, Callable[..., dict]] = {"knn": tasks.run_knn, "linear": tasks.run_linear,
                                           "fewshot": tasks.run_fewshot, "davis": tasks.run_davis_eval,
                                           "retrieval": tasks.run_retrieval_eval}
HEADLINE = {"knn": "top1", "linear": "top1", "fewshot": "accuracy", "davis": "J&F-Mean", "retrieval": "mAP-M"}


def read_suite(path: Path) -> list[tuple[str, Any]]:
    """[(task, its options dataclass)] of every entry, all checked before any eval runs."""
    data = read_yaml_file(Path(path), "suite file")  # size and alias-bomb limits, one-line errors
    entries = data.get("evals") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"suite file '{path}' needs a non-empty list under 'evals:'")
    return [_parse_entry(entry, f"{path}: evals[{i}]") for i, entry in enumerate(entries)]


def _parse_entry(entry: Any, where: str) -> tuple[str, Any]:
    """One `{task: NAME, key: value, ...}` mapping -> (NAME, options); errors name `where` and the key."""
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
        raise UsageError(f"{where} must be a mapping with a 'task' key")
    task, options = entry["task"], {k: v for k, v in entry.items() if k != "task"}
    try:
        return task, parse_options(task, options)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def run_suite(src: tasks.Source, suite_file: Path, progress: tasks.Progress | None = None) -> dict:
    """Run every entry (features cached in src.cache) and collect the reports."""
    entries = read_suite(suite_file)
    reported = read_weights_info(src.weights, src.which)[0].reported if src.weights else {}
    results = [RUNNERS[task](src, options, progress) for task, options in entries]
    return {"weights": src.weights, "which": src.which, "results": results, "reported": reported}


def markdown_table(suite_report: dict) -> str:
    """| task | data | metric | value | paper |, one row per eval's headline figure."""
    lines = ["| task | data | metric | value | paper |", "|---|---|---|---|---|"]
    reported = suite_report.get("reported") or {}
    notes = []
    for r in suite_report["results"]:
        key = HEADLINE[r["task"]]
        value = r["metrics"].get(key)
        paper = reported.get(r["task"], "")
        data = ", ".join(str(v) for k, v in r["data"].items() if k != "n" and not k.startswith("n_"))
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        metric = f"{key} ({r['metrics']['protocol']})" if "protocol" in r["metrics"] else key
        lines.append(f"| {r['task']} | {data} | {metric} | {shown} | {paper} |")
        notes += [f"- {note}" for note in r.get("notes", [])]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
