"""SimDINOv2: DINOv2 without prototypes, centring, Sinkhorn-Knopp or KoLeo (Wu et al., "Simplifying
DINO via Coding Rate Regularization", ICML 2025, Sec. 3.2, Eq. 12-17 and Algorithm 2).

One shared head (MLP -> d = 256, L2-normalised) for CLS and patch tokens. The student sees the
global crops with block masks (data.masking: dinov2) and the local crops; the EMA teacher the
unmasked global crops. With the head outputs s (student) and t (teacher):
  CLS   = SimDINO's loss (sslcli.methods.simdino: -alignment - gamma * coding rate, eps2 0.05,
          Z_a = (s_a + t_a) / 2) on the student CLS of the masked global crops plus the local
          crops against the teacher's global CLS, the Gram matrix summed over processes
          (method.covariance: global) or not (local);
  patch = cosine_patch_loss: -(1/G) sum over global crops of the mean cosine between the
          student's masked patch tokens and the teacher's tokens at the same positions (global
          crops only: the paper's Algorithm 2 also masks local crops, the authors' code does not);
  loss  = CLS + patch_weight * patch   (1.0; the paper's Eq. 17 halves both alignments, the code
          does not).
Teacher momentum cosine 0.9 -> 1 per iteration; `self_distillation: false` copies the student.
Health: SimDINO's (coding rate, effective rank of the outputs) and the dead-embedding check.
Config: SimDINOv2Config; ModelConfig (registers, layer scale as timm kwargs); data.masking.
"""

from __future__ import annotations

import torch
from torch import nn

from sslcli.config import ModelConfig, SimDINOv2Config
from sslcli.data import Batch
from sslcli.losses import cosine_patch_loss, simdino_alignment
from sslcli.methods.base import StepContext, StepOutput
from sslcli.methods.simdino import SimDINO
from sslcli.models import MaskedMultiCropNetwork, ProjectionHead, create_backbone, scatter_masked


class SimDINOv2(SimDINO):
    """SimDINO's CLS loss and health on a masked network, plus the cosine patch loss (module docstring)."""

    cfg: SimDINOv2Config

    @staticmethod
    def network(model_cfg: ModelConfig, cfg: SimDINOv2Config, drop_path_rate: float | None) -> nn.Module:
        """Backbone with a mask token + one ProjectionHead shared by CLS and patch tokens."""
        backbone = create_backbone(model_cfg, drop_path_rate=drop_path_rate, mask_token=True)
        head = ProjectionHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.head_layers)
        return MaskedMultiCropNetwork(backbone, head)

    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """Teacher on the unmasked global views, student on the masked global and the local views."""
        masks = batch.masks  # (G, B, N) bool
        with torch.no_grad():
            t_cls, t_feats, t_patch = self.teacher(batch.global_views, [], masks, mask_input=False)
        s_cls, _, s_patch = self.student_forward(batch.global_views, batch.local_views, masks, True)
        alignment = simdino_alignment(s_cls, t_cls)
        expansion, rates = self.expansion(s_cls, t_cls, batch.size)
        flat = masks.flatten(0, 1)  # (G*B, N)
        patch = cosine_patch_loss(scatter_masked(s_patch, flat), scatter_masked(t_patch, flat), flat)
        loss = -alignment - expansion + self.cfg.patch_weight * patch
        anchor = t_feats[: batch.size].detach()  # (B, D) teacher CLS of global view 1
        stats = self._stats(t_cls[0], rates, alignment, anchor) if ctx.with_stats else {}
        terms = {"alignment": alignment.detach(), "expansion": expansion.detach(), "patch": patch.detach()}
        return StepOutput(loss, terms, {"momentum": self.teacher_momentum(ctx.step)}, stats, anchor)

