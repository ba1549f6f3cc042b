"""DINO: self-distillation with no labels (Caron et al., ICCV 2021) — and DINO-2 (no local crops).

The student (backbone + DINOHead, drop-path) sees every crop; the teacher, an exponential moving
average of the student without drop-path, sees the two global crops. The loss is
`sslcli.losses.dino_loss` (Eq. 3 summed over view pairs) with the teacher's outputs centred by
`center` and sharpened by a low temperature. After each optimizer step:
  teacher <- m * teacher + (1 - m) * student, m cosine from momentum_teacher to momentum_teacher_end
  per iteration; the centre is updated with the global-batch mean of the teacher logits
  c <- center_momentum * c + (1 - center_momentum) * mean(t) (all-reduced across processes).
The teacher temperature warms up linearly per epoch (warmup_teacher_temp -> teacher_temp).
During the first `freeze_last_layer` epochs the head's last layer gets no update.

Config fields used: MethodConfig.{out_dim, hidden_dim, bottleneck_dim, head_layers,
use_bn_in_head, norm_last_layer, student_temp, teacher_temp, warmup_teacher_temp,
warmup_teacher_temp_epochs, center_momentum, momentum_teacher, momentum_teacher_end,
freeze_last_layer}; ModelConfig for the backbone.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sslcli import diagnostics
from sslcli.config import MethodConfig, ModelConfig
from sslcli.losses import dino_loss
from sslcli.methods.base import StepOutput
from sslcli.models import Backbone, DINOHead, create_backbone
from sslcli.schedules import cosine_schedule, teacher_temperature_schedule


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops of possibly different sizes.

    Consecutive crops of the same resolution are concatenated into one backbone pass (so 2 x 224
    and 10 x 96 cost two passes), the head runs once on everything.
    """

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """crops: views [B, 3, H_v, W_v] -> (logits per view [B, K], backbone features [V*B, D])."""
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        feats = torch.cat(feats)  # (V*B, D)
        logits = self.head(feats)  # (V*B, K)
        return list(logits.chunk(len(crops))), feats


class DINO(nn.Module):
    """Student, EMA teacher and centre; see the module docstring for the equations."""

    def __init__(self, model_cfg: ModelConfig, cfg: MethodConfig, epochs: int, steps_per_epoch: int):
        super().__init__()
        self.cfg = cfg
        self.student = self._network(model_cfg, cfg, drop_path_rate=None)
        self.teacher = self._network(model_cfg, cfg, drop_path_rate=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, epochs, steps_per_epoch)
        self.teacher_temp = teacher_temperature_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, epochs)
        self.__dict__["student_forward"] = self.student  # replaced by a DDP wrapper when distributed

    @staticmethod
    def _network(model_cfg: ModelConfig, cfg: MethodConfig, drop_path_rate: float | None) -> MultiCropNetwork:
        backbone = create_backbone(model_cfg, drop_path_rate=drop_path_rate)
        head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        cfg.head_layers, cfg.use_bn_in_head, cfg.norm_last_layer)
        return MultiCropNetwork(backbone, head)

    @property
    def teacher_backbone(self) -> Backbone:
        """The network evaluated after training (k-NN monitor, export)."""
        return self.teacher.backbone

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route student forward passes through `wrap(student)` (DDP); state_dict keys unchanged."""
        self.__dict__["student_forward"] = wrap(self.student)

    def constant_lr_parameters(self) -> list[nn.Parameter]:
        """Every student parameter follows the lr schedule."""
        return []

    def loss(self, crops: list[Tensor], epoch: int, with_stats: bool = False) -> StepOutput:
        """crops: 2 global views then the local views, each [B, 3, H, W]."""
        with torch.no_grad():
            teacher_logits, teacher_feats = self.teacher(crops[:2])
        student_logits, _ = self.student_forward(crops)
        temp = self.teacher_temp[epoch]
        loss = dino_loss(student_logits, teacher_logits, self.center, self.cfg.student_temp, temp)
        anchor = teacher_feats[: crops[0].shape[0]].detach()  # (B, D) teacher CLS of global view 1
        stats = self._stats(teacher_logits, loss, temp, anchor) if with_stats else {}
        self._update_center(teacher_logits)
        return StepOutput(loss, {"dino": loss.detach()}, stats, anchor)

    @torch.no_grad()
    def _update_center(self, teacher_logits: list[Tensor]) -> None:
        batch_center = torch.cat(teacher_logits).float().sum(0, keepdim=True)  # (1, K)
        count = torch.tensor(float(sum(t.shape[0] for t in teacher_logits)), device=batch_center.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center / count, alpha=1 - m)

    @torch.no_grad()
    def _stats(self, teacher_logits: list[Tensor], loss: Tensor, temp: float, anchor: Tensor) -> dict[str, Tensor]:
        # cross-entropy = H(q) + KL(q || p), and every teacher view is paired with the same number
        # of student views, so the mean KL over pairs is the loss minus the mean teacher entropy.
        probs = [torch.softmax((t.float() - self.center) / temp, -1) for t in teacher_logits]  # (B, K) each
        teacher_entropy = torch.stack([diagnostics.entropy(q) for q in probs]).mean()
        marginal = torch.stack([diagnostics.entropy(q.mean(0, keepdim=True)) for q in probs]).mean()
        return {"teacher_entropy": teacher_entropy, "teacher_marginal_entropy": marginal,
                "kl": loss.detach() - teacher_entropy,
                "embed_std": diagnostics.embedding_std(anchor), "embed_rank": diagnostics.effective_rank(anchor)}

    def cancel_gradients(self, epoch: int) -> None:
        """freeze_last_layer: drop the head's last-layer gradients during the first epochs."""
        if epoch < self.cfg.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the teacher with the momentum of iteration `step` (0-based)."""
        m = self.momentum[min(step, len(self.momentum) - 1)]
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1 - m)
