"""Shared checks on tiny training runs: per-step losses, Ctrl-C at a step, and the two properties
every method must keep (two processes train like one; an interrupted run resumes exactly)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from sslcli.errors import Interrupted
from sslcli.train.pretrain import RunOptions, pretrain


def losses(run_dir: Path) -> list[float]:
    """The `loss` of every training line of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


class InterruptAt:
    """A reporter that presses Ctrl-C (SIGINT to this process) once `step` is reached."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self):
        return self

    def start(self, total_steps, start_step, steps_per_epoch):
        return None

    def update(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def epoch_end(self, epoch, metrics):
        return None

    def warn(self, message):
        return None

    def close(self):
        return None


def assert_two_processes_match_one(cfg, tmp_path: Path, steps: int) -> None:
    """`--procs 2` (gloo) logs the same per-step losses as one process on the same global batches."""
    pretrain(cfg, RunOptions(out=tmp_path / "one", device="cpu"))
    pretrain(cfg, RunOptions(out=tmp_path / "two", device="cpu", procs=2))
    assert len(losses(tmp_path / "one")) == steps
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def assert_resume_is_exact(cfg, tmp_path: Path, interrupt_step: int = 4) -> None:
    """Ctrl-C at `interrupt_step`, then --resume: the same losses as an uninterrupted run, exactly."""
    pretrain(cfg, RunOptions(out=tmp_path / "full", device="cpu"))
    with pytest.raises(Interrupted):
        pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu"), InterruptAt(step=interrupt_step))
    pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu", resume=True))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
