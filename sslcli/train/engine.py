"""The training loop, one for all methods (DESIGN.md "Training engine").

Per batch: method.loss -> backward -> cancel frozen grads -> per-parameter clip -> optimizer step
-> method.after_step (EMA, centre). Schedules are precomputed per iteration. The step has no host
syncs: loss sums, divergence flags and diagnostics stay on the device and are read only every
`train.log_every` steps (and at epoch ends), when a metrics.jsonl line is written.

Checkpoints: `last.safetensors` at every epoch end (and on Ctrl-C, at the last completed step),
`epoch-NNNN.safetensors` every `checkpoint_every` epochs. A checkpoint is written only after the
divergence guard has confirmed every step since the previous one was finite, so the last
checkpoint on disk is always good. Resume restores everything (weights, optimizer, method state,
RNG of every rank, sampler position, log-interval accumulators): the resumed loss sequence equals
the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from sslcli.config import Config, OptimConfig
from sslcli.errors import TrainingError
from sslcli.methods import Method, StepOutput
from sslcli.schedules import cosine_schedule, epoch_cosine_schedule
from sslcli.train.optim import clip_gradients_per_param, scaled_lr, set_lr_wd

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

    def check(self, last_checkpoint: Path | None) -> None:
        """Host sync. Raises TrainingError naming the step and the non-finite terms."""
        first = int(self.first_step.item())
        if first < 0:
            return
        terms = [n for n, bad in zip(self.names, self.bad_terms.tolist()) if bad and n != "loss"] or ["loss"]
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise TrainingError(f"training diverged: non-finite {', '.join(terms)} at step {first + 1}; "
                            f"stopped ({kept})")


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
    stats: dict[str, Tensor] = field(default_factory=dict)
    last_record: dict = field(default_factory=dict)
    epoch_record: dict = field(default_factory=dict)  # last per-epoch figures (bootstrap_ratio, nn_acc, ...)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on GPUs that support it ('auto' or 'bf16'), nothing (fp32) elsewhere."""
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def train_step(method: Method, optimizer: torch.optim.Optimizer, crops: list[Tensor], epoch: int,
               lr: float, wd: float, clip: float, precision: str, with_stats: bool) -> StepOutput:
    """One optimizer step on one batch of views; no host syncs."""
    set_lr_wd(optimizer, lr, wd)
    with autocast_context(precision, crops[0].device):
        out = method.loss(crops, epoch, with_stats)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    method.cancel_gradients(epoch)
    clip_gradients_per_param([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()
    return out


def log_record(cfg: Config, state: LoopState, epoch: int, sched: Schedules, method: Method) -> dict:
    """The metrics.jsonl line of the interval that just closed (host sync happens here)."""
    i = state.step - 1
    seconds = max(state.data_wait + state.compute, 1e-9)
    loss_sum = state.loss_sum.detach().clone()
    if dist.is_available() and dist.is_initialized():  # the global batch's loss, not rank 0's half
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    record = {
        "epoch": epoch, "step": state.step,
        "loss": float(loss_sum.item()) / max(state.count, 1),
        "lr": sched.lr[i], "wd": sched.wd[i],
        "momentum": getattr(method, "momentum", [None] * (i + 1))[i],
        "img_per_s": state.images / seconds,
        "data_wait": state.data_wait / seconds,
        "bad_images": state.bad_images,
    }
    temps = getattr(method, "teacher_temp", None)
    if temps is not None:
        record["teacher_temp"] = temps[min(epoch, len(temps) - 1)]
    record.update({k: float(v.item()) for k, v in state.stats.items()})
    return record


def reset_interval(state: LoopState) -> None:
    state.loss_sum = None
    state.count = 0
    state.data_wait = state.compute = 0.0
    state.images = 0


def health_warnings(record: dict, out_dim: int, embed_dim: int) -> list[tuple[str, str]]:
    """(kind, message) pairs for collapse signals in a metrics record (checked after epoch 0)."""
    found = []
    entropy = record.get("teacher_entropy")
    if entropy is not None and record.get("kl", 1.0) < 1e-3 and entropy > 0.9 * math.log(out_dim):
        found.append(("uniform", "teacher output is near uniform and KL ~ 0: collapse "
                                 "(centering dominates; lower the teacher temperature?)"))
    marginal = record.get("teacher_marginal_entropy")
    if marginal is not None and marginal < 0.1:  # sharp per image is fine; the same prototype for all is not
        found.append(("onehot", "the teacher puts the whole batch on one prototype: collapse "
                                "(sharpening dominates; check centering / temperature)"))
    std = record.get("embed_std")
    if std is not None and std < 0.1 / math.sqrt(embed_dim):
        found.append(("std", f"teacher embedding std {std:.2e} << 1/sqrt(d): representation collapse"))
    return found


def timed(clock: list[float]) -> float:
    """Seconds since the last call (clock holds the previous time)."""
    now = time.perf_counter()
    elapsed, clock[0] = now - clock[0], now
    return elapsed
