"""`--weights` of every eval / export / neighbors command -> a frozen Backbone and what it came from.

Accepted (formats: sslcli.runfiles):
- a run directory (its checkpoints/last.safetensors),
- a training checkpoint: the backbone the header's `backbone_prefix` names (the teacher for the
  DINO family, the encoder for SimSiam) by default, the student's with which="student"; the
  architecture is rebuilt from the config in its header,
- an exported backbone (written by `ssl export --format timm`): timm keys, the architecture
  rebuilt from its `arch` and `timm_kwargs` header entries.
A missing file, an unknown format or architecture, or keys that do not fit -> CheckpointError
(exit code 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sslcli import runfiles
from sslcli.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from sslcli.errors import CheckpointError, ConfigError
from sslcli.models import Backbone, create_backbone
from sslcli.typed import show

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

    def model_name(self) -> str:
        """The model these weights hold, for messages: 'arch {key: value, ...}' (kwargs sorted), e.g.
        'vit_small_patch16_224 {depth: 3, embed_dim: 96, ...}'; the arch alone without kwargs."""
        if not self.kwargs:
            return self.arch
        return f"{self.arch} {{{', '.join(f'{k}: {show(v)}' for k, v in sorted(self.kwargs.items()))}}}"


def read_weights_info(weights: str | Path, which: str = "teacher") -> tuple[WeightsInfo, Path, str]:
    """(info, checkpoint file, key prefix of the backbone's timm state dict), without loading tensors."""
    if which not in runfiles.WHICH:
        raise CheckpointError(f"--which must be teacher or student, got '{which}'")
    path = runfiles.resolve_weights_file(weights)
    meta = runfiles.read_metadata(path)
    kind, _ = runfiles.format_of(meta)
    if kind == runfiles.TRAIN_FORMAT:
        header = runfiles.read_checkpoint_header(path)
        cfg = header.config
        info = WeightsInfo(str(path), cfg.model.arch, dict(cfg.model.kwargs), which, cfg.data.global_crop_size,
                           tuple(cfg.data.mean), tuple(cfg.data.std), cfg.name, header.epoch,
                           dict(cfg.source.reported))
        return info, path, header.prefix(which)
    if kind == runfiles.EXPORT_FORMAT:
        info = WeightsInfo(str(path), meta["arch"], json.loads(meta.get("timm_kwargs", "{}")),
                           meta.get("which", "teacher"), int(meta.get("image_size", 224)),
                           tuple(json.loads(meta.get("mean", json.dumps(IMAGENET_MEAN)))),
                           tuple(json.loads(meta.get("std", json.dumps(IMAGENET_STD)))),
                           meta.get("preset", ""), int(meta["epoch"]) if meta.get("epoch") else None,
                           json.loads(meta.get("reported", "{}")))
        return info, path, ""
    raise CheckpointError(f"'{path}' is neither an sslcli checkpoint nor an exported backbone "
                          f"(format {meta.get('format')!r}); export timm weights with `ssl export`")


def load_backbone(weights: str | Path, which: str = "teacher",
                  device: torch.device | str = "cpu") -> tuple[Backbone, WeightsInfo]:
    """The frozen backbone (eval mode, no grad) and its WeightsInfo."""
    info, path, prefix = read_weights_info(weights, which)
    try:
        backbone = create_backbone(ModelConfig(arch=info.arch, drop_path_rate=0.0, kwargs=info.kwargs))
    except ConfigError as e:
        raise CheckpointError(f"weights '{path}': {e}") from None
    state = runfiles.read_tensors(path, prefix)
    try:
        missing, unexpected = backbone.model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # mis-shaped tensors: weights of another size of the architecture
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"weights '{path}' do not fit {info.model_name()} "
                              f"({(shapes or [str(e)])[0]})") from None
    if missing or unexpected or not state:
        raise CheckpointError(f"weights '{path}' do not fit {info.model_name()} (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    backbone.requires_grad_(False)
    return backbone.eval().to(device), info
