"""SOVE: non-parametric [CLS] judges and non-parametric masked image modelling (Silva et al.,
"Self-Organizing Visual Embeddings: Non-Parametric Self-Supervised Learning", Sec. 2, Eq. 1-4).

No learned prototypes. One head (MLP -> d = 256, L2-normalised) on every token; the student sees
the masked global crops (data.masking: ibot) and the local crops, the EMA teacher the unmasked
global crops. Two memories of past teacher outputs, buffers of this module (in the checkpoint):
E_C [cls_memory, d] CLS embeddings and E_P [patch_memory, d] patch embeddings, initialised as
random unit vectors and filled first-in-first-out after each step from the all-gathered
outputs of the teacher's global view 2 (E_P: one random masked patch per image; any global batch
size, the write wraps around).
  [CLS] task (cls_tasks per step, losses averaged): a random permutation of E_C; anchors = its
    first cls_anchors rows (anchor_selection low_energy keeps a random half of them, as the
    authors' code), pool = the rest; sslcli.losses.sove_cls_loss: k = judges nearest pool
    entries + the anchor judge each concept, soft labels, P(u) = softmax(u D^T / tau) Y,
    cross-entropy between the teacher's and the student's P over the pairs v != a.
  MIM task (patch_tasks per step): patch_anchors rows of a random permutation of E_P, each its
    own only judge; sslcli.losses.sove_patch_loss on the masked positions of each global view.
  loss = cls_weight * L_cls + mim_weight * L_mim (+ koleo_weight * KoLeo: the authors' code has
  the option, weight 0 there; the mean over the global views of koleo_loss of the student's
  head output on this process's batch, as there; it keeps a small run's memory from filling
  with near-identical embeddings).
The random draws come from a generator seeded with (a seed drawn once from the run's seed, the
step): the same on every process and after a resume. Teacher momentum cosine 0.996 -> 1.

Health: the dead-embedding check of the base class on the teacher backbone CLS.
Config: SOVEConfig; ModelConfig; data.masking / data.mask_ratio for the masks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sslcli import diagnostics
from sslcli.config import ModelConfig, SOVEConfig
from sslcli.data import Batch
from sslcli.losses import koleo_loss, sove_cls_loss, sove_patch_loss
from sslcli.methods.base import SelfDistillation, StepContext, StepOutput
from sslcli.models import MaskedMultiCropNetwork, ProjectionHead, create_backbone, scatter_masked
from sslcli.schedules import cosine_schedule


def _gather(x: Tensor) -> Tensor:
    """[b, d] -> [world * b, d], rank order (= global batch order); x itself on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class SOVE(SelfDistillation):
    """Student, EMA teacher and the two memories; see the module docstring."""

    def __init__(self, model_cfg: ModelConfig, cfg: SOVEConfig, epochs: int, steps_per_epoch: int):
        def network(drop_path_rate: float | None) -> MaskedMultiCropNetwork:
            backbone = create_backbone(model_cfg, drop_path_rate=drop_path_rate, mask_token=cfg.mim_weight > 0)
            head = ProjectionHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.head_layers)
            return MaskedMultiCropNetwork(backbone, head, global_token=cfg.representation)

        momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, epochs, steps_per_epoch)
        super().__init__(network, momentum, cfg.self_distillation)
        self.cfg = cfg
        self.register_buffer("cls_memory", F.normalize(torch.randn(cfg.cls_memory, cfg.out_dim), dim=-1))
        self.register_buffer("patch_memory", F.normalize(torch.randn(cfg.patch_memory, cfg.out_dim), dim=-1))
        self.register_buffer("cls_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("patch_ptr", torch.zeros((), dtype=torch.long))
        self.draw_seed = int(torch.randint(0, 2**62, (), device="cpu"))  # from the run's seed; kept in the checkpoint

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.draw_seed, dtype=torch.long)

    def set_extra_state(self, state: Tensor) -> None:
        self.draw_seed = int(state)

    def _generator(self, step: int) -> torch.Generator:
        """The draws of `step`: identical on every process and after a resume."""
        return torch.Generator(device=self.cls_memory.device).manual_seed((self.draw_seed + step) % 2**63)

    def loss(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg, masks = self.cfg, batch.masks  # (G, B, N) bool or None (no MIM)
        with torch.no_grad():
            t_cls, t_feats, t_patch = self.teacher(batch.global_views, [], masks, mask_input=False)
        s_cls, _, s_patch = self.student_forward(batch.global_views, batch.local_views, masks, True)
        g = self._generator(ctx.step)
        tasks = [self._cls_task(g) for _ in range(cfg.cls_tasks)]
        cls_loss = sove_cls_loss(s_cls, t_cls, self.cls_memory, tasks, cfg.judges, cfg.student_temp,
                                 cfg.teacher_temp, cfg.anchor_weight, labels=cfg.labels)
        terms = {"cls": cls_loss.detach()}
        loss = cfg.cls_weight * cls_loss
        if cfg.koleo_weight > 0:  # spreads the student's global embeddings within the batch
            koleo = sum(koleo_loss(c) for c in s_cls[: len(batch.global_views)]) / len(batch.global_views)
            loss = loss + cfg.koleo_weight * koleo
            terms["koleo"] = koleo.detach()
        state = {"teacher_cls": t_cls[1].detach()}
        if masks is not None:
            flat = masks.flatten(0, 1)  # (G*B, N)
            teacher = scatter_masked(t_patch, flat).chunk(masks.shape[0])  # (B, N, d) per global view, once
            mim = self._mim_loss(scatter_masked(s_patch, flat).chunk(masks.shape[0]), teacher, masks, g)
            loss = loss + cfg.mim_weight * mim
            terms["mim"] = mim.detach()
            state["teacher_patch"] = self._one_patch_per_image(teacher[1], masks[1], g)
        anchor = t_feats[: batch.size].detach()  # (B, D) teacher CLS of global view 1
        stats = {"embed_std": diagnostics.embedding_std(anchor),
                 "embed_rank": diagnostics.effective_rank(anchor)} if ctx.with_stats else {}
        return StepOutput(loss, terms, {"momentum": self.teacher_momentum(ctx.step)}, stats, anchor, state)

    def _cls_task(self, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(anchors [P or P/2], pool [M - P]) rows of E_C from one random permutation."""
        perm = torch.randperm(self.cfg.cls_memory, generator=g, device=self.cls_memory.device)
        p = self.cfg.cls_anchors
        anchors, pool = perm[:p], perm[p:]
        if self.cfg.anchor_selection == "low_energy":  # a random half of the anchors (authors' code)
            keep = torch.randperm(p, generator=g, device=perm.device)[: max(p // 2, 1)]
            anchors = anchors[keep]
        return anchors, pool

    def _mim_loss(self, student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], masks: Tensor,
                  g: torch.Generator) -> Tensor:
        """student, teacher: (B, N, d) patch outputs per global view (zeros where unmasked)."""
        total = student[0].new_zeros((), dtype=torch.float32)
        for _ in range(self.cfg.patch_tasks):
            perm = torch.randperm(self.cfg.patch_memory, generator=g, device=self.patch_memory.device)
            total = total + sove_patch_loss(list(student), list(teacher), list(masks), self.patch_memory,
                                            perm[: self.cfg.patch_anchors], self.cfg.student_temp,
                                            self.cfg.teacher_temp, self.cfg.anchor_weight)
        return total / self.cfg.patch_tasks

    def _one_patch_per_image(self, teacher2: Tensor, view2: Tensor, g: torch.Generator) -> Tensor:
        """[B, d] one uniformly drawn masked patch of global view 2 per image (its teacher output).

        teacher2: (B, N, d) the teacher's view-2 patch outputs; view2: (B, N) its masks."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        b, n = view2.shape  # draw for the global batch, take this process's rows: process-independent
        scores = torch.rand((world * b, n), generator=g, device=view2.device)[rank * b:(rank + 1) * b]
        pick = scores.masked_fill(~view2, -1).argmax(dim=1)  # a random masked position (0 when none is)
        return teacher2[torch.arange(b, device=view2.device), pick].detach()

    @torch.no_grad()
    def after_step(self, ctx: StepContext, out: StepOutput) -> None:
        """FIFO writes of the global batch's teacher outputs into the memories, then the EMA."""
        self._write(self.cls_memory, self.cls_ptr, _gather(out.state["teacher_cls"]))
        if "teacher_patch" in out.state:
            self._write(self.patch_memory, self.patch_ptr, _gather(out.state["teacher_patch"]))
        super().after_step(ctx, out)

    @staticmethod
    def _write(memory: Tensor, ptr: Tensor, rows: Tensor) -> None:
        """memory[(ptr + i) % M] = rows[i] (the last M rows when there are more), ptr advances."""
        m, n = memory.shape[0], rows.shape[0]
        kept = F.normalize(rows.float(), dim=-1)[-m:]  # what a sequential write would leave
        idx = (ptr + (n - kept.shape[0]) + torch.arange(kept.shape[0], device=memory.device)) % m
        memory[idx] = kept.to(memory.dtype)
        ptr.copy_((ptr + n) % m)



