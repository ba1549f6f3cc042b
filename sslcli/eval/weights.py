"""`--weights` of every eval / export / neighbors command -> a frozen Backbone and what it came from.

Accepted (DESIGN.md "Contracts"):
- a run directory (its checkpoints/last.safetensors),
- a training checkpoint (format `sslcli-train-1`): the teacher backbone by default, or the
  student with which="student"; the architecture is rebuilt from the config in its header,
- an exported backbone (format `sslcli-export-1`, written by `ssl export --format timm`): timm
  keys, the architecture rebuilt from its `arch` and `timm_kwargs` header entries.
A missing file, an unknown format or architecture, or keys that do not fit -> CheckpointError
(exit code 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from sslcli.config import IMAGENET_MEAN, IMAGENET_STD, Config, ModelConfig, from_dict
from sslcli.errors import CheckpointError, ConfigError
from sslcli.models import Backbone, create_backbone

TRAIN_FORMAT = "sslcli-train-1"  # training checkpoints (sslcli.train.checkpoint writes them)
EXPORT_FORMAT = "sslcli-export-1"
WHICH = ("teacher", "student")


@dataclass
class WeightsInfo:
    """Where a backbone comes from, and how its images were normalised in training."""

    path: str
    arch: str
    kwargs: dict = field(default_factory=dict)
    which: str = "teacher"
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    preset: str = ""
    epoch: int | None = None
    reported: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__, mean=list(self.mean), std=list(self.std))


def resolve_weights_file(weights: str | Path) -> Path:
    path = Path(weights)
    if path.is_dir():
        path = path / "checkpoints" / "last.safetensors"
    if not path.is_file():
        raise CheckpointError(f"weights not found: '{weights}' (a run directory, a training checkpoint "
                              "or an exported .safetensors file)")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The string header of a safetensors file; CheckpointError when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a non-safetensors file
        raise CheckpointError(f"'{path}' is not a safetensors file ({type(e).__name__})") from None


def _load_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def read_weights_info(weights: str | Path, which: str = "teacher") -> tuple[WeightsInfo, Path, str]:
    """(info, checkpoint file, key prefix of the backbone's timm state dict), without loading tensors."""
    if which not in WHICH:
        raise CheckpointError(f"--which must be teacher or student, got '{which}'")
    path = resolve_weights_file(weights)
    meta = read_metadata(path)
    fmt = meta.get("format")
    if fmt == TRAIN_FORMAT:
        try:
            cfg: Config = from_dict(Config, yaml.safe_load(meta["config"]))
        except (KeyError, ConfigError, yaml.YAMLError) as e:
            raise CheckpointError(f"checkpoint '{path}' has an unreadable config ({e})") from None
        info = WeightsInfo(str(path), cfg.model.arch, dict(cfg.model.kwargs), which, cfg.data.global_crop_size,
                           tuple(cfg.data.mean), tuple(cfg.data.std), cfg.name, int(meta.get("epoch", 0)),
                           dict(cfg.source.reported))
        return info, path, f"model/{which}.backbone.model."
    if fmt == EXPORT_FORMAT:
        info = WeightsInfo(str(path), meta["arch"], json.loads(meta.get("timm_kwargs", "{}")),
                           meta.get("which", "teacher"), int(meta.get("image_size", 224)),
                           tuple(json.loads(meta.get("mean", json.dumps(IMAGENET_MEAN)))),
                           tuple(json.loads(meta.get("std", json.dumps(IMAGENET_STD)))),
                           meta.get("preset", ""), int(meta["epoch"]) if meta.get("epoch") else None,
                           json.loads(meta.get("reported", "{}")))
        return info, path, ""
    raise CheckpointError(f"'{path}' is neither an sslcli checkpoint nor an exported backbone "
                          f"(format {fmt!r}); export timm weights with `ssl export`")


def load_backbone(weights: str | Path, which: str = "teacher",
                  device: torch.device | str = "cpu") -> tuple[Backbone, WeightsInfo]:
    """The frozen backbone (eval mode, no grad) and its WeightsInfo."""
    info, path, prefix = read_weights_info(weights, which)
    try:
        backbone = create_backbone(ModelConfig(arch=info.arch, drop_path_rate=0.0, kwargs=info.kwargs))
    except ConfigError as e:
        raise CheckpointError(f"weights '{path}': {e}") from None
    state = _load_prefixed(path, prefix)
    missing, unexpected = backbone.model.load_state_dict(state, strict=False)
    if missing or unexpected or not state:
        raise CheckpointError(f"weights '{path}' do not fit {info.arch} (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    backbone.requires_grad_(False)
    return backbone.eval().to(device), info
