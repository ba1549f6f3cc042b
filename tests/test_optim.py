import math

import pytest
import torch

from sslcli.config import ModelConfig, OptimConfig
from sslcli.models import DINOHead, MultiCropNetwork, create_backbone
from sslcli.schedules import cosine_schedule, teacher_temperature_schedule
from sslcli.train.optim import (build_optimizer, clip_gradients, clip_gradients_per_param, layer_ids, param_groups,
                                scaled_lr, set_lr_wd)


def test_cosine_schedule_with_warmup():
    s = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(s) == 40
    assert s[0] == 0.0 and s[5] == pytest.approx(0.5)  # linear warm-up from 0
    assert s[10] == pytest.approx(1.0)  # cosine starts at base after warm-up
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 29 / 30)))
    assert all(a >= b for a, b in zip(s[10:], s[11:]))


def test_teacher_temperature_warms_per_epoch_like_linspace():
    assert teacher_temperature_schedule(0.04, 0.07, 4, 6) == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert teacher_temperature_schedule(0.04, 0.07, 0, 2) == [0.07, 0.07]


def test_lr_scaling_rules():
    assert scaled_lr(OptimConfig(lr=0.0005, batch_size=1024)) == pytest.approx(0.002)
    assert scaled_lr(OptimConfig(lr=0.004, batch_size=256, lr_scaling="sqrt")) == pytest.approx(0.002)
    assert scaled_lr(OptimConfig(lr=0.1, batch_size=64, lr_scaling="none")) == 0.1


def test_weight_decay_groups_follow_dino():
    bb = create_backbone(ModelConfig(kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1,
                                             "num_heads": 2}))
    decay, no_decay = param_groups(bb)
    names = {id(p): n for n, p in bb.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    free = {names[id(p)] for p in no_decay["params"]}
    assert "model.cls_token" in decayed and "model.pos_embed" in decayed  # decayed, as in DINO
    assert all(n.endswith(".bias") or "norm" in n for n in free)
    assert no_decay["wd_mult"] == 0.0 and decay["wd_mult"] == 1.0
    assert decay["lr_mult"] == no_decay["lr_mult"] == 1.0


def tiny_student(depth: int = 3):
    """backbone (ViT, `depth` blocks, with a mask token) + DINO head, as a method's student."""
    bb = create_backbone(ModelConfig(kwargs=dict(img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2)),
                         mask_token=True)
    return MultiCropNetwork(bb, DINOHead(16, 10, hidden_dim=16, bottleneck_dim=8))


def test_layer_ids_follow_dinov2_numbering():
    """Patch embedding / tokens 0, block k -> k + 1, final norm and head L + 1."""
    ids, layers = layer_ids(tiny_student(depth=3))
    assert layers == 3
    for name in ("backbone.mask_token", "backbone.model.cls_token", "backbone.model.pos_embed",
                 "backbone.model.patch_embed.proj.weight"):
        assert ids[name] == 0
    assert ids["backbone.model.blocks.0.attn.qkv.weight"] == 1 and ids["backbone.model.blocks.2.mlp.fc2.bias"] == 3
    assert ids["backbone.model.norm.weight"] == 4 and ids["head.last_layer.weight_v"] == 4


def test_layer_decay_and_patch_embed_multipliers_reach_the_optimizer():
    student = tiny_student(depth=3)
    cfg = OptimConfig(layer_decay=0.9, patch_embed_lr_mult=0.2)
    optimizer = build_optimizer(student, cfg, torch.device("cpu"))
    set_lr_wd(optimizer, lr=1.0, wd=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert lr_of[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == pytest.approx((0.9 ** 3, 0.5))
    assert lr_of[id(named["backbone.model.blocks.0.attn.qkv.bias"])] == pytest.approx((0.9 ** 3, 0.0))
    assert lr_of[id(named["backbone.model.patch_embed.proj.weight"])] == pytest.approx((0.9 ** 4 * 0.2, 0.5))
    assert lr_of[id(named["backbone.model.cls_token"])] == pytest.approx((0.9 ** 4, 0.5))  # tokens are decayed
    assert lr_of[id(named["head.mlp.0.weight"])] == pytest.approx((1.0, 0.5))
    assert len(lr_of) == sum(p.requires_grad for p in student.parameters())
    # off by default: two groups (decayed weights, the rest), every multiplier 1
    plain = build_optimizer(student, OptimConfig(), torch.device("cpu"))
    assert [(g["lr_mult"], g["wd_mult"]) for g in plain.param_groups] == [(1.0, 1.0), (1.0, 0.0)]


def test_global_clipping_is_one_norm_per_student_module():
    student = tiny_student(depth=1)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    backbone_norm = math.sqrt(sum(p.numel() for p in student.backbone.parameters()))
    head = [p.grad.clone() for p in student.head.parameters()]
    clip_gradients(student, max_norm=1.0, mode="global")
    grads = torch.cat([p.grad.flatten() for p in student.backbone.parameters()])
    assert grads.norm().item() == pytest.approx(1.0, rel=1e-4)  # the whole backbone scaled as one
    assert torch.allclose(grads, torch.full_like(grads, 1 / backbone_norm), rtol=1e-4)  # directions kept
    head_norm = torch.cat([p.grad.flatten() for p in student.head.parameters()]).norm().item()
    assert head_norm == pytest.approx(1.0, rel=1e-4)  # clipped separately from the backbone
    assert all(torch.allclose(p.grad / p.grad.norm(), g / g.norm()) for p, g in zip(student.head.parameters(), head))


def test_per_parameter_clipping():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([[0.3, 0.4], [0.0, 0.0]])  # norm 0.5 -> untouched
    clip_gradients_per_param([a, b], 1.0)
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(b.grad, torch.tensor([[0.3, 0.4], [0.0, 0.0]]))


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimizers_step(name):
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, OptimConfig(name=name), torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = 0.1
    model(torch.randn(5, 4)).pow(2).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_per_parameter_clipping_is_dinos_per_tensor_formula_bit_for_bit():
    # The batched scales must round exactly as DINO's loop: coef = max / (||g|| + 1e-6), applied when < 1.
    torch.manual_seed(0)
    shapes = [(3,), (8, 5), (2, 3, 4), (1,), (16, 16), (7,)] * 3
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape) * (0.05 if i % 3 == 0 else 4.0)  # some under the norm, some over
    expected = []
    for p in params:
        g = p.grad.clone()
        coef = 1.5 / (g.norm() + 1e-6)
        expected.append(g * coef if coef < 1 else g)
    clip_gradients_per_param(params, 1.5)
    assert sum(bool(e.norm() < 1.4) for e in expected) >= 3  # the case mix is real: untouched and clipped
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))


def test_cpu_adamw_updates_exactly_as_torchs_default_loop():
    # build_optimizer's CPU AdamW (multi-tensor) must not move a CPU figure: the same bits as torch's
    # default CPU implementation (foreach=False), over steps with weight decay on one group only.
    torch.manual_seed(0)
    ours, ref = tiny_student(depth=1), tiny_student(depth=1)
    ref.load_state_dict(ours.state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    opt = build_optimizer(ours, OptimConfig(), torch.device("cpu"))
    name_of = {id(q): n for n, q in ours.named_parameters()}
    ref_params = dict(ref.named_parameters())
    ref_opt = torch.optim.AdamW([{"params": [ref_params[name_of[id(q)]] for q in g["params"]], "wd_mult": g["wd_mult"]}
                                 for g in opt.param_groups], lr=0.0, betas=OptimConfig().betas, foreach=False)
    assert opt.defaults["foreach"] is True and [g["wd_mult"] for g in opt.param_groups] == [1.0, 0.0]
    for step in range(5):
        grads = [torch.randn_like(p) for p in ours.parameters()]
        for model, optimizer in ((ours, opt), (ref, ref_opt)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            set_lr_wd(optimizer, lr=1e-3 * (step + 1), wd=0.04)
            optimizer.step()
    assert all(not torch.equal(p, s) for p, s in zip(ours.parameters(), start) if p.requires_grad)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
