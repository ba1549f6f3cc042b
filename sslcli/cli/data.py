"""`ssl data make KIND --out DIR`: the built-in generators' data in the real on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import typer

from sslcli.cli.common import emit_json, exits_on_errors, stdout
from sslcli.data.generators import GENERATORS
from sslcli.data.planted import FAULTS_FILE, make_audit_folder
from sslcli.errors import UsageError, hint

app = typer.Typer(help="Write built-in data in real layouts (ImageFolder, DAVIS-2017, revisitop, few-shot) "
                       "or with planted faults (audit).",
                  no_args_is_help=True)

LAYOUTS = {
    "shapes": "ImageFolder: OUT/<class>/<id>.png (builtin:shapes)",
    "fewshot": "ImageFolder of classes for few-shot episodes: OUT/<class>/<id>.png",
    "davis": "DAVIS-2017: OUT/JPEGImages/480p/<seq>/*.jpg, OUT/Annotations/480p/<seq>/*.png, OUT/ImageSets/2017/*.txt",
    "retrieval": "revisitop: OUT/<dataset>/jpg/*.jpg and OUT/<dataset>/gnd_<dataset>.pkl",
    "audit": "ImageFolders OUT/train/<class>/*.png, OUT/val/<class>/*.png with planted near duplicates, "
             f"label flips and val/train leaks; ground truth OUT/{FAULTS_FILE}",
}
# sslcli.data.planted imports sslcli.data.generators' helpers, so generators.GENERATORS cannot
# import it back (cycle): the audit generator joins the table here.
KINDS = {**GENERATORS, "audit": make_audit_folder}


@app.command("make")
@exits_on_errors
def make(
    kind: str = typer.Argument(..., help="shapes | fewshot | davis | retrieval | audit"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to create (must not exist or be empty)."),
    split: str = typer.Option("train", "--split", help="shapes: train | val."),
    dataset: str = typer.Option("roxford5k", "--dataset", help="retrieval: roxford5k | rparis6k."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON description to stdout."),
) -> None:
    """Write a small dataset of KIND in its real layout, to try an eval end to end without downloads.

    Examples:

      ssl data make davis --out data/davis && ssl eval davis --weights runs/demo --davis data/davis --out-dir preds

      ssl data make retrieval --out data/rox && ssl eval retrieval --weights runs/demo --data data/rox --dataset roxford5k

      ssl data make audit --out data/audit --seed 1   (train/ and val/ with known faults, listed in data/audit/faults.json)
    """
    if kind not in KINDS:
        raise UsageError(f"unknown data kind '{kind}'{hint(kind, KINDS)} (kinds: {', '.join(KINDS)})")
    kwargs = {"shapes": {"split": split}, "retrieval": {"dataset": dataset}}.get(kind, {})
    root = KINDS[kind](out, seed=seed, **kwargs)
    result = {"kind": kind, "out": str(root), "layout": LAYOUTS[kind]}
    if json_out:
        emit_json(result)
    else:
        stdout.print(f"wrote {kind} data to {root}  ({LAYOUTS[kind]})")
