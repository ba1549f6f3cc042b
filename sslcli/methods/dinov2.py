"""DINOv2 as the SimDINO paper trains it (Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", TMLR 2024, Sec. 4; the configuration of Wu et al. 2025, Table 4).

The student (backbone with a mask token, DINOHead with a trainable last-layer gain; drop path)
sees the global crops with block masks (data.masking: dinov2) and the local crops; the EMA
teacher sees the unmasked global crops. Three terms, with t = teacher outputs, s = student's:
  CLS (DINO):  dino_cross_entropy over the pairs (teacher global view a, student view v != a)
               with targets q_a = softmax((t_a - c) / tau_t) (method.centering: ema, DINO's
               centre) or Sinkhorn-Knopp over both global views of the global batch (sinkhorn_knopp);
  iBOT:        ibot_patch_loss on the masked patches: the student's masked tokens against the
               teacher's tokens at the same positions (unmasked input), targets centred with their
               own centre or by Sinkhorn-Knopp over all masked patches of the global batch;
  KoLeo:       koleo_loss of the student backbone CLS (before the head) of each global view,
               per process, summed over the views.
  loss = dino_weight * CLS + ibot_weight * iBOT + koleo_weight * KoLeo   (1, 1, 0.1).
One head serves CLS and patches unless method.ibot_separate_head. The teacher temperature warms
up linearly per epoch; the teacher momentum follows a per-iteration cosine (0.992 -> 1); the
heads' last layers are frozen for `freeze_last_layer` epochs. Optimiser pieces (layer-wise lr
decay 0.9, patch-embed lr x 0.2, global-norm clipping per sub-module, sqrt(batch/1024) lr) are
config keys of `optim`; registers and layer scale are timm kwargs of `model`.

Health: DINO's prototype-collapse checks on the CLS targets, and the dead-embedding check.
Config: DINOv2Config; ModelConfig for the backbone; data.masking for the masks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sslcli import diagnostics
from sslcli.config import DINOv2Config, ModelConfig
from sslcli.data import Batch
from sslcli.losses import dino_cross_entropy, ibot_patch_loss, koleo_loss, sinkhorn_knopp_reduced
from sslcli.methods.base import SelfDistillation, StepContext, StepOutput
from sslcli.models import DINOHead, MaskedMultiCropNetwork, create_backbone
from sslcli.schedules import cosine_schedule, teacher_temperature_schedule


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sum(t: Tensor) -> Tensor:
    """The sum of `t` over processes (a copy; `t` itself is left alone)."""
    t = t.clone()
    if _distributed():
        dist.all_reduce(t)
    return t


class DINOv2(SelfDistillation):
    """Student, EMA teacher, CLS and patch centres; see the module docstring for the equations."""

    def __init__(self, model_cfg: ModelConfig, cfg: DINOv2Config, epochs: int, steps_per_epoch: int):
        def head(in_dim: int, out_dim: int) -> DINOHead:
            return DINOHead(in_dim, out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                            use_bn=False, norm_last_layer=False)  # gain starts at 1, trainable

        def network(drop_path_rate: float | None) -> MaskedMultiCropNetwork:
            backbone = create_backbone(model_cfg, drop_path_rate=drop_path_rate, mask_token=True)
            patch_head = head(backbone.embed_dim, cfg.ibot_out_dim) if cfg.ibot_separate_head else None
            return MaskedMultiCropNetwork(backbone, head(backbone.embed_dim, cfg.out_dim), patch_head)

        momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, epochs, steps_per_epoch)
        super().__init__(network, momentum, cfg.self_distillation)
        self.cfg = cfg
        patch_dim = cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, patch_dim))
        self.teacher_temp = teacher_temperature_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, epochs)

    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """Teacher on the unmasked global views, student on the masked global and the local views."""
        masks = batch.masks  # (G, B, N) bool
        temp = self.teacher_temp[ctx.epoch]
        with torch.no_grad():
            t_cls, t_feats, t_patch = self.teacher(batch.global_views, [], masks, mask_input=False)
            cls_targets, patch_targets = self._targets(t_cls, t_patch, temp)
        s_cls, s_feats, s_patch = self.student_forward(batch.global_views, batch.local_views, masks, True)
        cfg = self.cfg
        dino = dino_cross_entropy(s_cls, cls_targets, cfg.student_temp)
        ibot = ibot_patch_loss(s_patch, patch_targets, masks.flatten(0, 1), cfg.student_temp)
        koleo = sum(koleo_loss(f) for f in s_feats.chunk(len(batch.global_views)))
        loss = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        anchor = t_feats[: batch.size].detach()  # (B, D) teacher CLS of global view 1
        stats = self._stats(cls_targets, dino, anchor) if ctx.with_stats else {}
        terms = {"dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}
        scalars = {"momentum": self.teacher_momentum(ctx.step), "teacher_temp": temp}
        return StepOutput(loss, terms, scalars, stats, anchor, {"teacher_cls": t_cls, "teacher_patch": t_patch})

    def _targets(self, t_cls: list[Tensor], t_patch: Tensor, temp: float) -> tuple[list[Tensor], Tensor]:
        """Teacher probabilities: CLS [B, K] per global view, patches [M, K'] (see module doc)."""
        if self.cfg.centering == "ema":
            cls = [torch.softmax((t.float() - self.center) / temp, dim=-1) for t in t_cls]
            return cls, torch.softmax((t_patch.float() - self.patch_center) / temp, dim=-1)
        rows = torch.cat(t_cls)  # (G*B, K): one Sinkhorn-Knopp over both global views
        total = rows.shape[0] * (dist.get_world_size() if _distributed() else 1)
        cls = sinkhorn_knopp_reduced(rows, temp, 3, total, _sum).chunk(len(t_cls))
        masked = _sum(torch.tensor(float(t_patch.shape[0]), device=t_patch.device))  # M over processes
        return list(cls), sinkhorn_knopp_reduced(t_patch, temp, 3, masked, _sum)

    @torch.no_grad()
    def _update_centers(self, t_cls: list[Tensor], t_patch: Tensor) -> None:
        """EMA centres of the global batch's teacher CLS and masked-patch logits (all-reduced)."""
        m = self.cfg.center_momentum
        for center, rows in ((self.center, torch.cat(t_cls)), (self.patch_center, t_patch)):
            total = _sum(rows.float().sum(0, keepdim=True))  # (1, K)
            count = _sum(torch.tensor(float(rows.shape[0]), device=rows.device)).clamp_min(1)
            center.mul_(m).add_(total / count, alpha=1 - m)

    @torch.no_grad()
    def _stats(self, cls_targets: list[Tensor], dino: Tensor, anchor: Tensor) -> dict[str, Tensor]:
        entropy = torch.stack([diagnostics.entropy(q) for q in cls_targets]).mean()
        marginal = torch.stack([diagnostics.entropy(q.mean(0, keepdim=True)) for q in cls_targets]).mean()
        return {"teacher_entropy": entropy, "teacher_marginal_entropy": marginal, "kl": dino.detach() - entropy,
                "embed_std": diagnostics.embedding_std(anchor), "embed_rank": diagnostics.effective_rank(anchor)}

    def health(self, record: dict) -> list[tuple[str, str]]:
        return diagnostics.prototype_collapse(record, self.cfg.out_dim) + super().health(record)

    def cancel_gradients(self, ctx: StepContext) -> None:
        """freeze_last_layer: no update of the heads' last layers (weights and gains) in the first epochs."""
        if ctx.epoch < self.cfg.freeze_last_layer:
            for head in (self.student.head, self.student.patch_head):
                if head is not None:
                    for p in head.last_layer.parameters():
                        p.grad = None

    @torch.no_grad()
    def after_step(self, ctx: StepContext, out: StepOutput) -> None:
        """Centres from this step's teacher outputs (ema centering), then the teacher EMA."""
        if self.cfg.centering == "ema":
            self._update_centers(out.state["teacher_cls"], out.state["teacher_patch"])
        super().after_step(ctx, out)
