"""Optimizers, parameter groups (lr and weight-decay multipliers) and gradient clipping.

Weight decay applies to weights only: biases and every 1-D parameter (norm scales) get none;
cls_token and pos_embed are decayed (DINO's `get_params_groups`). With
`optim.decay_norm_and_bias` every parameter is decayed (SimSiam: weight decay 1e-4 on all).
The learning rate given in the config is per 256 images and scaled by the method's rule (`linear`:
x batch/256, DINO family and SimSiam; `sqrt`: x sqrt(batch/1024), DINOv2; `none`). lr and wd are
set per iteration from the schedules, except in groups holding the method's constant-lr parameters
(`Method.constant_lr_parameters()`, e.g. SimSiam's predictor with fix_pred_lr): those carry
`"constant_lr": <scaled base lr>` and keep that lr for the whole run (their wd still follows the
schedule, as in the authors' `adjust_learning_rate`). Every group carries `lr_mult` (layer-wise lr
decay, patch-embedding multiplier: `optim.layer_decay`, `optim.patch_embed_lr_mult`) and
`wd_mult` (0 for biases and norms); `set_lr_wd` applies both every iteration.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import torch
from timm.models import group_parameters
from torch import Tensor, nn

from sslcli.config import OptimConfig


def scaled_lr(cfg: OptimConfig) -> float:
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.batch_size / 256
    if cfg.lr_scaling in ("sqrt1024", "sqrt"):
        return cfg.lr * math.sqrt(cfg.batch_size / 1024)
    return cfg.lr


def layer_ids(student: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> layer id, L) for layer-wise lr decay, DINOv2's numbering.

    Backbone parameters are numbered by timm's `group_matcher` (patch embedding and tokens 0,
    block k -> k + 1); everything after the last block (the backbone's final norm, the heads) is
    L + 1. The backbone's mask token counts as a token (0).
    """
    model = student.backbone.model
    matcher = model.group_matcher(coarse=False)
    ids = group_parameters(model, matcher, reverse=True)  # name -> 0..L (final norm merged into L)
    after = [re.compile(rx) for rx, suffix in matcher.get("blocks", []) if isinstance(suffix, tuple)]
    blocks = max((i for n, i in ids.items() if not any(r.match(n) for r in after)), default=0)
    out = {}
    for name, _ in student.named_parameters():
        inner = name.removeprefix("backbone.model.")
        if inner != name and inner in ids and not any(r.match(inner) for r in after):
            out[name] = ids[inner]
        else:
            out[name] = 0 if name == "backbone.mask_token" else blocks + 1
    return out, blocks


def lr_multipliers(student: nn.Module, cfg: OptimConfig) -> dict[str, float]:
    """Parameter name -> lr multiplier: layer_decay^(L + 1 - layer id), x patch_embed_lr_mult for
    the patch embedding, x backbone_lr_scale for the backbone's timm weights (not its mask token,
    which starts fresh like the heads). Empty when all three are 1 (every multiplier 1)."""
    mults: dict[str, float] = {}
    if cfg.layer_decay != 1.0 or cfg.patch_embed_lr_mult != 1.0:
        ids, num_layers = layer_ids(student)
        mults = {name: cfg.layer_decay ** (num_layers + 1 - i) * (cfg.patch_embed_lr_mult if ".patch_embed." in name else 1.0)
                 for name, i in ids.items()}
    if cfg.backbone_lr_scale != 1.0:
        for name, _ in student.named_parameters():
            if name.startswith("backbone.model."):
                mults[name] = mults.get(name, 1.0) * cfg.backbone_lr_scale
    return mults


def param_groups(model: nn.Module, decay_norm_and_bias: bool = False, constant_lr: Iterable[nn.Parameter] = (),
                 base_lr: float = 0.0, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Parameter groups, each with `lr_mult` and `wd_mult`; frozen parameters are left out.

    Default split: weights (wd_mult 1) and biases / 1-D params (wd_mult 0); decay_norm_and_bias
    puts everything in the decayed split. `lr_mults` (name -> multiplier) splits further.
    Parameters in `constant_lr` go to groups of their own marked `"constant_lr": base_lr`.
    """
    fixed = {id(p) for p in constant_lr}
    if fixed - {id(p) for p in model.parameters()}:
        raise ValueError("constant_lr parameters must be parameters of the optimised model")
    buckets: dict[tuple[bool, float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = decay_norm_and_bias or not (name.endswith(".bias") or p.ndim == 1)
        key = (id(p) in fixed, 1.0 if decayed else 0.0, (lr_mults or {}).get(name, 1.0))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (constant, wd_mult, lr_mult), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1], -kv[0][2])):
        group: dict = {"params": params, "lr_mult": lr_mult, "wd_mult": wd_mult}
        if constant:
            group["constant_lr"] = base_lr
        groups.append(group)
    return groups


class LARS(torch.optim.Optimizer):
    """LARS as in DINO's utils (no rate adaptation or decay for 1-D params)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, 1.0), 1.0)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    constant_lr: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """lr and weight decay are placeholders here: the engine sets them every iteration.

    constant_lr: parameters of `model` kept at the scaled base lr (`Method.constant_lr_parameters()`).
    """
    groups = param_groups(model, cfg.decay_norm_and_bias, constant_lr, scaled_lr(cfg), lr_multipliers(model, cfg))
    if cfg.name == "adamw":
        # CUDA: the fused kernel. Elsewhere the multi-tensor (foreach) update: bit for bit the
        # arithmetic of torch's CPU default, a Python loop over tensors, in a few calls (a 2-core CPU,
        # the demo: 7.4 -> 5.8 ms per step). CPU's fused kernel is faster still but rounds differently.
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused, foreach=not fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    return LARS(groups, lr=0.0, momentum=cfg.momentum)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """The scheduled lr and wd of one iteration, times each group's multipliers; constant-lr
    groups start from their `constant_lr` instead of `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("constant_lr", lr) * group.get("lr_mult", 1.0)
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)


@torch.no_grad()
def clip_gradients(student: nn.Module, max_norm: float, mode: str) -> None:
    """`per_param`: each parameter tensor clipped on its own (DINO); `global`: one norm per
    top-level sub-module of the student (backbone, head: DINOv2). No host syncs either way."""
    if max_norm <= 0:
        return
    if mode == "per_param":
        clip_gradients_per_param(list(student.parameters()), max_norm)
        return
    for child in student.children():
        grads = [p for p in child.parameters() if p.grad is not None]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)


@torch.no_grad()
def clip_gradients_per_param(params: list[Tensor], max_norm: float) -> None:
    """Each parameter tensor's gradient clipped to norm `max_norm` separately (DINO's
    `clip_gradients`), without host syncs: grad *= min(1, max_norm / (||grad|| + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # (P,): the scales as 3 ops, not 3 per tensor
    scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, scales.unbind())
