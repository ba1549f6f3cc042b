"""`ssl presets list|show`."""

from __future__ import annotations

import typer
from rich.table import Table

from sslcli.cli.common import emit_json, exits_on_errors, stdout
from sslcli.config import Config, load_config, preset_names, to_yaml

app = typer.Typer(help="List and show the shipped presets (one per paper-table row).", no_args_is_help=True)


def preset_row(cfg: Config) -> dict:
    crops = f"{cfg.data.global_crops}x{cfg.data.global_crop_size}"
    if cfg.data.local_crops:
        crops += f"+{cfg.data.local_crops}x{cfg.data.local_crop_size}"
    return {"name": cfg.name, "method": cfg.method.name, "bootstrap": cfg.bootstrap.name, "arch": cfg.model.arch,
            "epochs": cfg.train.epochs, "crops": crops, "paper": cfg.source.paper, "table": cfg.source.table,
            "row": cfg.source.row, "reported": cfg.source.reported}


@app.command("list")
@exits_on_errors
def list_presets(json_out: bool = typer.Option(False, "--json", help="Print a JSON list to stdout.")) -> None:
    """Every preset with its paper, table, row and reported numbers.

    Example: ssl presets list --json | jq '.[] | select(.epochs == 800) | .name'
    """
    rows = [preset_row(load_config(name)) for name in preset_names()]
    if json_out:
        emit_json(rows)
        return
    table = Table(title="sslcli presets")
    table.add_column("name", no_wrap=True)  # names are copied into commands: never wrapped
    table.add_column("method")
    table.add_column("arch", no_wrap=True)
    for column in ("epochs", "crops", "paper", "table", "row", "reported"):
        table.add_column(column, overflow="fold")
    for r in rows:
        reported = ", ".join(f"{k} {v}" for k, v in r["reported"].items())
        paper = r["paper"].split(" (")[0]  # the full citation is in `ssl presets show` / --json
        table.add_row(r["name"], r["method"] + ("" if r["bootstrap"] == "none" else f"+{r['bootstrap']}"),
                      r["arch"], str(r["epochs"]), r["crops"], paper, r["table"], r["row"], reported)
    stdout.print(table)


@app.command("show")
@exits_on_errors
def show_preset(name: str = typer.Argument(..., help="Preset name or YAML file.")) -> None:
    """The fully resolved config of a preset, as YAML (re-runnable with --config).

    Example: ssl presets show dino-vits16 > my.yaml
    """
    typer.echo(to_yaml(load_config(name)), nl=False)
