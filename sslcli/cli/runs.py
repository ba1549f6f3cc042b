"""`ssl runs list|compare`."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from sslcli import runs
from sslcli.cli.common import emit_json, exits_on_errors, stdout
from sslcli.errors import UsageError, hint

app = typer.Typer(help="List and compare run directories (status, figures, the settings a sweep varied).",
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
        for column in columns:
            table.add_column(column, justify="right" if column in ("epoch", "epochs", "loss", "knn_top1", "wall_s") else "left")
        for r in rows:
            table.add_row(*(cell(r.get(c)) for c in columns))
        stdout.print(table)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
