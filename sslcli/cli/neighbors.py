"""`ssl neighbors`: the neighbour audit of a run's AdaSim window or of any backbone's features."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sslcli.audit import ALL_SCANS, AuditRequest, run_audit
from sslcli.cli.common import emit_json, exits_on_errors, stdout
from sslcli.cli.progress import task_progress
from sslcli.eval.tasks import Source
from sslcli.feature_audit import DEFAULT_GRID, DEFAULT_K, DEFAULT_MIN_DISAGREEMENT

SHOWN = 50  # scan rows drawn in the table (--out / --json give all of them)
MIN_PATH = 16  # characters a path column needs to be worth showing without --wide
CLASS_WIDTH = 14
NUM, TEXT, PATH = "num", "text", "path"  # column kinds: numbers and classes are never cut, paths are

# Columns per result kind: (header, row -> cell text, kind).
Column = tuple[str, Callable[[dict], str], str]


@exits_on_errors
def neighbors_command(
    weights: Annotated[Optional[str], typer.Option(
        "--weights", "--run", "-w",
        help="Run directory, checkpoint or exported backbone (default: the newest run in ./runs).")] = None,
    query: Annotated[Optional[int], typer.Option(
        "--query", help="Image id (position in ImageFolder order): list its neighbours.")] = None,
    scan: Annotated[Optional[str], typer.Option(
        "--scan", help=f"Audit every image: {' | '.join(ALL_SCANS)}.")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Folder to audit with the backbone's features (default: the run's data.path; for an "
                       "AdaSim window: the run's images if they moved).")] = None,
    against: Annotated[Optional[str], typer.Option(
        "--against", help="--scan leakage: the images to check against --data (e.g. val vs train).")] = None,
    features: Annotated[bool, typer.Option(
        "--features", help="Use the feature graph even for a run that kept an AdaSim window.")] = False,
    k: Annotated[int, typer.Option("--k", help="Neighbours per image in the feature graph.")] = DEFAULT_K,
    feature: Annotated[Optional[str], typer.Option(
        "--feature", help="cls (what the image shows) | grid (its layout: pooled patch tokens). Default: grid for "
                          "duplicates / leakage, cls otherwise.")] = None,
    grid: Annotated[int, typer.Option("--grid", help="Side of the pooled patch grid of --feature grid.")] = DEFAULT_GRID,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Cosine threshold (default: duplicates / leakage 0.9, other-class 0).")] = None,
    min_disagreement: Annotated[float, typer.Option(
        "--min-disagreement", help="other-class on features: share of the neighbours' vote against the label.")]
        = DEFAULT_MIN_DISAGREEMENT,
    top: Annotated[Optional[int], typer.Option("--top", help="With --query: the K nearest only.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="With --scan: the first N rows only.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="With --query: write a contact sheet PNG.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the result to FILE.csv or FILE.json.")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Feature cache folder (shared with ssl eval).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="Data-loading workers for the features.")] = 4,
    wide: Annotated[bool, typer.Option("--wide", help="Full paths in the table (default: shortened from the left).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON to stdout (and nothing else).")] = False,
) -> None:
    """Neighbours of one image, or a scan of all: AdaSim's window, or any backbone on any folder.

    Examples:

      ssl neighbors --run runs/adasim-s16 --query 493896 --top 5 --image sheet.png

      ssl neighbors --run runs/adasim-s16 --scan other-class --out audit.csv

      ssl neighbors --weights model.safetensors --data train/ --scan duplicates --out dups.csv

      ssl neighbors --weights model.safetensors --data train/ --scan leakage --against val/
    """
    req = AuditRequest(weights, query, scan, top, limit, data, out, image, features, k, threshold, min_disagreement,
                       against, feature, grid, Source(device=device, cache=cache, workers=workers))
    with task_progress(not json_out) as progress:
        audit = run_audit(req, progress)
    if json_out:
        emit_json(audit.result)
        return
    if isinstance(audit.result, dict):
        render_query(audit.result, wide)
    else:
        render_scan(audit.result, scan, audit.matched, wide)
    for label, path in (("contact sheet", image), ("result", out)):
        if path is not None:
            stdout.print(f"{label} written to {escape(str(path))}")


def short(text: str | None, width: int | None) -> str:
    """`text` cut from the left to `width` characters ("…" + its end); whole when width is None."""
    text = "-" if text is None else str(text)
    return text if width is None or len(text) <= width else "…" + text[-(width - 1):]


def cls(row: dict, prefix: str) -> str:
    key = f"{prefix}class" if prefix else "class_id"
    name = row.get(f"{prefix}class_name")
    return short(name if name is not None else str(row[key]), CLASS_WIDTH)


def render_query(result: dict, wide: bool) -> None:
    q, window = result["query"], "tau" in result
    if window:
        title = (f"AdaSim neighbours of image {q['id']} ({cls(q, '')}): tau {result['tau']:g}, window "
                 f"{result['window']}, {result['epochs_done']} epochs done; decision: {result.get('decision') or '-'}")
        score: list[Column] = [("p_win", lambda n: f"{n['p_win']:.4f}", NUM), ("m_win", lambda n: f"{n['m_win']:.3f}", NUM)]
    else:
        title = f"nearest images of {q['id']} ({cls(q, '')}) by cosine, k {result['k']}"
        score = [("cosine", lambda n: f"{n['similarity']:.3f}", NUM)]
    columns: list[Column] = [("id", lambda n: str(n["id"]), NUM), ("class", lambda n: cls(n, ""), TEXT), *score,
                             ("mark", lambda n: "query" if n["is_query"] else ("other class" if n["other_class"] else ""), TEXT),
                             ("path", lambda n: n["path"], PATH)]
    draw(title, columns, result["neighbors"], wide, caption=f"query: {short(q['path'], None if wide else 60)}")
    if window and result["epochs_done"] < result["window"]:
        stdout.print(f"note: {result['epochs_done']} of {result['window']} window epochs done; training still uses "
                     "standard pairs until the window is full")


def render_scan(rows: list[dict], kind: str, matched: int | None, wide: bool) -> None:
    pair: list[Column] = [("query", lambda r: str(r["query"]), NUM), ("class", lambda r: cls(r, "query_"), TEXT),
                          ("match", lambda r: str(r["neighbor"]), NUM), ("class", lambda r: cls(r, "neighbor_"), TEXT)]
    if kind == "duplicates":
        columns: list[Column] = [("cluster", lambda r: str(r["cluster"]), NUM), ("a", lambda r: str(r["a"]), NUM),
                                 ("b", lambda r: str(r["b"]), NUM), ("cosine", lambda r: f"{r['similarity']:.3f}", NUM),
                                 ("a path", lambda r: r["a_path"], PATH), ("b path", lambda r: r["b_path"], PATH)]
    elif "disagreement" in (rows or [{}])[0]:  # other-class on the feature graph
        columns = [*pair[:2], ("suggested", lambda r: short(r["suggested_class_name"] or str(r["suggested_class"]),
                                                            CLASS_WIDTH), TEXT),
                   ("disagree", lambda r: f"{r['disagreement']:.2f}", NUM), pair[2],
                   ("cosine", lambda r: f"{r['similarity']:.3f}", NUM), ("query path", lambda r: r["query_path"], PATH)]
    else:  # the window's scans (p_win) and leakage (cosine)
        score = ("p_win", lambda r: f"{r['p_win']:.4f}", NUM) if "p_win" in (rows or [{}])[0] else \
            ("cosine", lambda r: f"{r['similarity']:.3f}", NUM)
        columns = [*pair, score, ("query path", lambda r: r["query_path"], PATH),
                   ("match path", lambda r: r["neighbor_path"], PATH)]
    caption = f"first {SHOWN} of {len(rows)} rows shown (--out FILE or --json for all)" if len(rows) > SHOWN else None
    draw(f"scan {kind}: {matched} match", columns, rows[:SHOWN], wide, caption)


def draw(title: str, columns: list[Column], rows: list[dict], wide: bool, caption: str | None = None) -> None:
    """A table whose ids, figures and classes are never cut: without --wide, the path columns share
    what is left of the terminal (paths cut from the left), and trailing ones are dropped when
    each would get fewer than MIN_PATH characters (--wide, --out or --json show them)."""
    cells = [[cell(row) for _, cell, _ in columns] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (header, _, _) in enumerate(columns)]
    paths = [i for i, (_, _, kind) in enumerate(columns) if kind == PATH]
    path_width, dropped = None, []
    while not wide and paths:
        fixed = sum(w for i, w in enumerate(widths) if i not in paths) + 3 * (len(widths) - len(paths)) + 1
        path_width = (stdout.width - fixed) // len(paths) - 3
        if path_width >= MIN_PATH:
            break
        drop = paths.pop()
        dropped.append(columns[drop][0])
        columns, widths = columns[:drop] + columns[drop + 1:], widths[:drop] + widths[drop + 1:]
        cells = [r[:drop] + r[drop + 1:] for r in cells]
    if dropped:
        caption = f"{caption + '; ' if caption else ''}{', '.join(reversed(dropped))}: --wide, --out or --json"
    table = Table(title=escape(title), caption=escape(caption) if caption else None, padding=(0, 1))
    for i, (header, _, kind) in enumerate(columns):
        table.add_column(header, justify="right" if kind == NUM else "left", no_wrap=True,
                         min_width=None if kind == PATH and not wide else widths[i])
    for r in cells:
        table.add_row(*(escape(short(text, path_width) if columns[i][2] == PATH else text) for i, text in enumerate(r)))
    # --wide: as wide as the full paths need, even past the terminal (for less -S or a file)
    full = sum(widths) + 3 * len(widths) + 1
    (Console(width=full, highlight=False) if wide and full > stdout.width else stdout).print(table)
