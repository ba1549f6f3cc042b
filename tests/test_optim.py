import math

import pytest
import torch

from sslcli.config import ModelConfig, OptimConfig
from sslcli.models import create_backbone
from sslcli.schedules import cosine_schedule, teacher_temperature_schedule
from sslcli.train.optim import build_optimizer, clip_gradients_per_param, param_groups, scaled_lr


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
    assert no_decay["weight_decay"] == 0.0


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
