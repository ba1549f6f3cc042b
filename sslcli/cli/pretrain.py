"""`ssl pretrain`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sslcli.cli.common import emit_json, exits_on_errors, setup_logging, stdout
from sslcli.cli.progress import ReporterFactory
from sslcli.config import load_config, to_dict, to_yaml
from sslcli.errors import UsageError
from sslcli.eval.monitor import KnnMonitor
from sslcli.train.distributed import in_torchrun
from sslcli.train.pretrain import RunOptions, check_run, pretrain, resume_config


@exits_on_errors
def pretrain_command(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name (ssl presets list) or YAML file."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config YAML merged over the preset."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override KEY=VALUE (YAML-typed), repeatable."),
    data: Optional[str] = typer.Option(None, "--data", help="Training images: ImageFolder root, folder, builtin:NAME."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/PRESET-TIME)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.safetensors (with the "
                                "run's own config unless --preset/--config is given; --set may change the "
                                "number of epochs and how the run executes)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start both backbones from these weights: "
                                             "an `ssl export`, a timm state dict (.safetensors), a checkpoint or a "
                                             "run directory; heads start fresh (model.init_from)."),
    gpus: int = typer.Option(0, "--gpus", help="Start N processes, one per local GPU (NCCL)."),
    procs: int = typer.Option(0, "--procs", help="Start N CPU processes (gloo), e.g. to test DDP."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings only."),
    json_out: bool = typer.Option(False, "--json", help="Print summary.json to stdout (and nothing else)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config, data and model, print the resolved "
                                 "config as YAML (JSON with --json) and exit without training."),
) -> None:
    """Pretrain a backbone with a self-distillation method.

    Examples:

      ssl pretrain --preset demo

      ssl pretrain --preset dino-vits16 --data /datasets/imagenet/train --gpus 8 --out runs/dino-s16

      ssl pretrain --out runs/dino-s16 --resume

      ssl pretrain --out runs/dino-s16 --resume --set train.epochs=300

      ssl pretrain --preset dino-vits16 --set optim.lr=1e-3 --dry-run

      ssl pretrain --preset dino-vits16 --data /data/mine --init-from vits16.safetensors --set train.freeze_backbone_epochs=2
    """
    if not preset and not config and not resume:
        raise UsageError("give --preset NAME (see: ssl presets list) or --config FILE")
    if gpus and procs:
        raise UsageError("--gpus and --procs are exclusive (--gpus N starts one process per GPU)")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got '{device}'")
    setup_logging(quiet or json_out)
    extra = [f"data.path={data}"] if data else []
    if init_from is not None:
        if resume:
            raise UsageError("--init-from starts a new run; --resume continues from the run's own checkpoint")
        extra.append(f"model.init_from={json.dumps(str(init_from))}")  # quoted: any path is a YAML string
    if resume and out is None:
        raise UsageError("--resume needs --out RUN_DIR")
    if resume and not preset and not config:  # the run's own config, with the overrides allowed on resume
        cfg = resume_config(out, list(overrides) + extra)
    else:
        cfg = load_config(preset, str(config) if config else None, list(overrides) + extra)
    if dry_run:
        check_run(cfg, max(gpus, procs, 1))
        emit_json(to_dict(cfg)) if json_out else typer.echo(to_yaml(cfg), nl=False)
        return
    if out is None:
        if in_torchrun():  # every rank must name the same (shared) directory
            raise UsageError("under torchrun pass --out RUN_DIR (on storage shared by all nodes)")
        out = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = RunOptions(out=out, resume=resume, device="cuda" if gpus else ("cpu" if procs and device == "auto" else device),
                      procs=max(gpus, procs, 1))
    summary = pretrain(cfg, opts, ReporterFactory(quiet=quiet or json_out), make_monitor=KnnMonitor)
    if json_out:
        emit_json(summary)
    else:
        render_summary(summary, out)


def render_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"{summary['name']}: {summary['steps']} steps in {summary['wall_seconds']:.0f} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("final loss", f"{summary['final_loss']:.4f}" if summary.get("final_loss") is not None else "-")
    if "knn_top1_init" in summary:
        table.add_row("k-NN top-1, initial teacher (%)", f"{summary['knn_top1_init']:.2f}")
        table.add_row("k-NN top-1, trained teacher (%)", f"{summary['knn_top1_final']:.2f}")
    for key, value in summary.get("bootstrap", {}).items():  # last epoch: bootstrap_ratio, nn_acc, nn2_acc
        table.add_row(f"{key}, last epoch (%)", f"{value:.2f}")
    for key, value in summary["source"].get("reported", {}).items():
        table.add_row(f"reported {key} ({summary['source'].get('paper', '').split(' (')[0]})", str(value))
    if summary.get("bad_images"):
        table.add_row("corrupt images skipped", str(summary["bad_images"]))
    stdout.print(table)
    stdout.print(f"run directory: {out}")
