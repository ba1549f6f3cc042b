"""`ssl presets list|show`."""

from __future__ import annotations

import re

import typer
from rich import box
from rich.console import Console
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


ARCH_SHORT = re.compile(r"vit_(tiny|small|base|large|huge|giant)_patch(\d+)_\d+")
INIT_ONLY_KWARGS = {"zero_init_last"}  # model.kwargs that change initialisation, not the architecture


def short_arch(arch: str, kwargs: dict) -> str:
    """vit_small_patch16_224 -> ViT-S/16, resnet50 -> RN50, swin_tiny_patch4_window7_224 -> Swin-T/4w7;
    '*' when model.kwargs reshape the network."""
    m = ARCH_SHORT.fullmatch(arch)
    swin = re.fullmatch(r"swin_([a-z])[a-z]*_patch(\d+)_window(\d+)_\d+", arch)
    if m:
        short = f"ViT-{m.group(1)[0].upper()}/{m.group(2)}"
    elif swin:
        short = f"Swin-{swin.group(1).upper()}/{swin.group(2)}w{swin.group(3)}"
    else:
        short = re.sub(r"^resnet(\d+)$", r"RN\1", arch)
    return short + ("*" if set(kwargs) - INIT_ONLY_KWARGS else "")


def short_reported(reported: dict) -> str:
    """k-NN and linear when printed (else the first number), then how many more the preset holds."""
    keys = [k for k in ("knn", "linear") if k in reported] or list(reported)[:1]
    text = " ".join(f"{'lin' if k == 'linear' else k} {reported[k]}" for k in keys) or "-"
    more = len(reported) - len(keys)
    return text + (f" +{more}" if more else "")


@app.command("list")
@exits_on_errors
def list_presets(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list to stdout."),
    wide: bool = typer.Option(False, "--wide", help="Also show crops, paper, table, row and every reported "
                              "number (long lines: for a wide terminal or `less -S`)."),
) -> None:
    """Every preset: method, backbone, epochs and the paper's numbers (fits 80 columns).

    --wide adds the paper, table, row and crops; --json prints everything.
    Example: ssl presets list --json | jq '.[] | select(.epochs == 800) | .name'
    """
    configs = [load_config(name) for name in preset_names()]
    rows = [preset_row(cfg) for cfg in configs]
    if json_out:
        emit_json(rows)
        return
    method = [r["method"] + ("" if r["bootstrap"] == "none" else f"+{r['bootstrap']}") for r in rows]
    if wide:
        table = Table(title="sslcli presets")
        table.add_column("name", no_wrap=True)  # names are copied into commands: never wrapped
        table.add_column("method", no_wrap=True)
        table.add_column("arch", no_wrap=True)
        for column in ("epochs", "crops", "paper", "table", "row", "reported"):
            table.add_column(column, no_wrap=True)
        for r, m in zip(rows, method):
            reported = ", ".join(f"{k} {v}" for k, v in r["reported"].items())
            paper = r["paper"].split(" (")[0]  # the full citation is in `ssl presets show` / --json
            table.add_row(r["name"], m, r["arch"], str(r["epochs"]), r["crops"], paper, r["table"], r["row"],
                          reported)
        # Never squeezed into one-letter columns: rendered at its natural width, wider than a
        # narrow terminal if need be (read it in a wide window or with `less -S`).
        width = max(stdout.width, stdout.measure(table, options=stdout.options.update_width(10_000)).maximum)
        (stdout if width == stdout.width else Console(file=stdout.file, width=width)).print(table)
        return
    table = Table(title="sslcli presets", caption="* arch reshaped by model.kwargs; more: --wide, --json",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("name", no_wrap=True)  # names are copied into commands: never wrapped
    table.add_column("method", no_wrap=True)
    table.add_column("arch", no_wrap=True)
    table.add_column("ep", no_wrap=True, justify="right")
    table.add_column("reported")
    for r, m, cfg in zip(rows, method, configs):
        table.add_row(r["name"], m, short_arch(cfg.model.arch, cfg.model.kwargs), str(r["epochs"]),
                      short_reported(r["reported"]))
    stdout.print(table)


@app.command("show")
@exits_on_errors
def show_preset(name: str = typer.Argument(..., help="Preset name or YAML file.")) -> None:
    """The fully resolved config of a preset, as YAML (re-runnable with --config).

    Example: ssl presets show dino-vits16 > my.yaml
    """
    typer.echo(to_yaml(load_config(name)), nl=False)
