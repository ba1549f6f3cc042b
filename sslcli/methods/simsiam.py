"""SimSiam: exploring simple Siamese representation learning (Chen & He, CVPR 2021).

One encoder f = backbone + projector and a predictor h, shared by both views; no teacher, no EMA,
no negatives. For two augmented views x1, x2 of the same images:
  z_v = f(x_v)   (projector output, its last BN without affine),   p_v = h(z_v)
  L = -1/2 [mean cos(p1, sg(z2)) + mean cos(p2, sg(z1))]   (Eq. 1-2, Algorithm 1;
  `sslcli.losses.simsiam_loss`), sg = stop-gradient, which is what prevents collapse (Sec. 4).
The two views are encoded in separate passes, as in the authors' builder.py, so every BatchNorm
normalises each view with that view's own batch statistics. Optimisation (config, not code here):
SGD momentum 0.9, weight decay 1e-4 on every parameter (optim.decay_norm_and_bias), lr 0.05 per
256 images, cosine per epoch without warm-up (optim.schedule_unit: epoch); with fix_pred_lr the
predictor keeps the scaled base lr for the whole run (`constant_lr_parameters`).

The evaluated network is the encoder's backbone (`evaluated_backbone`; there is only one network).
Anchor for neighbour bootstrapping: the backbone feature of view 1 without gradient (the same
forward pass, detached, so BatchNorm running statistics are updated once per view).
Backbone: `create_backbone(model_cfg)`. The authors' ResNet-50 uses zero-init residual
(torchvision `zero_init_residual=True`: the last BN scale of every residual block starts at 0);
timm's ResNet does the same by default (`zero_init_last=True`), with the same kaiming-normal
(fan_out) conv init. SyncBN across GPUs is the training engine's conversion of every network.
RandomResizedCrop is bilinear in the SimSiam presets (MoCo-v2's augmentation; data.interpolation).
Collapse check: the base class's, on `embed_std` = the std of the L2-normalised projector output z
(the paper's collapse signal, Sec. 4.1).

Config: SimSiamConfig {hidden_dim, out_dim, pred_dim, fix_pred_lr} (the paper: 2048, 2048, 512,
true); ModelConfig for the backbone. Exactly two views (checked when the config is loaded).
"""

from __future__ import annotations

from torch import Tensor, nn

from sslcli import diagnostics
from sslcli.config import ModelConfig, SimSiamConfig
from sslcli.data import Batch
from sslcli.losses import simsiam_loss
from sslcli.methods.base import Method, StepContext, StepOutput
from sslcli.models import Backbone, SimSiamPredictor, SimSiamProjector, create_backbone


class SiameseNetwork(nn.Module):
    """Backbone + projector (the encoder f) + predictor h, applied to two views in one call.

    One forward for both views so that a DDP wrapper sees a single forward per backward.
    """

    def __init__(self, backbone: Backbone, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x1, x2: [B, 3, H, W] -> (p1, p2, z1, z2 [B, out_dim], backbone feature of x1 [B, D])."""
        f1, f2 = self.backbone(x1), self.backbone(x2)  # (B, D) each, separate BN statistics
        z1, z2 = self.projector(f1), self.projector(f2)  # (B, out_dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, out_dim)
        return p1, p2, z1, z2, f1


class SimSiam(Method):
    """Encoder and predictor; see the module docstring for the equations."""

    def __init__(self, model_cfg: ModelConfig, cfg: SimSiamConfig, epochs: int, steps_per_epoch: int):
        super().__init__()
        self.cfg = cfg
        backbone = create_backbone(model_cfg)
        projector = SimSiamProjector(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        predictor = SimSiamPredictor(cfg.out_dim, cfg.pred_dim)
        self.student = SiameseNetwork(backbone, projector, predictor)

    @property
    def evaluated_backbone(self) -> Backbone:
        return self.student.backbone

    def constant_lr_parameters(self) -> list[nn.Parameter]:
        """fix_pred_lr: the predictor's parameters keep the scaled base lr for the whole run."""
        return list(self.student.predictor.parameters()) if self.cfg.fix_pred_lr else []

    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """The two global views of the batch, each [B, 3, H, W]."""
        x1, x2 = batch.global_views
        p1, p2, z1, z2, f1 = self.student_forward(x1, x2)
        loss = simsiam_loss(p1, p2, z1, z2)
        anchor = f1.detach()  # (B, D) encoder backbone feature of view 1, no gradient
        stats = self._stats(z1, anchor) if ctx.with_stats else {}
        return StepOutput(loss, {"simsiam": loss.detach()}, stats=stats, anchor=anchor)

    @staticmethod
    def _stats(z1: Tensor, anchor: Tensor) -> dict[str, Tensor]:
        # The paper's collapse signal (Sec. 4.1, Fig. 2): per-dimension std of the L2-normalised
        # projector output z, ~1/sqrt(out_dim) when healthy, 0 when collapsed.
        z1 = z1.detach()  # (B, out_dim)
        return {"embed_std": diagnostics.embedding_std(z1), "embed_rank": diagnostics.effective_rank(z1),
                "backbone_std": diagnostics.embedding_std(anchor)}
