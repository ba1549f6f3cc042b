"""The rich progress bar of `ssl pretrain` (rank 0 only, on stderr)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from sslcli.cli.common import setup_logging, stderr
from sslcli.train.reporting import NullReporter


class RichReporter:
    """epoch, step, loss, lr, img/s, data-wait share, ETA; collapse warnings printed once."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[ips]} img/s"), TextColumn("wait {task.fields[wait]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[epoch_info]}"),
            # 2 redraws/s, not rich's 10: the figures change every train.log_every steps, and each redraw
            # holds the GIL (~1.6 ms on a terminal) while the training thread needs it to launch its ops
            console=stderr, transient=False, refresh_per_second=2)
        self.task = None
        self.steps_per_epoch = 1

    def start(self, total_steps: int, start_step: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           epoch=start_step // steps_per_epoch, loss="-", lr="-", ips="-", wait="-",
                                           epoch_info="")

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=step, epoch=metrics["epoch"], loss=f"{metrics['loss']:.4f}",
                             lr=f"{metrics['lr']:.2e}", ips=f"{metrics['img_per_s']:.0f}",
                             wait=f"{100 * metrics['data_wait']:.0f}%")

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Per-epoch figures (bootstrapping: bootstrap_ratio, nn_acc, nn2_acc), kept on the bar."""
        names = {"bootstrap_ratio": "boot", "nn_acc": "nn", "nn2_acc": "nn2"}
        info = " ".join(f"{names.get(k, k)} {v:.1f}%" for k, v in metrics.items())
        self.progress.update(self.task, epoch_info=info)

    def warn(self, message: str) -> None:
        self.progress.console.print(f"[bold yellow]warning:[/] {message}")

    def close(self) -> None:
        self.progress.stop()


@dataclass
class ReporterFactory:
    """Picklable: spawned training processes build their reporter (and logging) with it."""

    quiet: bool = False

    def __call__(self):
        setup_logging(self.quiet)
        return NullReporter() if self.quiet else RichReporter()


@contextmanager
def task_progress(enabled: bool = True):
    """A factory (description, total) -> advance(n) drawing transient rich bars on stderr."""
    if not enabled:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bars:
        def factory(description: str, total: int | None):
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield factory
