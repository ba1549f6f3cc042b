import pytest
import torch

from sslcli.config import ModelConfig
from sslcli.errors import ConfigError
from sslcli.models import DINOHead, create_backbone

TINY_VIT = ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0,
                       kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2})


def test_vit_features_api_and_dynamic_size():
    bb = create_backbone(TINY_VIT)
    x = torch.randn(2, 3, 32, 32)
    feats = bb.forward_features(x)
    assert feats["cls"].shape == (2, 32) and feats["patch"].shape == (2, 16, 32)
    assert torch.allclose(bb(x), feats["cls"])
    assert bb(torch.randn(2, 3, 16, 16)).shape == (2, 32)  # local crops: interpolated pos-embed
    blocks = bb.last_blocks(x, 2)
    assert len(blocks) == 2 and blocks[-1][0].shape == (2, 32) and blocks[-1][1].shape == (2, 16, 32)
    assert torch.allclose(blocks[-1][0], feats["cls"], atol=1e-5)  # last block through the final norm
    assert bb.patch_size == 8 and bb.embed_dim == 32


def test_cnn_features_api():
    bb = create_backbone(ModelConfig(arch="resnet18", drop_path_rate=0.0))
    feats = bb.forward_features(torch.randn(2, 3, 64, 64))
    assert feats["cls"].shape == (2, 512) and feats["patch"].shape == (2, 4, 512)
    assert torch.allclose(feats["patch"].mean(1), feats["cls"], atol=1e-5)  # pooled = mean of the map
    with pytest.raises(ConfigError, match="needs a ViT"):
        bb.last_blocks(torch.randn(1, 3, 64, 64), 1)


def test_swin_accepts_local_crop_sizes():
    bb = create_backbone(ModelConfig(arch="swin_tiny_patch4_window7_224", drop_path_rate=0.0,
                                     kwargs={"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}))
    assert bb(torch.randn(1, 3, 224, 224)).shape == (1, 128)
    assert bb(torch.randn(1, 3, 96, 96)).shape == (1, 128)
    assert bb.forward_features(torch.randn(1, 3, 224, 224))["patch"].shape == (1, 49, 128)


def test_unknown_arch_suggests_names():
    with pytest.raises(ConfigError, match=r"unknown model.arch 'vit_smal_patch16_224' \(did you mean: vit_small"):
        create_backbone(ModelConfig(arch="vit_smal_patch16_224"))
    with pytest.raises(ConfigError, match="model.kwargs"):
        create_backbone(ModelConfig(arch="resnet18", kwargs={"not_an_arg": 1}))


def test_dino_head_logits_are_cosines_with_fixed_gain():
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, norm_last_layer=True)
    logits = head(torch.randn(8, 32))
    assert logits.shape == (8, 50) and logits.abs().max() <= 1.0 + 1e-5
    assert not head.last_layer.weight_g.requires_grad
    free = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad


def test_weight_norm_linear_matches_torch_weight_norm():
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 5, bias=False))
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.rand(5, 1) + 0.5)
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(3, 4)
    assert torch.allclose(head.last_layer(x), ref(x), atol=1e-6)
