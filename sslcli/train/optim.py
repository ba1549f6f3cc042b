"""Optimizers, parameter groups and DINO's per-parameter gradient clipping.

Weight decay applies to weights only: biases and every 1-D parameter (norm scales) get none;
cls_token and pos_embed are decayed (DINO's `get_params_groups`). The learning rate given in the
config is per 256 images and scaled by the method's rule (`linear`: x batch/256, DINO family;
`sqrt`: x sqrt(batch/1024), DINOv2; `none`). lr and wd are set per iteration from the schedules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sslcli.config import OptimConfig


def scaled_lr(cfg: OptimConfig) -> float:
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.batch_size / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(cfg.batch_size / 1024)
    return cfg.lr


def param_groups(model: nn.Module) -> list[dict]:
    """[decayed weights, non-decayed biases and 1-D params]; frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """lr and weight decay are placeholders here: the engine sets them every iteration."""
    groups = param_groups(model)
    if cfg.name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    return LARS(groups, lr=0.0, momentum=cfg.momentum)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
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
