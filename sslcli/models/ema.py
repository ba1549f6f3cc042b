"""Exponential moving average of a network's parameters (the momentum teacher)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    One fused `_foreach_lerp_` over all tensors (lerp(t, s, 1 - m) = m t + (1 - m) s); buffers
    (e.g. BatchNorm statistics) are not averaged, as in DINO. Both networks must have the same
    parameters in the same order.
    """
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise ValueError(f"EMA between networks of {len(t)} and {len(s)} parameters")
    torch._foreach_lerp_(t, s, 1.0 - momentum)
