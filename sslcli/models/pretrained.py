"""`model.init_from` (`ssl pretrain --init-from FILE`): start a run's backbones from existing weights.

Accepted, all read locally (nothing is downloaded):
- a run directory or a training checkpoint: the backbone the evals use (the teacher for the DINO
  family, the encoder for SimSiam), keys under the header's `backbone_prefix`;
- an export (`ssl export --format timm`);
- any other safetensors file holding a timm model's state dict, e.g. written with
  safetensors.torch.save_file of `timm_model.state_dict()`.
Only the backbone's timm model is loaded, key by key (timm names); heads, the mask token and all
method state start fresh. Position embeddings of another patch grid (weights trained at another
image size) are resampled bicubically to the model's grid, with the backbone's own resampling rule
(`model.pos_embed_resample`). Anything else that does not fit is a CheckpointError (exit 2) naming
the first missing, unexpected or mis-shaped keys, and for register tokens and layer scale the
`model.kwargs` entry to set.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sslcli import runfiles
from sslcli.errors import CheckpointError
from sslcli.models.backbone import Backbone, resample_pos_embed
from sslcli.typed import show

SHOWN_KEYS = 3  # keys named per kind of mismatch in an error line


@dataclass(frozen=True)
class InitWeights:
    """A backbone state dict read from `path`, and where it came from (for the run's summary)."""

    state: dict[str, Tensor]  # timm keys
    path: Path
    kind: str  # "checkpoint" (its evaluated backbone), "export" or "timm" (a plain state dict)
    arch: str = ""  # the timm name recorded in the file's header ("" for a plain state dict)

    def describe(self) -> dict[str, str]:
        """Path, kind and sha256 of the file (hashed here: only the process that records it pays)."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "sha256": file_sha256(self.path)}


def read_init_weights(source: str | Path) -> InitWeights:
    """The backbone state dict in `source` (module doc); CheckpointError when unreadable or empty."""
    path = runfiles.resolve_weights_file(source)
    meta = runfiles.read_metadata(path)  # refuses pickles and non-safetensors files
    kind, _ = runfiles.format_of(meta)
    prefix, arch = "", meta.get("arch", "")
    if kind == runfiles.TRAIN_FORMAT:
        header = runfiles.read_checkpoint_header(path)
        prefix, arch = header.prefix("teacher"), header.arch
    state = runfiles.read_tensors(path, prefix)
    if not state:
        raise CheckpointError(f"--init-from '{path}' holds no backbone tensors")
    label = {runfiles.TRAIN_FORMAT: "checkpoint", runfiles.EXPORT_FORMAT: "export"}.get(kind, "timm")
    return InitWeights(state, path, label, arch)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def load_init_weights(backbone: Backbone, init: InitWeights) -> list[str]:
    """Copy `init` into `backbone.model` in place (fit_init_weights first); the adaptations made."""
    state, notes = fit_init_weights(backbone, init)
    backbone.model.load_state_dict(state, strict=True)
    return notes


def fit_init_weights(backbone: Backbone, init: InitWeights) -> tuple[dict[str, Tensor], list[str]]:
    """(the state dict adapted to `backbone.model`, the adaptations as sentences, e.g. the
    position-embedding resampling); CheckpointError naming the keys when the weights do not fit.
    Reads only the model's shapes, so it also checks a model built on the meta device."""
    own = {k: v.shape for k, v in backbone.model.state_dict().items()}
    state, notes = dict(init.state), []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(_mismatch(backbone, init, missing, unexpected, []))
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"] and pos.shape[-1] == own["pos_embed"][-1]:
        state["pos_embed"], note = _resampled_pos_embed(backbone, pos, init.path)
        notes.append(note)
    shapes = [f"{k} {list(state[k].shape)} vs {list(shape)}" for k, shape in own.items() if state[k].shape != shape]
    if shapes:
        raise CheckpointError(_mismatch(backbone, init, [], [], shapes))
    return state, notes


def _resampled_pos_embed(backbone: Backbone, pos: Tensor, path: Path) -> tuple[Tensor, str]:
    """The file's position embeddings (1, prefix + g0*g0, D) resampled to the model's grid."""
    model = backbone.model
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    if pos.ndim != 3 or side * side != pos.shape[1] - prefix or side == 0:
        raise CheckpointError(f"--init-from '{path}': pos_embed {list(pos.shape)} cannot be resampled to "
                              f"{list(model.pos_embed.shape)} ({prefix} prefix tokens, a {grid[0]}x{grid[1]} grid)")
    resampled = resample_pos_embed(pos.float(), (side, side), grid, prefix, backbone.antialias).to(pos.dtype)
    return resampled, f"pos_embed resampled from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid"


def _mismatch(backbone: Backbone, init: InitWeights, missing: list[str], unexpected: list[str],
              shapes: list[str]) -> str:
    """One line: what does not fit, the first keys of each kind, and the model.kwargs to set."""
    parts = [f"{label} {', '.join(keys[:SHOWN_KEYS])}{' ...' if len(keys) > SHOWN_KEYS else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
    advice = _kwargs_advice(init.state, missing, unexpected)
    held = f" (the file holds {init.arch})" if init.arch and init.arch != backbone.arch else ""
    return (f"--init-from '{init.path}'{held} does not fit model {backbone.arch} {show(_kwargs(backbone))}: "
            f"{'; '.join(parts)}{'; ' + advice if advice else ''}")


def _kwargs_advice(state: dict[str, Tensor], missing: list[str], unexpected: list[str]) -> str:
    """Register tokens and layer scale are constructor choices: say which model.kwargs to set."""
    advice = []
    if "reg_token" in unexpected:
        advice.append(f"the weights have {state['reg_token'].shape[1]} register tokens: "
                      f"set model.kwargs.reg_tokens={state['reg_token'].shape[1]}")
    elif "reg_token" in missing:
        advice.append("the weights have no register tokens: set model.kwargs.reg_tokens=0")
    if any(k.endswith(".gamma") for k in unexpected):
        advice.append("the weights use layer scale: set model.kwargs.init_values (e.g. 1.0e-5)")
    elif any(k.endswith(".gamma") for k in missing):
        advice.append("the weights have no layer scale: set model.kwargs.init_values=null")
    return "; ".join(advice)


def _kwargs(backbone: Backbone) -> dict:
    """The architecture-defining sizes of a timm ViT (or {} for other models), for messages."""
    model = backbone.model
    if not backbone.is_vit:
        return {}
    return {"embed_dim": backbone.embed_dim, "depth": len(model.blocks),
            "patch_size": backbone.patch_size, "reg_tokens": getattr(model, "num_reg_tokens", 0)}
