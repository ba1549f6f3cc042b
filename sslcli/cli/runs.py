"""`ssl runs list|compare|plot`."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sslcli import plots, runs
from sslcli.cli.common import emit_json, exits_on_errors, stderr, stdout
from sslcli.errors import UsageError, hint

app = typer.Typer(help="List, compare and plot run directories (status, figures, the settings a sweep varied).",
                  no_args_is_help=True)


@app.command("list")
@exits_on_errors
def list_runs(
    dirs: Optional[list[Path]] = typer.Argument(None, help="Run directories or folders of runs (default: ./runs)."),
    sort: str = typer.Option("name", "--sort", help=f"Column to sort by: {', '.join(runs.COLUMNS)}."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON (and nothing else)."),
    csv_out: bool = typer.Option(False, "--csv", help="Print the rows as CSV."),
) -> None:
    """One row per run: status, epochs, last loss, k-NN, wall time.

    Example: ssl runs list runs/ --sort knn_top1
    """
    if sort not in runs.COLUMNS:
        raise UsageError(f"unknown --sort column '{sort}'{hint(sort, runs.COLUMNS)}")
    rows = [runs.describe(run) for run in runs.find_runs(dirs or [Path("runs")])]
    rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0))
    render(rows, list(runs.COLUMNS), json_out, csv_out, False)


@app.command("compare")
@exits_on_errors
def compare_runs(
    dirs: list[Path] = typer.Argument(..., help="Run directories or folders of runs."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON (and nothing else)."),
    csv_out: bool = typer.Option(False, "--csv", help="Print the rows as CSV."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
) -> None:
    """The config keys that differ between runs (a sweep's axes), next to their final figures.

    Example: ssl runs compare runs/lr-*
    """
    axes, rows = runs.compare(runs.find_runs(dirs))
    render(rows, ["name", *axes, "status", "epoch", "loss", "knn_top1"], json_out, csv_out, markdown)


@app.command("plot")
@exits_on_errors
def plot_runs(
    dirs: list[Path] = typer.Argument(..., help="Run directories or folders of runs."),
    metric: str = typer.Option("loss,knn_top1", "--metric", help="Comma-separated metrics.jsonl fields, one panel each."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="The PNG to write."),
    title: str = typer.Option("", "--title", help="A title above the panels."),
) -> None:
    """Training curves of several runs in one PNG: a panel per metric, a line per run, labelled by
    the settings that differ between the runs. Needs the extra: pip install 'sslcli[plot]'.

    Example (AdaSim's Figure 3): ssl runs plot runs/tau-* --metric bootstrap_ratio,nn_acc,nn2_acc --out fig3.png
    """
    metrics = [m.strip() for m in metric.split(",") if m.strip()]
    if not metrics:
        raise UsageError("--metric names no metric (e.g. --metric loss,knn_top1)")
    curves = runs.curves(runs.find_runs(dirs), metrics)
    plots.plot_curves(curves, metrics, out, title)
    stderr.print(escape(f"wrote {out} ({len(metrics)} panels, {len({c.run for c in curves.curves})} runs, x in {curves.x_unit}s)"))


def render(rows: list[dict[str, Any]], columns: list[str], json_out: bool, csv_out: bool, markdown: bool) -> None:
    if json_out:
        emit_json(rows)
    elif csv_out:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(text.getvalue(), nl=False)
    elif markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
        typer.echo("\n".join(lines))
    else:  # the terminal table leaves the path out (JSON and CSV have it)
        columns = [c for c in columns if c != "path"]
        table = Table()
        for column in columns:  # names and statuses stay whole in a narrow terminal; the others may shrink
            whole = max((len(cell(r.get(column))) for r in rows), default=0) if column in ("name", "status") else None
            table.add_column(column, justify="right" if column in ("epoch", "epochs", "loss", "knn_top1", "wall_s") else "left",
                             min_width=min(whole, 40) if whole else None, no_wrap=whole is not None)
        for r in rows:
            table.add_row(*(cell(r.get(c)) for c in columns))
        stdout.print(table)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
