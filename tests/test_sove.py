"""SOVE: judges and soft labels, the [CLS] and MIM losses by hand, FIFO memories, and tiny runs
(one epoch, --procs 2 equal to one process, exact resume)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslcli.config import ModelConfig, SOVEConfig
from sslcli.data import Batch
from sslcli.losses import sove_cls_loss, sove_judges, sove_patch_loss
from sslcli.methods import StepContext, build_method
from sslcli.methods.sove import SOVE
from run_checks import assert_resume_is_exact, assert_two_processes_match_one


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def split(m, p, seed=0):
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    return perm[:p], perm[p:]


def test_judges_are_nearest_pool_entries_then_the_anchor_with_soft_labels():
    memory = unit(40, 8)
    anchors, pool = split(40, 5)
    judges, y = sove_judges(memory, anchors, pool, k=3)
    assert judges.shape == (20, 8) and y.shape == (20, 5)
    assert torch.allclose(y.sum(1), torch.ones(20))
    for p in range(5):
        rows = judges[p * 4:(p + 1) * 4]
        assert torch.equal(rows[-1], memory[anchors[p]])  # the anchor judges its own concept last
        cos = memory[pool] @ memory[anchors[p]]
        top = cos.topk(3).values
        assert torch.allclose(rows[:3] @ memory[anchors[p]], top)  # nearest pool entries, descending
        assert not any(torch.equal(r, memory[a]) for r in rows[:3] for a in anchors)  # never an anchor
        assert torch.allclose(y[p * 4:p * 4 + 3, p], top, atol=1e-6)  # its cosine on its own anchor
        assert y[p * 4 + 3, p].item() == pytest.approx(0.9)
        others = torch.cat([y[p * 4 + 3, :p], y[p * 4 + 3, p + 1:]])
        assert torch.allclose(others, torch.full((4,), 0.1 / 4))
    _, onehot = sove_judges(memory, anchors, pool, k=3, labels="onehot")
    assert torch.equal(onehot[0], torch.tensor([1.0, 0, 0, 0, 0])) and onehot[3, 0].item() == pytest.approx(0.9)


def test_cls_loss_with_no_judges_and_hard_labels_is_a_prototype_cross_entropy():
    memory = unit(30, 8)
    anchors, pool = split(30, 6)
    student, teacher = [unit(4, 8, s) for s in (1, 2, 3)], [unit(4, 8, s) for s in (4, 5)]
    loss = sove_cls_loss(student, teacher, memory, [(anchors, pool)], k=0, student_temp=0.1, teacher_temp=0.04,
                         anchor_weight=1.0)
    protos = memory[anchors]
    q = [F.softmax(t @ protos.T / 0.04, -1) for t in teacher]
    logp = [F.log_softmax(s @ protos.T / 0.1, -1) for s in student]
    pairs = [(a, v) for a in range(2) for v in range(3) if v != a]
    expected = torch.stack([-(q[a] * logp[v]).sum(-1).mean() for a, v in pairs]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_memberships_are_distributions_and_tasks_average():
    memory = unit(50, 8)
    tasks = [split(50, 5, seed) for seed in (0, 1)]
    student, teacher = [unit(3, 8, s) for s in (1, 2)], [unit(3, 8, s) for s in (3, 4)]
    both = sove_cls_loss(student, teacher, memory, tasks, 2, 0.1, 0.04)
    each = [sove_cls_loss(student, teacher, memory, [t], 2, 0.1, 0.04) for t in tasks]
    assert both.item() == pytest.approx((each[0] + each[1]).item() / 2, rel=1e-6)
    judges, y = sove_judges(memory, *tasks[0], 2)
    p = F.softmax(student[0] @ judges.T / 0.1, -1) @ y
    assert torch.allclose(p.sum(1), torch.ones(3)) and (p >= 0).all()


def test_only_masked_positions_enter_the_mim_loss():
    memory, anchors = unit(20, 8), torch.arange(6)
    student = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(2, 5, 8) for _ in range(2)]
    masks = [torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool),
             torch.tensor([[0, 0, 0, 0, 1], [1, 0, 1, 0, 0]], dtype=torch.bool)]
    loss = sove_patch_loss(student, teacher, masks, memory, anchors, 0.1, 0.04)
    loss.backward()
    for s, m in zip(student, masks):
        assert (s.grad[~m] == 0).all() and (s.grad[m].abs().sum(-1) > 0).all()
    changed = [t.clone() for t in teacher]
    changed[0][~masks[0]] = torch.randn(int((~masks[0]).sum()), 8)
    assert sove_patch_loss(student, changed, masks, memory, anchors, 0.1, 0.04).item() == pytest.approx(loss.item())
    # by hand for view 1: image 1 averages its 2 patches, image 2 has none and counts 0; views averaged
    y = torch.full((6, 6), 0.1 / 5).fill_diagonal_(0.9)
    def ce(s, t):
        q = F.softmax(t @ memory[anchors].T / 0.04, -1) @ y
        return -(q * torch.log(F.softmax(s @ memory[anchors].T / 0.1, -1) @ y)).sum(-1)
    v1 = ce(student[0][0, :2], teacher[0][0, :2]).mean() / 2
    v2 = (ce(student[1][0, 4:5], teacher[1][0, 4:5]).mean() + ce(student[1][1, [0, 2]], teacher[1][1, [0, 2]]).mean()) / 2
    assert loss.item() == pytest.approx(((v1 + v2) / 2).item(), rel=1e-5)


def test_fifo_memory_wraps_around_a_batch_that_does_not_divide_it():
    memory, ptr = torch.zeros(5, 2), torch.tensor(3)
    rows = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]])
    SOVE._write(memory, ptr, rows)
    assert ptr.item() == 1
    assert torch.allclose(memory[3], rows[0]) and torch.allclose(memory[4], rows[1])
    assert torch.allclose(memory[0], F.normalize(rows[2], dim=0)) and memory[1:3].abs().sum() == 0
    many = torch.arange(16.0).reshape(8, 2) + 1
    SOVE._write(memory, ptr, many)  # 8 rows from position 1: as if written one by one
    assert ptr.item() == 4
    expected = torch.zeros(5, 2)
    for i, row in enumerate(many):
        expected[(1 + i) % 5] = F.normalize(row, dim=0)
    assert torch.allclose(memory, expected)


def test_method_step_fills_memories_and_resumes_its_draws():
    vit = ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0,
                      kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    cfg = SOVEConfig(out_dim=16, hidden_dim=32, cls_memory=64, patch_memory=32, cls_anchors=8, judges=3,
                     patch_anchors=8, cls_tasks=2, anchor_selection="low_energy")
    torch.manual_seed(0)
    method = build_method(vit, cfg, 2, 3)
    g = torch.Generator().manual_seed(0)
    batch = Batch.from_views([torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)])
    batch.masks = torch.rand(2, 4, 16, generator=g) < 0.4
    before = method.cls_memory.clone()
    out = method.loss(batch, StepContext(0, 0))
    method.after_step(StepContext(0, 0), out)
    assert (method.cls_memory != before).any(1).sum() == 4 and method.cls_ptr.item() == 4
    assert method.patch_ptr.item() == 4 and set(out.terms) == {"cls", "mim"}
    torch.manual_seed(1)
    other = build_method(vit, cfg, 2, 3)
    other.load_state_dict(method.state_dict())  # memories, pointers and the draw seed
    assert other.draw_seed == method.draw_seed



def test_koleo_term_spreads_the_students_global_outputs():
    """method.koleo_weight adds w * mean over global views of KoLeo(student head CLS output):
    the same draws and masks give exactly that difference, and the term is the one computed on
    the student's own outputs."""
    from sslcli.losses import koleo_loss

    vit = ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0,
                      kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    g = torch.Generator().manual_seed(0)
    batch = Batch.from_views([torch.randn(6, 3, 16, 16, generator=g) for _ in range(2)])
    batch.masks = torch.rand(2, 6, 16, generator=g) < 0.4
    losses = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        method = build_method(vit, SOVEConfig(out_dim=16, hidden_dim=32, cls_memory=64, patch_memory=32,
                                              cls_anchors=8, judges=3, patch_anchors=8, koleo_weight=w), 2, 3)
        losses[w] = method.loss(batch, StepContext(0, 0))
    koleo = losses[0.5].terms["koleo"]
    assert "koleo" not in losses[0.0].terms
    assert torch.allclose(losses[0.5].loss - losses[0.0].loss, 0.5 * koleo, atol=1e-6)
    with torch.no_grad():
        cls_out, _, _ = method.student(batch.global_views, [], batch.masks, True)  # (B, d) per global view
    assert torch.allclose(koleo, (koleo_loss(cls_out[0]) + koleo_loss(cls_out[1])) / 2, atol=1e-6)


# ----------------------------------------------------------------------------- end to end

SOVE_RUN = ["method.name=sove", "method.out_dim=16", "method.hidden_dim=32", "method.cls_memory=64",
            "method.patch_memory=32", "method.cls_anchors=8", "method.judges=3", "method.patch_anchors=8",
            "data.masking=ibot", "data.mask_ratio=[0.3,0.3]", "data.mask_min_block=1"]


def test_one_epoch_with_two_processes_matches_one(tiny_config, tmp_path):
    assert_two_processes_match_one(tiny_config(*SOVE_RUN, "train.epochs=1"), tmp_path, steps=3)


def test_interrupt_and_resume_is_exact(tiny_config, tmp_path):
    assert_resume_is_exact(tiny_config(*SOVE_RUN, "train.epochs=2", "model.drop_path_rate=0.1"), tmp_path)


@pytest.mark.parametrize("labels", ["soft", "onehot"])
def test_memberships_use_the_label_structure_without_building_y(labels):
    from sslcli.losses import _judges, _memberships

    memory = unit(60, 8)
    anchors, pool = split(60, 7)
    u = unit(5, 8, seed=9)
    judges, y = sove_judges(memory, anchors, pool, 3, labels=labels)
    _, own = _judges(memory, anchors, pool, 3, 0.9, labels)
    dense = F.softmax(u @ judges.T / 0.1, -1) @ y
    assert torch.allclose(_memberships(u, judges, own, 0.1), dense, atol=1e-6)
