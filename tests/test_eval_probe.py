"""Linear-probe features per architecture (sslcli.eval.probe) and the model named in messages."""

from __future__ import annotations

import pytest
import torch

from sslcli.config import ModelConfig
from sslcli.errors import UsageError
from sslcli.eval.probe import default_probe, describe_probe, resolve_probe
from sslcli.eval.weights import WeightsInfo
from sslcli.models import create_backbone

DEMO_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 3, "num_heads": 3}


def skeleton(arch: str, **kwargs):
    """The backbone without memory for its weights (meta device): the rule reads only its shape."""
    with torch.device("meta"):
        return create_backbone(ModelConfig(arch=arch, drop_path_rate=0.0, kwargs=kwargs))


@pytest.mark.parametrize("arch, kwargs, expected, feature", [
    ("vit_small_patch16_224", {"img_size": 32}, (4, False), "CLS of the last 4 blocks (of 12)"),
    ("vit_base_patch16_224", {"img_size": 32}, (1, True), "CLS of the last block (of 12) + mean patch token"),
    ("vit_small_patch16_224", DEMO_KWARGS, (3, False), "CLS of the last 3 blocks (of 3)"),
    ("resnet50", {}, (1, False), "pooled vector"),
])
def test_defaults_per_architecture(arch, kwargs, expected, feature):
    backbone = skeleton(arch, **kwargs)
    assert default_probe(backbone) == expected
    assert resolve_probe(backbone, None, None) == expected
    assert describe_probe(backbone, *expected) == feature


def test_explicit_values_are_checked_against_the_model_the_weights_hold():
    info = WeightsInfo(path="runs/demo", arch="vit_small_patch16_224", kwargs=DEMO_KWARGS)
    demo = skeleton(info.arch, **info.kwargs)
    assert resolve_probe(demo, 2, True, info.model_name()) == (2, True)
    message = ("n_last_blocks must be in 1..3 for vit_small_patch16_224 {depth: 3, embed_dim: 96, img_size: 32, "
               "num_heads: 3, patch_size: 8}, got 4")
    with pytest.raises(UsageError) as e:
        resolve_probe(demo, 4, None, info.model_name())
    assert message in str(e.value)
    resnet = skeleton("resnet50")
    with pytest.raises(UsageError, match="ViTs only; resnet50 gives its pooled vector"):
        resolve_probe(resnet, None, True, WeightsInfo(path="w", arch="resnet50").model_name())
