"""Training curves of several runs drawn into one PNG (`ssl runs plot`).

One panel per metric (up to three per row), one line per run in the same colour and dash pattern in every panel,
labelled once in a legend under the panels. matplotlib is an optional extra (`pip install
'sslcli[plot]'`): nothing else in the tool needs it, so a plain install stays lean. Drawn with the
object-oriented API on the Agg canvas, never pyplot: no global figure state and no screen needed.
"""

from __future__ import annotations

import math
from pathlib import Path

from sslcli import runfiles
from sslcli.errors import UsageError
from sslcli.runs import Curves

PANELS_PER_ROW = 3
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS_UP_TO = 40  # points per line: fewer are drawn with markers (per-epoch figures, k-NN)

# Metrics logged in percent (0-100); the others are drawn in their own units.
PERCENT = {"knn_top1", "bootstrap_ratio", "nn_acc", "nn2_acc", "data_wait"}


def plot_curves(curves: Curves, metrics: list[str], out: Path, title: str = "") -> None:
    """Write the PNG `out` (atomically); UsageError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("ssl runs plot needs matplotlib, an optional extra: pip install 'sslcli[plot]'") from None
    columns = min(len(metrics), PANELS_PER_ROW)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    runs = list(dict.fromkeys(c.run for c in curves.curves))  # first-seen order
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    styles = {run: LINE_STYLES[i % len(LINE_STYLES)] for i, run in enumerate(runs)}  # overlapping runs stay visible
    labels = {c.run: c.label for c in curves.curves}
    for ax, metric in zip(axes, metrics):
        for curve in (c for c in curves.curves if c.metric == metric):
            marker = "o" if len(curve.x) <= MARKERS_UP_TO else None
            ax.plot(curve.x, curve.y, color=colours[curve.run], linestyle=styles[curve.run], marker=marker,
                    markersize=3, linewidth=1.4)
        ax.set_title(metric + (" (%)" if metric in PERCENT else ""))
        ax.set_xlabel(curves.x_unit)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], color=colours[run], linestyle=styles[run])[0] for run in runs]
    figure.legend(handles, [labels[run] for run in runs], loc="outside lower center",
                  ncols=min(len(runs), 3), fontsize="small", frameon=False)
    if title:
        figure.suptitle(title)
    runfiles.write_atomically(out, lambda tmp: figure.savefig(tmp, format="png", dpi=120), what="plot")
