"""DINO: self-distillation with no labels (Caron et al., ICCV 2021) — and DINO-2 (no local crops).

The student (backbone + DINOHead, drop-path) sees every crop; the teacher, an exponential moving
average of the student without drop-path, sees the two global crops. The loss is
`sslcli.losses.dino_loss` (Eq. 3 summed over view pairs) with the teacher's outputs centred by
`center` and sharpened by a low temperature. After each optimizer step:
  teacher <- m * teacher + (1 - m) * student, m cosine from momentum_teacher to momentum_teacher_end
  per iteration; the centre is updated with the global-batch mean of the teacher logits
  c <- center_momentum * c + (1 - center_momentum) * mean(t) (all-reduced across processes).
The teacher temperature warms up linearly per epoch (warmup_teacher_temp -> teacher_temp).
During the first `freeze_last_layer` epochs the head's last layer gets no update. With
`self_distillation: false` the momentum is 0: the teacher is a copy of the student at every step
(SimDINO's Table 8, where DINO collapses). The head's
last layer and the loss run in fp32 under bf16 autocast.

Collapse checks (`health`): a uniform teacher (per-image entropy near log K with KL ~ 0:
centering dominates) and one prototype for the whole batch (marginal entropy ~ 0: sharpening
dominates), plus the base class's dead-embedding check.

Config: DINOConfig (all fields); ModelConfig for the backbone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sslcli import diagnostics
from sslcli.config import DINOConfig, ModelConfig
from sslcli.data import Batch
from sslcli.losses import dino_loss
from sslcli.methods.base import SelfDistillation, StepContext, StepOutput
from sslcli.models import DINOHead, MultiCropNetwork, create_backbone
from sslcli.schedules import cosine_schedule, teacher_temperature_schedule


class DINO(SelfDistillation):
    """Student, EMA teacher and centre; see the module docstring for the equations."""

    def __init__(self, model_cfg: ModelConfig, cfg: DINOConfig, epochs: int, steps_per_epoch: int):
        def network(drop_path_rate: float | None) -> MultiCropNetwork:
            backbone = create_backbone(model_cfg, drop_path_rate=drop_path_rate)
            head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                            cfg.head_layers, cfg.use_bn_in_head, cfg.norm_last_layer)
            return MultiCropNetwork(backbone, head)

        momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, epochs, steps_per_epoch)
        super().__init__(network, momentum, cfg.self_distillation)
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.teacher_temp = teacher_temperature_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, epochs)

    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """Teacher on the global views, student on every view; centre update in after_step."""
        with torch.no_grad():
            teacher_logits, teacher_feats = self.teacher(batch.global_views)
        student_logits, _ = self.student_forward(batch.views)
        temp = self.teacher_temp[ctx.epoch]
        loss = dino_loss(student_logits, teacher_logits, self.center, self.cfg.student_temp, temp)
        anchor = teacher_feats[: batch.size].detach()  # (B, D) teacher CLS of global view 1
        stats = self._stats(teacher_logits, loss, temp, anchor) if ctx.with_stats else {}
        scalars = {"momentum": self.teacher_momentum(ctx.step), "teacher_temp": temp}
        return StepOutput(loss, {"dino": loss.detach()}, scalars, stats, anchor, {"teacher_logits": teacher_logits})

    @torch.no_grad()
    def _update_center(self, teacher_logits: list[Tensor]) -> None:
        """c <- m c + (1 - m) mean of the global batch's teacher logits (all-reduced)."""
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

    def health(self, record: dict) -> list[tuple[str, str]]:
        return diagnostics.prototype_collapse(record, self.cfg.out_dim) + super().health(record)

    def cancel_gradients(self, ctx: StepContext) -> None:
        """freeze_last_layer: drop the head's last-layer gradients during the first epochs."""
        if ctx.epoch < self.cfg.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, ctx: StepContext, out: StepOutput) -> None:
        """Centre from this step's teacher logits, then the teacher EMA with this step's momentum."""
        self._update_center(out.state["teacher_logits"])
        super().after_step(ctx, out)
