"""Pieces of the training loop (sslcli.train.trainer): schedules, the divergence guard, Ctrl-C
handling and the loop's counters.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sslcli.config import OptimConfig
from sslcli.errors import TrainingError
from sslcli.methods import StepOutput
from sslcli.schedules import cosine_schedule, epoch_cosine_schedule
from sslcli.train.optim import scaled_lr

log = logging.getLogger("sslcli.train")


@dataclass
class Schedules:
    """Per-iteration learning rate and weight decay (momentum / temperatures live in the method).

    optim.schedule_unit: `step` = cosine per iteration (DINO); `epoch` = cosine per epoch, each
    value held for the epoch's iterations (SimSiam's adjust_learning_rate).
    """

    lr: list[float]
    wd: list[float]

    @classmethod
    def build(cls, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> "Schedules":
        cosine = epoch_cosine_schedule if cfg.schedule_unit == "epoch" else cosine_schedule
        lr = cosine(scaled_lr(cfg), cfg.min_lr, epochs, steps_per_epoch, cfg.warmup_epochs)
        wd = cosine(cfg.weight_decay, cfg.weight_decay_end, epochs, steps_per_epoch)
        return cls(lr, wd)


class DivergenceGuard:
    """Remembers, on the device, the first step whose loss (or a term) was not finite."""

    def __init__(self, device: torch.device):
        self.first_step = torch.tensor(-1, device=device)
        self.bad_terms: Tensor | None = None
        self.names: list[str] = []

    def observe(self, step: int, out: StepOutput) -> None:
        if self.bad_terms is None:
            self.names = ["loss"] + list(out.terms)
            self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=self.first_step.device)
        values = torch.stack([out.loss.detach().float()] + [t.float() for t in out.terms.values()])
        nonfinite = ~torch.isfinite(values)
        new = (self.first_step < 0) & nonfinite.any()
        self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
        self.bad_terms = torch.where(new, nonfinite, self.bad_terms)

    def check(self, last_checkpoint: Path | None, hint: Callable[[list[str]], str] | None = None) -> None:
        """Host sync. Raises TrainingError naming the step and the non-finite terms (and what
        `hint(terms)` says they mean, e.g. Method.divergence_hint)."""
        first = int(self.first_step.item())
        if first < 0:
            return
        terms = [n for n, bad in zip(self.names, self.bad_terms.tolist()) if bad and n != "loss"] or ["loss"]
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        why = hint(terms) if hint is not None else ""
        raise TrainingError(f"training diverged: non-finite {', '.join(terms)} at step {first + 1}"
                            f"{f' ({why})' if why else ''}; stopped ({kept})")


class StopRequest:
    """Ctrl-C sets a flag checked between steps, so the checkpoint is of a whole step.

    A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self):
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave the default behaviour
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass
class LoopState:
    """Counters of the running loop; `loss_sum`/`count` are the open log interval's accumulators."""

    step: int = 0  # optimizer steps completed
    steps_per_epoch: int = 1
    loss_sum: Tensor | None = None
    count: int = 0
    data_wait: float = 0.0
    compute: float = 0.0
    images: int = 0
    bad_images: int = 0
    last_checkpoint: Path | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)  # diagnostics of the last log step
    scalars: dict[str, float] = field(default_factory=dict)  # the method's logged values of the last step
    last_record: dict = field(default_factory=dict)
    epoch_record: dict = field(default_factory=dict)  # last per-epoch figures (bootstrap_ratio, nn_acc, ...)


def reset_interval(state: LoopState) -> None:
    state.loss_sum = None
    state.count = 0
    state.data_wait = state.compute = 0.0
    state.images = 0


def timed(clock: list[float]) -> float:
    """Seconds since the last call (clock holds the previous time)."""
    now = time.perf_counter()
    elapsed, clock[0] = now - clock[0], now
    return elapsed
