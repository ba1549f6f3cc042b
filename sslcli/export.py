"""`ssl export`: a trained backbone as a timm safetensors file or a TorchScript module.

--format timm: the backbone's timm state dict (no head, no optimizer), loadable with
    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=FILE), num_classes=0,
                      **timm_kwargs)
  or plain `load_state_dict`. The safetensors header holds (JSON strings): format, format_version, arch,
  timm_kwargs (the create_model keyword arguments that rebuild the exact architecture, e.g. the
  demo's patch size and depth), image_size, mean, std, preset, epoch, which, reported. These files
  are valid `--weights` for every eval.
--format torchscript: `torch.jit.trace` of the backbone at image_size, returning the CLS / pooled
  feature [B, D]; for deployment (the evals read the timm format, which also gives patch tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from sslcli.errors import UsageError
from sslcli.eval.weights import load_backbone
from sslcli.runfiles import EXPORT_FORMAT, FORMAT_VERSION, atomic_save

FORMATS = ("timm", "torchscript")


class _GlobalFeature(nn.Module):
    """Backbone -> [B, D] (what the traced module returns)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def export_backbone(weights: str | Path, out: Path, fmt: str = "timm", which: str = "teacher") -> dict:
    """Write the export; return a description (path, format, arch, parameters, header)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be timm or torchscript, got '{fmt}'")
    backbone, info = load_backbone(weights, which)
    header = {"format": EXPORT_FORMAT, "format_version": str(FORMAT_VERSION), "arch": info.arch, "timm_kwargs": json.dumps(info.kwargs),
              "image_size": str(info.image_size), "mean": json.dumps(list(info.mean)),
              "std": json.dumps(list(info.std)), "preset": info.preset, "which": which,
              "epoch": "" if info.epoch is None else str(info.epoch), "reported": json.dumps(info.reported)}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        atomic_save(dict(backbone.model.state_dict()), header, out, what="exported backbone")
    else:
        example = torch.zeros(1, 3, info.image_size, info.image_size)
        with torch.no_grad():
            traced = torch.jit.trace(_GlobalFeature(backbone).eval(), example)
        traced.save(str(out), _extra_files={"sslcli.json": json.dumps(header)})
    params = sum(p.numel() for p in backbone.parameters())
    return {"out": str(out), "format": fmt, "arch": info.arch, "which": which, "parameters": params,
            "embed_dim": backbone.embed_dim, "header": header}
