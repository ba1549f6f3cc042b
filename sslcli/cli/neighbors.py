"""`ssl neighbors`: the AdaSim neighbour audit of a run (ranked S_win with p_win and class ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sslcli.cli.common import emit_json, exits_on_errors, stdout
from sslcli.cli.progress import task_progress
from sslcli.neighbors import run_audit

SHOWN = 50  # scan rows drawn in the table (--out / --json give all of them)


@exits_on_errors
def neighbors_command(
    weights: Annotated[Optional[str], typer.Option(
        "--weights", "--run", "-w",
        help="Run directory or training checkpoint (default: the newest run in ./runs).")] = None,
    query: Annotated[Optional[int], typer.Option(
        "--query", help="Image id (position in ImageFolder order): list its AdaSim candidates and p_win.")] = None,
    scan: Annotated[Optional[str], typer.Option(
        "--scan", help="Audit every image: not-self (top candidate is another image) or other-class.")] = None,
    top: Annotated[Optional[int], typer.Option(
        "--top", help="With --query: the K most probable neighbours only.")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="With --scan: the N most confident rows only.")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="The run's training images if they moved (default: the run's data.path).")] = None,
    image: Annotated[Optional[Path], typer.Option(
        "--image", help="With --query: write a contact sheet PNG.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the result to FILE.csv or FILE.json.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON to stdout (and nothing else).")] = False,
) -> None:
    """Show the neighbours AdaSim learned: one image's candidates with p_win, or a scan of all images.

    Examples:

      ssl neighbors --query 493896

      ssl neighbors --run runs/adasim-s16 --query 493896 --top 5 --image sheet.png

      ssl neighbors --run runs/adasim-s16 --scan other-class --out audit.csv
    """
    with task_progress(scan is not None and not json_out) as progress:
        audit = run_audit(weights, query, scan, top, limit, data, out, image, progress)
    if json_out:
        emit_json(audit.result)
    elif isinstance(audit.result, dict):
        render_query(audit.result)
    else:
        render_scan(audit.result, scan, audit.matched)
    if not json_out:
        for label, path in (("contact sheet", image), ("result", out)):
            if path is not None:
                stdout.print(f"{label} written to {escape(str(path))}")


def render_query(result: dict) -> None:
    q = result["query"]
    name = f" ({escape(q['class_name'])})" if q["class_name"] is not None else ""
    table = Table(title=f"AdaSim neighbours of image {q['id']}{name}: tau {result['tau']:g}, "
                        f"window {result['window']}, {result['epochs_done']} epochs done",
                  caption=escape(f"query: {q['path']}  ({result['weights']})"))
    for column, justify in (("rank", "right"), ("id", "right"), ("class id", "right"), ("class name", "left"),
                            ("p_win", "right"), ("path", "left"), ("mark", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for rank, n in enumerate(result["neighbors"], 1):
        mark = "[blue]query[/]" if n["is_query"] else ("[red]other class[/]" if n["other_class"] else "")
        table.add_row(str(rank), str(n["id"]), str(n["class_id"]), escape(n["class_name"] or "-"),
                      f"{n['p_win']:.4f}", escape(n["path"]), mark)
    stdout.print(table)
    if result["epochs_done"] < result["window"]:
        stdout.print(f"note: {result['epochs_done']} of {result['window']} window epochs done; training still uses "
                     "standard pairs until the window is full")


def render_scan(rows: list[dict], kind: str, matched: int | None) -> None:
    table = Table(title=f"scan {kind}: {matched} images match", caption=(
        f"first {SHOWN} of {len(rows)} rows shown (--out FILE or --json for all)" if len(rows) > SHOWN else None))
    for column, justify in (("rank", "right"), ("query", "right"), ("class", "left"), ("neighbour", "right"),
                            ("class", "left"), ("p_win", "right"), ("query path", "left"), ("neighbour path", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for rank, r in enumerate(rows[:SHOWN], 1):
        table.add_row(str(rank), str(r["query"]), escape(_cls(r["query_class"], r["query_class_name"])),
                      str(r["neighbor"]), escape(_cls(r["neighbor_class"], r["neighbor_class_name"])),
                      f"{r['p_win']:.4f}", escape(r["query_path"]), escape(r["neighbor_path"]))
    stdout.print(table)


def _cls(class_id: int, name: str | None) -> str:
    return f"{class_id} {name}" if name is not None else str(class_id)
