"""Training state <-> checkpoint sections (the file layout itself is sslcli.runfiles).

model: method.state_dict(); optim: optimizer state per parameter index (exp_avg, step, ...), its
param-group settings in the header as JSON; rng: torch [world, L] and on GPU cuda [world, L'];
engine: loop accumulators; extra: other owned state (bootstrap cache and window).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sslcli import runfiles
from sslcli.errors import CheckpointError
from sslcli.runfiles import CheckpointHeader


@dataclass
class TrainingState:
    """Everything needed to continue a run, as read from or written to a checkpoint."""

    model: dict[str, Tensor]
    optim_state: dict[int, dict[str, Tensor]]
    optim_groups: list[dict]
    rng: dict[str, Tensor]
    engine: dict[str, Tensor]
    extra: dict[str, Tensor]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[int, dict[str, Tensor]], list[dict]]:
    """Split optimizer.state_dict() into tensors and JSON-able param-group settings."""
    sd = optimizer.state_dict()
    state = {int(i): {k: v for k, v in s.items() if isinstance(v, Tensor)} for i, s in sd["state"].items()}
    return state, sd["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Tensor]],
                           groups: list[dict]) -> None:
    """Inverse of optimizer_to_tensors. Implementation switches (fused, foreach) stay the current
    optimizer's, so a run checkpointed on GPU resumes on CPU and vice versa; so do the group
    multipliers, which follow from the config (0.1.0 checkpoints have none: `apply_wd` instead)."""
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError("checkpoint optimizer does not match this config (parameter groups differ)")
    for saved, current in zip(groups, optimizer.param_groups):
        saved.pop("apply_wd", None)
        for key in ("fused", "foreach", "capturable", "differentiable", "lr_mult", "wd_mult", "constant_lr"):
            if key in current:
                saved[key] = current[key]
        if "betas" in saved:
            saved["betas"] = tuple(saved["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(path: Path, state: TrainingState, header: CheckpointHeader) -> None:
    optim = {f"{i}/{k}": v for i, entries in state.optim_state.items() for k, v in entries.items()}
    sections = {"model": state.model, "optim": optim, "rng": state.rng, "engine": state.engine, "extra": state.extra}
    runfiles.write_sections(path, sections, header, {"optim_groups": json.dumps(state.optim_groups)})


def load_training_state(path: Path) -> tuple[TrainingState, CheckpointHeader]:
    header = runfiles.read_checkpoint_header(path)
    sections = runfiles.read_sections(path)
    optim: dict[int, dict[str, Tensor]] = {}
    for key, tensor in sections["optim"].items():
        index, _, name = key.partition("/")
        optim.setdefault(int(index), {})[name] = tensor
    groups = json.loads(runfiles.read_metadata(path).get("optim_groups", "[]"))
    state = TrainingState(sections["model"], optim, groups, sections["rng"], sections["engine"], sections["extra"])
    return state, header
