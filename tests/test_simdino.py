"""SimDINO: the coding rate against closed forms, the loss, the method's covariance modes,
self_distillation false, health, and tiny end-to-end runs (one epoch, --procs 2, exact resume)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslcli.config import DINOConfig, ModelConfig, OptimConfig, SimDINOConfig
from sslcli.data import Batch
from sslcli.errors import TrainingError
from sslcli.losses import coding_rate, coding_rate_of_gram, simdino_loss
from sslcli.methods import StepContext, build_method
from sslcli.methods.simdino import SimDINO
from sslcli.train.engine import DivergenceGuard
from sslcli.train.optim import build_optimizer
from sslcli.train.pretrain import RunOptions, pretrain
from sslcli.train.trainer import train_step
from run_checks import assert_resume_is_exact, assert_two_processes_match_one, losses

EPS2 = 0.05
TINY_VIT = ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.1,
                       kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
TINY_SIMDINO = ["method.name=simdino", "method.out_dim=32", "method.hidden_dim=64"]


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- coding rate


def test_coding_rate_of_orthonormal_rows():
    n, d = 8, 32
    z = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(0)))[0].T  # (n, d) orthonormal rows
    # Z^T Z is a rank-n projection: n eigenvalues 1, so R = n/2 log(1 + d / (n eps2))
    assert coding_rate(z, EPS2).item() == pytest.approx(n / 2 * math.log(1 + d / (n * EPS2)), rel=1e-5)


def test_coding_rate_of_a_rank_one_batch():
    n, d = 16, 32
    z = unit_rows(1, d).expand(n, d)  # every row the same unit vector: Z^T Z = n u u^T
    assert coding_rate(z, EPS2).item() == pytest.approx(0.5 * math.log(1 + d / EPS2), rel=1e-5)


def test_coding_rate_of_zero_is_zero_and_matches_logdet():
    assert coding_rate(torch.zeros(10, 16), EPS2).item() == 0.0
    z = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    expected = 0.5 * torch.logdet(torch.eye(16, dtype=torch.float64) + 16 / (12 * EPS2) * z.double().T @ z.double())
    assert coding_rate(z, EPS2).item() == pytest.approx(expected.item(), rel=1e-5)


def test_coding_rate_of_a_non_finite_gram_is_nan_without_raising():
    gram = torch.eye(4)
    gram[0, 0] = float("nan")
    assert torch.isnan(coding_rate_of_gram(gram, 4, EPS2))


# ----------------------------------------------------------------------------- loss


def views(b: int, d: int, count: int, seed: int) -> list[torch.Tensor]:
    return [unit_rows(b, d, seed + v).requires_grad_() for v in range(count)]


def test_simdino_loss_terms_by_hand():
    student, teacher = views(6, 8, 4, seed=0), [t.detach() for t in views(6, 8, 2, seed=10)]
    loss, alignment, expansion = simdino_loss(student, teacher, EPS2)
    pairs = [(a, v) for a in range(2) for v in range(4) if v != a]
    cos = [F.cosine_similarity(student[v], teacher[a], dim=-1).mean() for a, v in pairs]
    assert len(pairs) == 6 and alignment.item() == pytest.approx(torch.stack(cos).mean().item(), rel=1e-6)
    gamma = 1 / 6 + 1 / 8
    rates = [coding_rate((student[a] + teacher[a]) / 2, EPS2) for a in range(2)]
    assert expansion.item() == pytest.approx(gamma * torch.stack(rates).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(-alignment.item() - expansion.item(), rel=1e-6)
    _, _, student_only = simdino_loss(student, teacher, EPS2, gamma=1.0, expansion_input="student")
    rates = [coding_rate(student[a], EPS2) for a in range(2)]
    assert student_only.item() == pytest.approx(torch.stack(rates).mean().item(), rel=1e-6)


def test_gradient_is_finite_for_identical_embeddings():
    same = unit_rows(1, 16).expand(8, 16)
    student = [same.clone().requires_grad_() for _ in range(4)]
    loss, _, _ = simdino_loss(student, [same.clone(), same.clone()], EPS2)
    loss.backward()
    assert all(torch.isfinite(s.grad).all() for s in student)
    assert any(s.grad.abs().sum() > 0 for s in student[:2])  # the coding rate pushes the rows apart


# ----------------------------------------------------------------------------- method


def tiny_method(**method) -> SimDINO:
    torch.manual_seed(0)
    cfg = SimDINOConfig(out_dim=16, hidden_dim=32, **method)
    return build_method(TINY_VIT, cfg, epochs=2, steps_per_epoch=3)


def tiny_batch(seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch.from_views([torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] +
                            [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)])


def test_method_loss_equals_the_pure_function_on_one_process():
    method = tiny_method()
    batch = tiny_batch()
    torch.manual_seed(5)
    out = method.loss(batch, StepContext(0, 0, with_stats=True))
    torch.manual_seed(5)  # same drop-path draws
    with torch.no_grad():
        teacher, _ = method.teacher(batch.global_views)
    student, _ = method.student(batch.views)
    loss, alignment, expansion = simdino_loss(student, teacher, EPS2)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert out.terms["alignment"].item() == pytest.approx(alignment.item(), rel=1e-6)
    assert out.terms["expansion"].item() == pytest.approx(expansion.item(), rel=1e-6)
    assert {"coding_rate", "alignment", "out_std", "out_rank", "embed_std", "embed_rank"} <= set(out.stats)
    assert method.evaluated_backbone is method.teacher.backbone and out.anchor.shape == (4, 32)


@pytest.mark.parametrize("method_cfg", [SimDINOConfig(out_dim=16, hidden_dim=32, self_distillation=False),
                                        DINOConfig(out_dim=16, hidden_dim=32, bottleneck_dim=8, self_distillation=False)],
                         ids=["simdino", "dino"])
def test_without_self_distillation_the_teacher_is_the_student_after_every_step(method_cfg):
    torch.manual_seed(0)
    method = build_method(TINY_VIT, method_cfg, epochs=2, steps_per_epoch=3)
    optim_cfg = OptimConfig(batch_size=4, clip_grad=3.0)
    optimizer = build_optimizer(method.student, optim_cfg, torch.device("cpu"), method.constant_lr_parameters())
    for step in range(3):
        out = train_step(method, optimizer, tiny_batch(seed=step), StepContext(0, step), 1e-3, 0.04, optim_cfg, "fp32")
        method.after_step(StepContext(0, step), out)
        student, teacher = method.student.state_dict(), method.teacher.state_dict()
        assert all(torch.equal(student[k], teacher[k]) for k in student)
    with_ema = tiny_method()
    out = train_step(with_ema, build_optimizer(with_ema.student, optim_cfg, torch.device("cpu"), []), tiny_batch(),
                     StepContext(0, 0), 1e-3, 0.04, optim_cfg, "fp32")
    with_ema.after_step(StepContext(0, 0), out)
    assert not torch.equal(with_ema.student.head.mlp[0].weight, with_ema.teacher.head.mlp[0].weight)


def test_health_names_a_collapsed_coding_rate_and_rank():
    method = tiny_method()
    floor = math.log1p(16 / (2 * EPS2))
    kinds = {kind for kind, _ in method.health({"coding_rate": 0.5 * math.log1p(16 / EPS2), "out_rank": 1.1})}
    assert kinds == {"coding_rate", "rank"}
    assert method.health({"coding_rate": floor + 1, "out_rank": 5.0, "embed_std": 0.1}) == []


def test_divergence_of_the_expansion_names_the_cholesky():
    method = tiny_method()
    out = method.loss(tiny_batch(), StepContext(0, 0))
    out.terms["expansion"] = torch.tensor(float("nan"))
    out.loss = out.loss * float("nan")
    guard = DivergenceGuard(torch.device("cpu"))
    guard.observe(6, out)
    with pytest.raises(TrainingError, match=r"non-finite expansion at step 7 \(the coding rate's Cholesky"):
        guard.check(None, method.divergence_hint)


# ----------------------------------------------------------------------------- end to end


def test_one_epoch_and_two_processes_match_one(tiny_config, tmp_path):
    assert_two_processes_match_one(tiny_config(*TINY_SIMDINO, "train.epochs=1"), tmp_path, steps=3)
    assert all(math.isfinite(v) for v in losses(tmp_path / "one"))
    # the authors' per-process Gram matrix: the same on one process, a different loss on two
    local = tiny_config(*TINY_SIMDINO, "train.epochs=1", "method.covariance=local")
    pretrain(local, RunOptions(out=tmp_path / "local", device="cpu", procs=2))
    assert losses(tmp_path / "local")[0] != pytest.approx(losses(tmp_path / "one")[0], rel=1e-4)


def test_interrupt_and_resume_is_exact(tiny_config, tmp_path):
    assert_resume_is_exact(tiny_config(*TINY_SIMDINO, "train.epochs=2", "model.drop_path_rate=0.1"), tmp_path)
