"""Training checkpoints: one safetensors file, no pickle anywhere.

Tensors:   model/<key>           method.state_dict() (student, teacher, method state such as the centre)
           optim/<i>/<name>      optimizer state of parameter i (exp_avg, exp_avg_sq, step, momentum...)
           rng/torch [world, L]  every rank's CPU RNG state; rng/cuda [world, L'] on GPU
           engine/<name>         engine accumulators (e.g. the running loss of the log interval)
           extra/<key>           other owned state (e.g. bootstrap cache and window)
Metadata:  format, config (YAML), arch, epoch, step, world, optim_groups (JSON), time.
Writes go to a temporary file in the same folder, then os.replace: a crash never leaves a
half-written `last.safetensors`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sslcli.errors import CheckpointError
from sslcli.eval.weights import TRAIN_FORMAT, read_metadata

FORMAT = TRAIN_FORMAT


@dataclass
class TrainingState:
    """Everything needed to continue a run, as read from or written to a checkpoint."""

    model: dict[str, Tensor]
    optim_state: dict[int, dict[str, Tensor]]
    optim_groups: list[dict]
    rng: dict[str, Tensor]
    engine: dict[str, Tensor]
    extra: dict[str, Tensor]
    meta: dict[str, str]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[int, dict[str, Tensor]], list[dict]]:
    """Split optimizer.state_dict() into tensors and JSON-able param-group settings."""
    sd = optimizer.state_dict()
    state = {int(i): {k: v for k, v in s.items() if isinstance(v, Tensor)} for i, s in sd["state"].items()}
    return state, sd["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Tensor]],
                           groups: list[dict]) -> None:
    """Inverse of optimizer_to_tensors; implementation switches (fused, foreach) stay the current
    optimizer's, so a run checkpointed on GPU resumes on CPU and vice versa."""
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError("checkpoint optimizer does not match this config (parameter groups differ)")
    for saved, current in zip(groups, optimizer.param_groups):
        for key in ("fused", "foreach", "capturable", "differentiable"):
            if key in current:
                saved[key] = current[key]
        if "betas" in saved:
            saved["betas"] = tuple(saved["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """safetensors write to a temp file next to `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_training_state(path: Path, state: TrainingState) -> None:
    tensors: dict[str, Tensor] = {}
    tensors.update({f"model/{k}": v for k, v in state.model.items()})
    for i, entries in state.optim_state.items():
        tensors.update({f"optim/{i}/{k}": v for k, v in entries.items()})
    tensors.update({f"rng/{k}": v for k, v in state.rng.items()})
    tensors.update({f"engine/{k}": v for k, v in state.engine.items()})
    tensors.update({f"extra/{k}": v for k, v in state.extra.items()})
    meta = dict(state.meta, format=FORMAT, optim_groups=json.dumps(state.optim_groups))
    atomic_save(tensors, meta, path)


def load_training_state(path: Path) -> TrainingState:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an sslcli training checkpoint (format {meta.get('format')!r})")
    model, optim, rng, engine, extra = {}, {}, {}, {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            kind, _, rest = key.partition("/")
            tensor = f.get_tensor(key)
            if kind == "optim":
                index, _, name = rest.partition("/")
                optim.setdefault(int(index), {})[name] = tensor
            else:
                {"model": model, "rng": rng, "engine": engine, "extra": extra}[kind][rest] = tensor
    groups = json.loads(meta.pop("optim_groups"))
    return TrainingState(model, optim, groups, rng, engine, extra, meta)
