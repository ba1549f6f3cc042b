"""`ssl export`."""

from __future__ import annotations

from pathlib import Path

import typer

from sslcli.cli.common import emit_json, exits_on_errors, stdout
from sslcli.export import export_backbone


@exits_on_errors
def export_command(
    weights: Path = typer.Option(..., "--weights", "-w", help="Run directory or training checkpoint."),
    fmt: str = typer.Option("timm", "--format", "-f", help="timm (safetensors) | torchscript."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file."),
    which: str = typer.Option("teacher", "--which", help="teacher | student."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON description to stdout."),
) -> None:
    """Export a trained backbone for timm (safetensors + architecture metadata) or TorchScript.

    Example:

      ssl export --weights runs/dino-s16 --format timm --out vits16-dino.safetensors

    then in Python: timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=FILE),
    num_classes=0, **timm_kwargs) with arch and timm_kwargs from the file's header.
    """
    result = export_backbone(weights, out, fmt, which)
    if json_out:
        emit_json(result)
    else:
        stdout.print(f"exported {result['which']} {result['arch']} ({result['parameters'] / 1e6:.1f} M parameters, "
                     f"{result['embed_dim']}-d features) as {result['format']} to {result['out']}")
