"""What every method gives the training engine (the engine knows nothing else about methods).

A method is an nn.Module owning its networks and state (its state_dict is checkpointed whole):
  student: nn.Module              the parameters the optimizer updates
  teacher_backbone: Backbone      the network evaluated after training
  loss(crops, epoch, with_stats)  -> StepOutput for one batch of views
  cancel_gradients(epoch)         drop gradients that must not update yet (before clipping)
  after_step(step)                EMA / memories after the optimizer step of iteration `step`
  distribute(wrap)                route student forwards through a DDP wrapper
  constant_lr_parameters()        student parameters whose lr stays at the scaled base lr for the
                                  whole run (no warm-up, no cosine), e.g. SimSiam's predictor with
                                  fix_pred_lr; [] for most methods. The optimizer puts them in
                                  their own groups (sslcli.train.optim.build_optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from torch import Tensor, nn

from sslcli.models import Backbone


@dataclass
class StepOutput:
    """One batch: the loss, its named terms (detached) and, on log steps, diagnostics."""

    loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)
    anchor: Tensor | None = None  # (B, D) non-gradient branch's representation of global view 1


class Method(Protocol):
    student: nn.Module

    @property
    def teacher_backbone(self) -> Backbone: ...

    def loss(self, crops: list[Tensor], epoch: int, with_stats: bool = False) -> StepOutput: ...

    def cancel_gradients(self, epoch: int) -> None: ...

    def after_step(self, step: int) -> None: ...

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None: ...

    def constant_lr_parameters(self) -> list[nn.Parameter]: ...
