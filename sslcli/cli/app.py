"""The `ssl` command: a thin Typer app. Each command parses, calls one library function, renders."""

from __future__ import annotations

import typer

from sslcli.cli import data, evals, presets, runs
from sslcli.cli.export import export_command
from sslcli.cli.neighbors import neighbors_command
from sslcli.cli.pretrain import pretrain_command

app = typer.Typer(
    name="ssl",
    help="Pretrain, evaluate and audit self-distillation vision models: DINO, DINO-2 (two global "
         "crops) and SimSiam, with NN, AdaSim or oracle neighbour bootstrapping.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("pretrain")(pretrain_command)
app.command("export")(export_command)
app.command("neighbors")(neighbors_command)
app.add_typer(evals.app, name="eval")
app.add_typer(presets.app, name="presets")
app.add_typer(data.app, name="data")
app.add_typer(runs.app, name="runs")


def main() -> None:
    app()
