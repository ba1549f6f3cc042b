"""ResNet-50 initialisation per method family.

The DINO code builds torchvision's resnet50, whose last BN of each residual block starts at
weight 1 (zero_init_residual=False); timm's resnet50 zero-initialises it by default
(zero_init_last=True). The DINO-family presets pass zero_init_last: false; the SimSiam presets
keep timm's zero-init. A ResNet-50 builds in about a second on CPU, so each distinct model
config is built once.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

from sslcli.config import ModelConfig, load_config
from sslcli.models import create_backbone

DINO_FAMILY = ["dino-rn50", "dino2-rn50", "nn-dino2-rn50", "adasim-dino2-rn50"]


@lru_cache(maxsize=None)
def _first_block_bn3_weight(model_json: str) -> torch.Tensor:
    backbone = create_backbone(ModelConfig(**json.loads(model_json)))
    return backbone.model.layer1[0].bn3.weight.detach().clone()


def bn3_weight(preset: str) -> torch.Tensor:
    m = load_config(preset).model
    assert m.arch == "resnet50", preset
    key = json.dumps({"arch": m.arch, "drop_path_rate": m.drop_path_rate, "kwargs": m.kwargs}, sort_keys=True)
    return _first_block_bn3_weight(key)


@pytest.mark.parametrize("name", DINO_FAMILY)
def test_dino_family_resnet50_is_initialised_like_torchvision(name):
    assert load_config(name).model.kwargs.get("zero_init_last") is False, name
    w = bn3_weight(name)
    assert torch.all(w == 1.0), f"{name}: layer1[0].bn3.weight is not all ones"


def test_simsiam_resnet50_keeps_zero_init_last():
    assert "zero_init_last" not in load_config("simsiam-rn50").model.kwargs
    w = bn3_weight("simsiam-rn50")
    assert torch.all(w == 0.0), "simsiam-rn50: layer1[0].bn3.weight is not all zeros"
