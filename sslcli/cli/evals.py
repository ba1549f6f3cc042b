"""`ssl eval knn|linear|fewshot|davis|retrieval|all`: frozen-backbone evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sslcli import runfiles
from sslcli.cli.common import emit_json, exits_on_errors, stderr, stdout
from sslcli.cli.progress import task_progress
from sslcli.device import DEVICE_KINDS
from sslcli.errors import UsageError
from sslcli.eval import suite, tasks
from sslcli.config import KNN_KS
from sslcli.eval.options import DavisOptions, FewshotOptions, KnnOptions, LinearOptions, RetrievalOptions

app = typer.Typer(help="Evaluate frozen features with the standard protocols.", no_args_is_help=True)

Weights = Annotated[Optional[str], typer.Option("--weights", "-w", help="Run dir, checkpoint or exported backbone.")]
Which = Annotated[str, typer.Option("--which", help="teacher | student (training checkpoints).")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
Cache = Annotated[Optional[Path], typer.Option("--cache", help="Feature cache folder (reused across evals).")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Crop size (default: the size the weights were trained at).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per extraction batch.")]
Workers = Annotated[int, typer.Option("--workers", help="Data-loading processes.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the JSON report to this file.")]
Json = Annotated[bool, typer.Option("--json", help="Print the JSON report to stdout (and nothing else).")]
File = Annotated[Optional[str], typer.Option(metavar="<path>", help="Feature file (safetensors).")]


def source(weights, which, device, cache, image_size, batch_size=256, workers=4) -> tasks.Source:
    if device not in DEVICE_KINDS:
        raise UsageError(f"--device must be {', '.join(DEVICE_KINDS)}, got '{device}'")
    return tasks.Source(weights, which, device, cache, image_size, batch_size, workers)


def flatten(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten(value, f"{name} ")
        else:
            rows.append((name, value))
    return rows


def render(result: dict, out: Path | None, json_out: bool) -> None:
    """Table on stdout (the report's notes after it, on stderr), or JSON alone on stdout with --json;
    --out writes the JSON file too, and weights from a run directory get the report as
    RUN_DIR/evals/<task>.json (`ssl runs` shows it)."""
    text = json.dumps(result, indent=2) + "\n"
    if out is not None:
        runfiles.atomic_write_text(out, text, what="report")
    weights = result.get("weights") or {}  # None for evals of feature files
    run = runfiles.run_dir_of(Path(weights["path"])) if weights.get("path") else None
    if run is not None and (run / runfiles.CONFIG_FILE).is_file():
        runfiles.atomic_write_text(run / "evals" / f"{result['task']}.json", text, what="report")
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{result['task']} ({result['seconds']:.1f} s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in flatten(result["metrics"]):
        if name.startswith("per_object"):
            continue
        table.add_row(name, fmt(value))
    stdout.print(table)
    for note in result.get("notes", []):
        stderr.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def fmt(value: object) -> str:
    """Percentages with 2 decimals; small rates (lr) in scientific notation."""
    if isinstance(value, float):
        return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
    return str(value)


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers like 1e-4,1e-3, got '{text}'") from None


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise UsageError(f"--k expects comma-separated integers like 10,20,100,200, got '{text}'") from None
    return ks  # the range is checked once, by KnnOptions


@app.command("knn")
@exits_on_errors
def knn(weights: Weights = None, train: Annotated[Optional[str], typer.Option(help="Labeled train folder.")] = None,
        val: Annotated[Optional[str], typer.Option(help="Labeled val folder.")] = None,
        train_features: File = None, val_features: File = None,
        k: Annotated[str, typer.Option("--k", help="Neighbour counts.")] = ",".join(map(str, KNN_KS)),
        temperature: Annotated[float, typer.Option(help="Softmax temperature of the vote.")] = KnnOptions.temperature,
        which: Which = "teacher", device: Device = "auto", cache: Cache = None, image_size: ImageSize = None,
        batch_size: BatchSize = 256, workers: Workers = 4, out: Out = None, json_out: Json = False) -> None:
    """Weighted k-NN classification (DINO protocol): top-1/top-5 per k.

    Example: ssl eval knn --weights runs/dino-s16 --train /data/imagenet/train --val /data/imagenet/val --json
    """
    src = source(weights, which, device, cache, image_size, batch_size, workers)
    opts = KnnOptions(train=train, val=val, train_features=train_features, val_features=val_features,
                      k=list(parse_ks(k)), temperature=temperature)
    with task_progress(not json_out) as progress:
        result = tasks.run_knn(src, opts, progress)
    render(result, out, json_out)


@app.command("fewshot")
@exits_on_errors
def fewshot(weights: Weights = None,
            data: Annotated[Optional[str], typer.Option(help="ImageFolder, all classes pooled.")] = None,
            features: File = None, ways: int = FewshotOptions.ways, shots: int = FewshotOptions.shots,
            queries: int = FewshotOptions.queries, episodes: int = FewshotOptions.episodes,
            seed: int = FewshotOptions.seed,
            metric: Annotated[str, typer.Option(help="accuracy | mean-per-class.")] = FewshotOptions.metric,
            which: Which = "teacher", device: Device = "auto", cache: Cache = None, image_size: ImageSize = None,
            batch_size: BatchSize = 256, workers: Workers = 4, out: Out = None, json_out: Json = False) -> None:
    """Few-shot nearest-centroid episodes: mean accuracy and 95% interval.

    Example: ssl eval fewshot --weights runs/adasim-s16 --data /data/aircraft --ways 5 --shots 5
    """
    src = source(weights, which, device, cache, image_size, batch_size, workers)
    opts = FewshotOptions(data=data, features=features, ways=ways, shots=shots, queries=queries, episodes=episodes,
                          seed=seed, metric=metric)
    with task_progress(not json_out) as progress:
        result = tasks.run_fewshot(src, opts, progress)
    render(result, out, json_out)


@app.command("linear")
@exits_on_errors
def linear(weights: Weights = None, train: Annotated[Optional[str], typer.Option(help="Labeled train folder.")] = None,
           val: Annotated[Optional[str], typer.Option(help="Labeled val folder.")] = None,
           protocol: Annotated[str, typer.Option(help="logreg (L-BFGS, any data size) | dino (the papers' "
                                                      "SGD recipe).")] = LinearOptions.protocol,
           l2: Annotated[Optional[str], typer.Option("--l2", help="logreg: L2 strengths to choose from, "
                                                                  "e.g. 1e-4,1e-3 (default: 1e-6 .. 1).")] = None,
           epochs: Annotated[int, typer.Option(help="dino: epochs.")] = LinearOptions.epochs,
           lr: Annotated[float, typer.Option(help="dino: lr per 256 images.")] = LinearOptions.lr,
           probe_batch_size: Annotated[int, typer.Option("--probe-batch-size",
                                                         help="dino: SGD batch.")] = LinearOptions.batch_size,
           n_last_blocks: Annotated[Optional[int], typer.Option(help="ViT: CLS of the last n blocks.")] = None,
           avgpool: Annotated[Optional[bool], typer.Option("--avgpool/--no-avgpool")] = None,
           fast: Annotated[bool, typer.Option("--fast", help="dino: cached features, no augmentation "
                                                             "(logreg always is).")] = LinearOptions.fast,
           train_features: File = None, val_features: File = None,
           seed: int = LinearOptions.seed, which: Which = "teacher", device: Device = "auto", cache: Cache = None,
           image_size: ImageSize = None, batch_size: BatchSize = 256, workers: Workers = 4, out: Out = None,
           json_out: Json = False) -> None:
    """Linear probe: logistic regression on cached features (default), or DINO's protocol.

    Examples:

      ssl eval linear --weights runs/demo --train builtin:shapes:train --val builtin:shapes:val

      ssl eval linear --weights runs/dino-s16 --train /data/imagenet/train --val /data/imagenet/val --protocol dino
    """
    src = source(weights, which, device, cache, image_size, batch_size, workers)
    grid = parse_floats(l2, "--l2") if l2 is not None else LinearOptions().l2
    opts = LinearOptions(train=train, val=val, train_features=train_features, val_features=val_features,
                         protocol=protocol, l2=grid, epochs=epochs, batch_size=probe_batch_size, lr=lr,
                         n_last_blocks=n_last_blocks, avgpool=avgpool, fast=fast, seed=seed)
    with task_progress(not json_out) as progress:
        result = tasks.run_linear(src, opts, progress)
    render(result, out, json_out)


@app.command("davis")
@exits_on_errors
def davis(davis_root: Annotated[str, typer.Option("--davis", metavar="<path>", help="DAVIS-2017 root.")],
          weights: Weights = None,
          predictions: Annotated[Optional[str], typer.Option(metavar="<path>",
                                                             help="Score these masks (no weights needed).")] = None,
          out_dir: Annotated[str, typer.Option("--out-dir", metavar="<path>",
                                               help="Where propagated masks go.")] = DavisOptions.out_dir,
          split: str = DavisOptions.split,
          sequences: Annotated[Optional[str], typer.Option(help="Subset: a,b,c.")] = None,
          short_side: int = DavisOptions.short_side, which: Which = "teacher", device: Device = "auto", out: Out = None,
          json_out: Json = False) -> None:
    """DAVIS-2017 label propagation and J&F scoring, or scoring alone with --predictions.

    Examples:

      ssl eval davis --weights runs/dino-s16 --davis /data/DAVIS --out-dir preds/dino-s16

      ssl eval davis --davis /data/DAVIS --predictions results/osvos
    """
    src = source(weights, which, device, None, None)
    subset = [s for s in sequences.split(",") if s] if sequences else None
    opts = DavisOptions(davis=davis_root, predictions=predictions, out_dir=out_dir, split=split, sequences=subset,
                       short_side=short_side)
    with task_progress(not json_out) as progress:
        result = tasks.run_davis_eval(src, opts, progress)
    render(result, out, json_out)


@app.command("retrieval")
@exits_on_errors
def retrieval(weights: Weights = None,
              data: Annotated[Optional[str], typer.Option(metavar="<path>",
                                                          help="ROOT with <dataset>/jpg and gnd file.")] = None,
              dataset: Annotated[str, typer.Option(help="roxford5k | rparis6k.")] = RetrievalOptions.dataset,
              query_features: File = None, db_features: File = None,
              gnd: Annotated[Optional[str], typer.Option(metavar="<path>",
                                                         help="gnd_<dataset>.pkl for feature files.")] = None,
              imsize: Annotated[Optional[int], typer.Option(help="Long side (default 224 Oxford, 512 Paris).")] = None,
              multiscale: bool = RetrievalOptions.multiscale,
              query_crop: Annotated[bool, typer.Option("--query-crop/--no-query-crop")] = RetrievalOptions.query_crop,
              which: Which = "teacher", device: Device = "auto", cache: Cache = None, workers: Workers = 4,
              out: Out = None, json_out: Json = False) -> None:
    """Revisited Oxford / Paris retrieval: mAP and mP@k for Easy, Medium and Hard.

    Example: ssl eval retrieval --weights runs/dino-s16 --data /data/revisitop --dataset roxford5k --multiscale
    """
    src = source(weights, which, device, cache, None, workers=workers)
    opts = RetrievalOptions(data=data, dataset=dataset, query_features=query_features, db_features=db_features,
                            gnd=gnd, imsize=imsize, multiscale=multiscale, query_crop=query_crop)
    with task_progress(not json_out) as progress:
        result = tasks.run_retrieval_eval(src, opts, progress)
    render(result, out, json_out)


@app.command("all")
@exits_on_errors
def run_all(weights: Weights = None,
            suite_file: Annotated[Path, typer.Option("--suite", help="YAML list of evals.")] = Path("suite.yaml"),
            which: Which = "teacher", device: Device = "auto", cache: Cache = None, workers: Workers = 4,
            out: Out = None, markdown: Annotated[Optional[Path], typer.Option("--markdown")] = None,
            json_out: Json = False) -> None:
    """Run a suite of evals reusing one feature cache; one JSON report plus a Markdown table.

    Example: ssl eval all --weights runs/dino-s16 --suite suite.yaml --out report.json --markdown report.md
    """
    src = source(weights, which, device, cache, None, workers=workers)
    with task_progress(not json_out) as progress:
        result = suite.run_suite(src, suite_file, progress)
    table = suite.markdown_table(result)
    if markdown is not None:
        runfiles.atomic_write_text(markdown, table, what="report")
    if out is not None:
        runfiles.atomic_write_text(out, json.dumps(result, indent=2) + "\n", what="report")
    if json_out:
        emit_json(result)
    else:
        stdout.print(table, highlight=False)
