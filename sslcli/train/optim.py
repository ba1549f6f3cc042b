"""Optimizers, parameter groups and DINO's per-parameter gradient clipping.

Weight decay applies to weights only: biases and every 1-D parameter (norm scales) get none;
cls_token and pos_embed are decayed (DINO's `get_params_groups`). With
`optim.decay_norm_and_bias` every parameter is decayed (SimSiam: weight decay 1e-4 on all).
The learning rate given in the config is per 256 images and scaled by the method's rule (`linear`:
x batch/256, DINO family and SimSiam; `sqrt`: x sqrt(batch/1024), DINOv2; `none`). lr and wd are
set per iteration from the schedules, except in groups holding the method's constant-lr parameters
(`Method.constant_lr_parameters()`, e.g. SimSiam's predictor with fix_pred_lr): those carry
`"constant_lr": <scaled base lr>` and keep that lr for the whole run (their wd still follows the
schedule, as in the authors' `adjust_learning_rate`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from sslcli.config import OptimConfig


def scaled_lr(cfg: OptimConfig) -> float:
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.batch_size / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(cfg.batch_size / 1024)
    return cfg.lr


def param_groups(model: nn.Module, decay_norm_and_bias: bool = False, constant_lr: Iterable[nn.Parameter] = (),
                 base_lr: float = 0.0) -> list[dict]:
    """Parameter groups; frozen parameters are left out and empty groups dropped.

    Default: [decayed weights, non-decayed biases and 1-D params]. decay_norm_and_bias: everything
    in the decayed group. Parameters in `constant_lr` go to groups of their own (same decay split)
    marked `"constant_lr": base_lr`, after the scheduled ones.
    """
    fixed = {id(p) for p in constant_lr}
    if fixed - {id(p) for p in model.parameters()}:
        raise ValueError("constant_lr parameters must be parameters of the optimised model")
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(c, d): [] for c in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = decay_norm_and_bias or not (name.endswith(".bias") or p.ndim == 1)
        buckets[(id(p) in fixed, decayed)].append(p)
    groups = []
    for (constant, decayed), params in buckets.items():
        group: dict = {"params": params, "apply_wd": decayed}
        if not decayed:
            group["weight_decay"] = 0.0
        if constant:
            group["constant_lr"] = base_lr
        if params:
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
    groups = param_groups(model, cfg.decay_norm_and_bias, constant_lr, scaled_lr(cfg))
    if cfg.name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    return LARS(groups, lr=0.0, momentum=cfg.momentum)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """The scheduled lr and wd of one iteration; constant-lr groups keep their `constant_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("constant_lr", lr)
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


@torch.no_grad()
def clip_gradients_per_param(params: list[Tensor], max_norm: float) -> None:
    """Each parameter tensor's gradient clipped to norm `max_norm` separately (DINO's
    `clip_gradients`), without host syncs: grad *= min(1, max_norm / (||grad|| + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
