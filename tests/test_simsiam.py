"""SimSiam: loss, projector / predictor, the method on a tiny ResNet, fix_pred_lr, decay-all and
the per-epoch cosine, and one tiny end-to-end pretraining epoch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sslcli.config import ModelConfig, OptimConfig, SimSiamConfig, load_config
from sslcli.errors import ConfigError
from sslcli.losses import simsiam_loss
from sslcli.methods import build_method
from sslcli.methods.simsiam import SimSiam
from sslcli.models import SimSiamPredictor, SimSiamProjector
from sslcli.schedules import cosine_schedule, epoch_cosine_schedule
from sslcli.data import Batch
from sslcli.methods import StepContext
from sslcli.train.engine import Schedules
from sslcli.train.trainer import train_step
from sslcli.train.optim import build_optimizer, param_groups, set_lr_wd

# A ResNet-18 layout with one block per stage and 8..64 channels: 64-d features on 16-px views.
TINY_RESNET = ModelConfig(arch="resnet18", drop_path_rate=0.0, kwargs={"layers": [1, 1, 1, 1],
                                                                      "channels": [8, 16, 32, 64]})
TINY_SIMSIAM = SimSiamConfig(out_dim=32, hidden_dim=32, pred_dim=8)
SIMSIAM_OPTIM = dict(name="sgd", lr=0.05, batch_size=512, min_lr=0.0, warmup_epochs=0, weight_decay=1e-4,
                     weight_decay_end=1e-4, schedule_unit="epoch", decay_norm_and_bias=True)


def tiny_method(**method) -> SimSiam:
    torch.manual_seed(0)
    cfg = SimSiamConfig(**{**TINY_SIMSIAM.__dict__, **method})
    return build_method(TINY_RESNET, cfg, epochs=4, steps_per_epoch=2)


def views(b: int = 8) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch.from_views([torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)])


# ----------------------------------------------------------------------------- loss


def test_simsiam_loss_hand_computed():
    # B = 2, D = 2. cos(p1, z2): rows ([1,0],[2,0]) -> 1 and ([1,1],[1,0]) -> 1/sqrt(2);
    # cos(p2, z1): rows ([0,1],[1,0]) -> 0 and ([3,0],[-1,0]) -> -1.
    p1, z2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    p2, z1 = torch.tensor([[0.0, 1.0], [3.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    expected = -0.5 * ((1 + 1 / math.sqrt(2)) / 2 + (0 - 1) / 2)
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, rel=1e-6)


def test_simsiam_loss_matches_algorithm_1_and_stops_gradients_into_z():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, requires_grad=True) for _ in range(4))
    cos = nn.CosineSimilarity(dim=1)  # the authors' criterion
    reference = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5
    loss = simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- heads


def test_projector_layers_follow_the_authors_code():
    proj = SimSiamProjector(64, hidden_dim=48, out_dim=32)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert proj[0].bias is None and proj[3].bias is None
    assert proj[0].in_features == 64 and proj[3].out_features == 48 and proj[6].out_features == 32
    assert proj[6].bias is not None and not proj[6].bias.requires_grad  # frozen bias
    assert proj[6].weight.requires_grad
    assert not proj[7].affine and proj[7].weight is None  # BN(affine=False) at the end
    assert proj(torch.randn(6, 64)).shape == (6, 32)


def test_predictor_is_a_bottleneck_mlp_with_output_bias():
    pred = SimSiamPredictor(dim=32, pred_dim=8)
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert pred[0].bias is None and (pred[0].in_features, pred[0].out_features) == (32, 8)
    assert pred[3].bias is not None and pred[3].bias.requires_grad and pred[3].out_features == 32
    assert pred(torch.randn(6, 32)).shape == (6, 32)


# ----------------------------------------------------------------------------- the method


def test_method_loss_anchor_stats_and_one_step():
    method = tiny_method()
    assert isinstance(method, SimSiam) and method.evaluated_backbone is method.student.backbone
    # zero-init residual: the last BN scale of every residual block starts at 0 (timm's zero_init_last)
    last_bns = [p for n, p in method.student.backbone.named_parameters() if n.endswith("bn2.weight")]
    assert last_bns and all(torch.count_nonzero(p) == 0 for p in last_bns)
    optimizer = build_optimizer(method.student, OptimConfig(**SIMSIAM_OPTIM), torch.device("cpu"),
                                method.constant_lr_parameters())
    before = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    optim = OptimConfig(**SIMSIAM_OPTIM, clip_grad=0.0)
    out = train_step(method, optimizer, views(), StepContext(0, 0, with_stats=True), 0.1, 1e-4, optim, "fp32")
    assert torch.isfinite(out.loss) and -1.0 <= out.loss.item() <= 1.0
    assert set(out.terms) == {"simsiam"} and not out.terms["simsiam"].requires_grad
    assert out.anchor.shape == (8, 64) and not out.anchor.requires_grad
    assert {"embed_std", "embed_rank", "backbone_std"} <= set(out.stats)
    after = dict(method.student.named_parameters())
    changed = [n for n, p in after.items() if not torch.equal(before[n], p)]
    assert any(n.startswith("backbone.") for n in changed) and any(n.startswith("predictor.") for n in changed)
    assert "projector.6.bias" not in changed  # frozen
    assert out.scalars == {} and method.health({"embed_std": 1.0}) == []


def test_simsiam_takes_exactly_two_views_checked_at_load():
    with pytest.raises(ConfigError, match="local_crops"):
        load_config("simsiam-rn50", overrides=["data.local_crops=2"])


def test_simsiam_config_has_no_dino_keys():
    """The SimSiam preset resolves to SimSiam's own method section (no temperatures, no momentum)."""
    cfg = load_config("simsiam-rn50")
    assert isinstance(cfg.method, SimSiamConfig) and not hasattr(cfg.method, "teacher_temp")
    with pytest.raises(ConfigError, match="method.teacher_temp.*method.name simsiam"):
        load_config("simsiam-rn50", overrides=["method.teacher_temp=0.04"])
    assert cfg.data.interpolation == "bilinear"  # MoCo-v2's RandomResizedCrop


def test_fix_pred_lr_keeps_the_predictor_at_the_base_lr():
    method = tiny_method(fix_pred_lr=True)
    cfg = OptimConfig(**SIMSIAM_OPTIM)
    optimizer = build_optimizer(method.student, cfg, torch.device("cpu"), method.constant_lr_parameters())
    predictor = {id(p) for p in method.student.predictor.parameters()}
    sched = Schedules.build(cfg, epochs=4, steps_per_epoch=2)
    base = 0.05 * 512 / 256
    for i in range(len(sched.lr)):
        set_lr_wd(optimizer, sched.lr[i], sched.wd[i])
        for group in optimizer.param_groups:
            is_pred = {id(p) in predictor for p in group["params"]}
            assert len(is_pred) == 1  # the predictor has groups of its own
            assert group["lr"] == pytest.approx(base if is_pred.pop() else sched.lr[i])
            assert group["weight_decay"] == pytest.approx(1e-4)
    assert sched.lr[-1] < base / 2  # the rest did decay

    method = tiny_method(fix_pred_lr=False)
    assert method.constant_lr_parameters() == []
    optimizer = build_optimizer(method.student, cfg, torch.device("cpu"), method.constant_lr_parameters())
    set_lr_wd(optimizer, 0.01, 1e-4)
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)


def test_decay_norm_and_bias_decays_every_trainable_parameter():
    method = tiny_method()
    trainable = [p for p in method.student.parameters() if p.requires_grad]
    (group,) = param_groups(method.student, decay_norm_and_bias=True)
    assert group["wd_mult"] == 1.0 and len(group["params"]) == len(trainable)
    assert all(id(p) != id(method.student.projector[6].bias) for p in group["params"])  # frozen: left out
    decay, no_decay = param_groups(method.student)  # the default (DINO) split
    assert any(p is method.student.predictor[3].bias for p in no_decay["params"])
    assert not any(p.ndim == 1 for p in decay["params"])
    with pytest.raises(ValueError):
        param_groups(method.student, constant_lr=[nn.Parameter(torch.zeros(1))])


# ----------------------------------------------------------------------------- schedules


def test_epoch_cosine_is_simsiams_adjust_learning_rate():
    epochs, spe, base = 5, 3, 0.1
    got = epoch_cosine_schedule(base, 0.0, epochs, spe)
    expected = [base * 0.5 * (1.0 + math.cos(math.pi * e / epochs)) for e in range(epochs) for _ in range(spe)]
    assert got == pytest.approx(expected)
    sched = Schedules.build(OptimConfig(lr=0.05, batch_size=512, min_lr=0.0, warmup_epochs=0, weight_decay=1e-4,
                                        weight_decay_end=1e-4, schedule_unit="epoch"), epochs, spe)
    assert sched.lr == pytest.approx(epoch_cosine_schedule(0.1, 0.0, epochs, spe))
    assert sched.wd == pytest.approx([1e-4] * epochs * spe)
    step = Schedules.build(OptimConfig(lr=0.05, batch_size=512, min_lr=0.0, warmup_epochs=0), epochs, spe)
    assert step.lr == pytest.approx(cosine_schedule(0.1, 0.0, epochs, spe))  # "step" is unchanged
    warm = epoch_cosine_schedule(1.0, 0.0, 4, 2, warmup_epochs=2)
    assert warm == pytest.approx([0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5])


# ----------------------------------------------------------------------------- end to end


def test_one_epoch_of_simsiam_pretraining(tiny_config, tmp_path):
    from sslcli.train.pretrain import RunOptions, pretrain

    cfg = tiny_config("train.epochs=1", "method.name=simsiam", "method.out_dim=32", "method.hidden_dim=32",
                      "method.pred_dim=8", "data.local_crops=0", "optim.name=sgd", "optim.lr=0.05",
                      "optim.warmup_epochs=0", "optim.schedule_unit=epoch", "optim.decay_norm_and_bias=true",
                      "optim.weight_decay=1e-4", "optim.weight_decay_end=1e-4")
    summary = pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"))
    assert summary["steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in losses)
    assert "embed_std" in records[-1] and records[-1]["lr"] == pytest.approx(0.05 * 16 / 256)
