"""What every method gives the training engine (the engine knows nothing else about methods).

A method is an nn.Module owning its networks and state (its state_dict is checkpointed whole). Per
batch the trainer calls, in this order:
  out = method.loss(batch, ctx)        forward + loss of one Batch        -> StepOutput
  out.loss.backward()
  method.cancel_gradients(ctx)         drop gradients that must not update yet (before clipping)
  clip, optimizer.step()
  method.after_step(ctx, out)          EMA, centres, memories (from the tensors in `out.state`)
`ctx` says the epoch, the global step and whether to compute diagnostics. `method.health(record)`
reads a metrics record and names collapse signals; the thresholds are the method's own.
`method.divergence_hint(terms)` explains non-finite terms in the engine's divergence error.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from sslcli.data import Batch
from sslcli.models import Backbone, ema_update


@dataclass(frozen=True)
class StepContext:
    """Where the loop is: `step` counts optimizer steps from 0 over the whole run."""

    epoch: int
    step: int
    with_stats: bool = False


@dataclass
class StepOutput:
    """One batch: the loss, its named terms and what the engine logs or hands on.

    terms: detached scalar tensors (checked for finiteness, summed in the log).
    scalars: logged schedule values of this step (teacher momentum, temperature), plain floats.
    stats: diagnostics on log steps, scalar tensors (read only at log intervals).
    anchor: (B, D) the non-gradient branch's representation of global view 1 (bootstrapping).
    state: tensors `after_step` needs (e.g. the teacher logits for DINO's centre).
    """

    loss: Tensor
    terms: dict[str, Tensor]
    scalars: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    anchor: Tensor | None = None
    state: dict[str, Tensor | list[Tensor]] = field(default_factory=dict)


class Method(nn.Module, ABC):
    """Base class: owns `student` (what the optimizer updates) and the DDP routing of its forward."""

    student: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_student_call"] = None  # DDP wrapper of the student; kept out of state_dict

    # -- what every method defines

    @property
    @abstractmethod
    def evaluated_backbone(self) -> Backbone:
        """The network evaluated and exported after training (the teacher's, or the only one)."""

    @abstractmethod
    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """Forward and loss of one batch (under the engine's autocast)."""

    def cancel_gradients(self, ctx: StepContext) -> None:
        """Drop gradients that must not update yet; nothing by default."""

    def after_step(self, ctx: StepContext, out: StepOutput) -> None:
        """Update owned state after the optimizer step; nothing by default."""

    def constant_lr_parameters(self) -> list[nn.Parameter]:
        """Student parameters kept at the scaled base lr for the whole run (none by default)."""
        return []

    def health(self, record: dict) -> list[tuple[str, str]]:
        """(kind, message) collapse signals in a metrics record; by default a dead embedding."""
        std = record.get("embed_std")
        dim = self.evaluated_backbone.embed_dim
        if std is not None and std < 0.1 / math.sqrt(dim):
            return [("std", f"embedding std {std:.2e} << 1/sqrt(d): representation collapse")]
        return []

    def divergence_hint(self, terms: list[str]) -> str:
        """A sentence on what non-finite `terms` mean for this method ("" when nothing to add)."""
        return ""

    # -- shared machinery

    @property
    def student_backbone(self) -> Backbone:
        return self.student.backbone

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route student forwards through `wrap(student)` (DDP); state_dict keys are unchanged."""
        self.__dict__["_student_call"] = wrap(self.student)

    def student_forward(self, *args, **kwargs):
        """The student's forward, through the DDP wrapper when distributed."""
        return (self._student_call or self.student)(*args, **kwargs)

    def compile_backbones(self) -> None:
        """torch.compile the student backbone (the hot path); called once before training."""
        self.student.backbone.compile()

    def backbone_prefix(self, backbone: Backbone) -> str:
        """The state_dict key prefix of `backbone`'s timm model, e.g. 'teacher.backbone.model.'."""
        for name, module in self.named_modules():
            if module is backbone:
                return f"{name}.model."
        raise ValueError("backbone is not a sub-module of this method")


class SelfDistillation(Method):
    """Base of the DINO family: a student, its EMA teacher (the evaluated network) and the momentum.

    `make_network(drop_path_rate)` builds one network (None: the model config's drop path, for the
    student; 0.0 for the teacher). The teacher starts as a copy of the student, takes no gradient
    and, after every optimizer step, moves by teacher <- m teacher + (1 - m) student with m =
    momentum[step]; without self-distillation m = 0: the teacher is the student at every step.
    """

    def __init__(self, make_network: Callable[[float | None], nn.Module], momentum: list[float],
                 self_distillation: bool = True):
        super().__init__()
        self.student = make_network(None)
        self.teacher = make_network(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.momentum = momentum  # per iteration
        self.self_distillation = self_distillation

    @property
    def evaluated_backbone(self) -> Backbone:
        return self.teacher.backbone

    def teacher_momentum(self, step: int) -> float:
        """EMA momentum of this step; 0 without self-distillation (the teacher copies the student)."""
        if not self.self_distillation:
            return 0.0
        return self.momentum[min(step, len(self.momentum) - 1)]

    @torch.no_grad()
    def after_step(self, ctx: StepContext, out: StepOutput) -> None:
        """The teacher EMA with this step's momentum."""
        ema_update(self.teacher, self.student, self.teacher_momentum(ctx.step))
