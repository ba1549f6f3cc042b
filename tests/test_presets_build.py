"""Every preset builds its method; large architectures are built at tiny depth/width."""

from __future__ import annotations

import pytest
import torch

from sslcli.config import load_config, preset_names
from sslcli.data import Batch
from sslcli.methods import StepContext, build_method
from sslcli.models.backbone import is_vit_arch


def shrink(cfg):
    """Same arch family and patch size, a fraction of the size."""
    if is_vit_arch(cfg.model.arch):
        cfg.model.kwargs = {**cfg.model.kwargs, "depth": 1, "embed_dim": 48, "num_heads": 2, "img_size": 32}
    cfg.method.out_dim, cfg.method.hidden_dim = 32, 32
    if cfg.method.name in ("dino", "dinov2"):
        cfg.method.bottleneck_dim = 16
    if cfg.method.name == "dinov2":
        cfg.method.ibot_out_dim = 32
    if cfg.method.name == "sove":  # the same structure with small memories
        m = cfg.method
        m.cls_memory, m.cls_anchors, m.patch_memory, m.patch_anchors = 256, 32, 64, 16
    return cfg


@pytest.mark.parametrize("name", preset_names())
def test_preset_builds_and_runs_a_step(name):
    cfg = shrink(load_config(name))
    method = build_method(cfg.model, cfg.method, epochs=cfg.train.epochs, steps_per_epoch=2)
    size = 32 if is_vit_arch(cfg.model.arch) else 64
    views = [torch.randn(2, 3, size, size)] * 2 + [torch.randn(2, 3, size // 2, size // 2)] * cfg.data.local_crops
    batch = Batch.from_views(views)
    if cfg.data.masking != "none":  # every other patch of the global views masked
        grid = (size // method.student_backbone.patch_size) ** 2
        batch.masks = (torch.arange(grid) % 2 == 0).expand(2, 2, grid)
    out = method.loss(batch, StepContext(0, 0, with_stats=True))
    assert torch.isfinite(out.loss) and set(out.stats) >= {"embed_std", "embed_rank"}
    if cfg.method.name in ("dino", "dinov2"):  # teacher distribution and temperature schedule
        assert set(out.stats) >= {"teacher_entropy", "kl"}
        assert len(method.teacher_temp) == cfg.train.epochs
