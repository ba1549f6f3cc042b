"""SimDINO: DINO without prototypes, stabilised by a coding-rate term (Wu et al., "Simplifying DINO
via Coding Rate Regularization", ICML 2025, Sec. 3, Eq. 9-10 and Algorithm 1).

The student (backbone + ProjectionHead: MLP -> d = 256, L2-normalised; drop-path) sees every crop;
the teacher, an exponential moving average of the student without drop-path, sees the 2 global
crops. No prototypes, no centring, no temperatures. With s_v, t_a the head outputs ([B, d] each):
  alignment = mean over pairs (teacher view a, student view v != a) of mean_b cos(s_v, sg(t_a))
  Z_a       = (s_a + sg(t_a)) / 2      (method.expansion_input: mean, the authors' code)
            = s_a                       (expansion_input: student, the paper's Eq. 9)
  R(Z_a)    = 1/2 logdet(I_d + d / (n eps2) Z_a^T Z_a)   (uncentred, fp32 Cholesky, n = global batch)
  loss      = -alignment - gamma * mean_a R(Z_a),   gamma = 1/n + 1/d unless method.gamma is set
Z_a^T Z_a is summed over processes with an autograd all-reduce (method.covariance: global), so
the loss and its gradient equal the one-process values on the same global batch. `local` keeps
each process's own Z^T Z but still divides by the global n: the authors' runs (reduce_cov=0),
whose effective eps2 grows with the number of GPUs.
After each optimizer step the teacher moves by EMA with momentum cosine momentum_teacher -> end per
iteration; `self_distillation: false` uses momentum 0: the teacher is the student (Table 8).
The evaluated network is the teacher's backbone.

Health (`health`): a coding rate below log(1 + d / (2 eps2)), what unit embeddings split evenly
between two orthogonal directions give (all on one direction: 1/2 log(1 + d / eps2), about half):
the embeddings span about one direction, i.e. collapse;
an effective rank of the teacher outputs below 2; plus the base class's dead-embedding check. A
non-finite coding rate means the Cholesky factorisation failed (`divergence_hint`).

Config: SimDINOConfig (all fields); ModelConfig for the backbone.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from sslcli import diagnostics
from sslcli.config import ModelConfig, SimDINOConfig
from sslcli.data import Batch
from sslcli.losses import coding_rate_of_gram, expansion_inputs, simdino_alignment, simdino_gamma
from sslcli.methods.base import SelfDistillation, StepContext, StepOutput
from sslcli.models import MultiCropNetwork, ProjectionHead, create_backbone
from sslcli.schedules import cosine_schedule


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SimDINO(SelfDistillation):
    """Student, EMA teacher and the coding-rate loss; see the module docstring for the equations."""

    def __init__(self, model_cfg: ModelConfig, cfg: SimDINOConfig, epochs: int, steps_per_epoch: int):
        momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, epochs, steps_per_epoch)
        super().__init__(lambda drop_path_rate: self.network(model_cfg, cfg, drop_path_rate), momentum,
                         cfg.self_distillation)
        self.cfg = cfg

    @staticmethod
    def network(model_cfg: ModelConfig, cfg: SimDINOConfig, drop_path_rate: float | None) -> nn.Module:
        """Backbone + ProjectionHead (MLP -> out_dim, L2-normalised) over the multi-crop views."""
        backbone = create_backbone(model_cfg, drop_path_rate=drop_path_rate)
        return MultiCropNetwork(backbone, ProjectionHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.head_layers))

    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """Teacher on the global views, student on every view; the teacher EMA in after_step."""
        with torch.no_grad():
            teacher_out, teacher_feats = self.teacher(batch.global_views)  # (B, d) per global view
        student_out, _ = self.student_forward(batch.views)  # (B, d) per view
        alignment = simdino_alignment(student_out, teacher_out)
        expansion, rates = self.expansion(student_out, teacher_out, batch.size)
        loss = -alignment - expansion
        anchor = teacher_feats[: batch.size].detach()  # (B, D) teacher CLS of global view 1
        stats = self._stats(teacher_out[0], rates, alignment, anchor) if ctx.with_stats else {}
        terms = {"alignment": alignment.detach(), "expansion": expansion.detach()}
        return StepOutput(loss, terms, {"momentum": self.teacher_momentum(ctx.step)}, stats, anchor)

    def expansion(self, student_out: list[Tensor], teacher_out: list[Tensor], batch_size: int) -> tuple[Tensor, Tensor]:
        """(gamma * mean_a R(Z_a), the rates R(Z_a) [G]) with the Gram matrices reduced as
        method.covariance says; n = batch_size x processes."""
        zs = expansion_inputs(student_out, teacher_out, self.cfg.expansion_input)  # (B, d) per global view
        grams = torch.stack([z.T @ z for z in zs])  # (G, d, d) float32
        world = _world_size()
        if world > 1 and self.cfg.covariance == "global":
            grams = dist_fn.all_reduce(grams)  # autograd-aware sum: gradients reach every process's Z
        n = batch_size * world
        rates = coding_rate_of_gram(grams, n, self.cfg.eps2)
        gamma = simdino_gamma(n, self.cfg.out_dim) if self.cfg.gamma is None else self.cfg.gamma
        return gamma * rates.mean(), rates

    @torch.no_grad()
    def _stats(self, z: Tensor, rates: Tensor, alignment: Tensor, anchor: Tensor) -> dict[str, Tensor]:
        z = z.float()  # (B, d) unit-norm teacher outputs of global view 1
        return {"coding_rate": rates.detach().mean(), "alignment": alignment.detach(),
                "out_std": diagnostics.embedding_std(z),
                "out_rank": diagnostics.effective_rank(z),
                "embed_std": diagnostics.embedding_std(anchor), "embed_rank": diagnostics.effective_rank(anchor)}

    def health(self, record: dict) -> list[tuple[str, str]]:
        found = []
        rate, floor = record.get("coding_rate"), math.log1p(self.cfg.out_dim / (2 * self.cfg.eps2))
        if rate is not None and rate < floor:
            found.append(("coding_rate", f"coding rate {rate:.2f} < {floor:.2f} (two orthogonal directions): "
                                         "the embeddings span about one direction, collapse"))
        rank = record.get("out_rank")
        if rank is not None and rank < 2:
            found.append(("rank", f"effective rank of the outputs {rank:.2f} < 2: dimensional collapse"))
        return found + super().health(record)

    def divergence_hint(self, terms: list[str]) -> str:
        if "expansion" in terms and "alignment" not in terms:
            return "the coding rate's Cholesky factorisation failed (Gram matrix not positive definite)"
        return ""
