import pytest
import torch

from sslcli.config import ModelConfig
from sslcli.errors import ConfigError
from sslcli.models import DINOHead, create_backbone, ema_update

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


# ----------------------------------------------------------------------------- fidelity of the DINO family


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, w0: int, h0: int) -> torch.Tensor:
    """DINO's vision_transformer.interpolate_pos_encoding for a square grid (restated for the test)."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    side = int(n ** 0.5)
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=((w0 + 0.1) / side, (h0 + 0.1) / side),
                                           mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def test_local_crops_resample_position_embeddings_as_dino():
    """96-px crops of a 224-px ViT: DINO's bicubic resampling without antialiasing, not timm's."""
    from timm.layers import resample_abs_pos_embed

    cfg = ModelConfig(drop_path_rate=0.0, kwargs=dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2))
    bb = create_backbone(cfg).eval()
    pos = bb.model.pos_embed
    expected = dino_interpolate_pos_encoding(pos, 6, 6)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens = bb.model.patch_embed(x).reshape(2, 36, 32)
        manual = torch.cat([bb.model.cls_token.expand(2, -1, -1), tokens], 1) + expected
        manual = bb.model.norm(bb.model.blocks(manual))
        cls, patch = bb.forward_tokens(x)
    assert torch.allclose(cls, manual[:, 0], atol=1e-5) and torch.allclose(patch, manual[:, 1:], atol=1e-5)
    timm_way = resample_abs_pos_embed(pos, (6, 6), (14, 14), num_prefix_tokens=1)
    assert not torch.allclose(timm_way, expected, atol=1e-3)  # antialiased: a different function
    antialiased = create_backbone(ModelConfig(**{**cfg.__dict__, "pos_embed_resample": "antialias"})).eval()
    antialiased.load_state_dict(bb.state_dict())
    with torch.no_grad():
        assert not torch.allclose(antialiased(x), bb(x), atol=1e-4)
        native = torch.randn(1, 3, 224, 224)
        assert torch.equal(antialiased(native), bb(native))  # no resampling at the trained size


def test_native_size_forward_equals_timm():
    bb = create_backbone(TINY_VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb.forward_tokens(x)[0], bb.model.forward_head(bb.model.forward_features(x), True),
                              atol=1e-6)


def test_vit_token_init_follows_dino():
    torch.manual_seed(0)
    cfg = ModelConfig(drop_path_rate=0.0, kwargs=dict(img_size=32, patch_size=8, embed_dim=384, depth=1, num_heads=6))
    dino = create_backbone(cfg).model
    timm_init = create_backbone(ModelConfig(**{**cfg.__dict__, "vit_token_init": "timm"})).model
    assert 0.015 < dino.cls_token.std().item() < 0.025 and dino.cls_token.abs().max() <= 2.0  # trunc-normal 0.02
    assert timm_init.cls_token.std().item() < 1e-5  # timm: normal std 1e-6
    assert 0.015 < dino.pos_embed.std().item() < 0.025


def test_math_attention_is_the_same_function_as_the_fused_kernel():
    """model.attention: math computes timm's attention as matrix products: the same features up to
    rounding, and the flag reaches every attention layer."""
    cfg = ModelConfig(drop_path_rate=0.0, kwargs=dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3))
    fused = create_backbone(cfg).eval()
    math = create_backbone(ModelConfig(**{**cfg.__dict__, "attention": "math"})).eval()
    math.load_state_dict(fused.state_dict())
    layers = [m for m in math.model.modules() if hasattr(m, "fused_attn")]
    assert len(layers) == 2 and not any(m.fused_attn for m in layers)
    assert all(m.fused_attn for m in fused.model.modules() if hasattr(m, "fused_attn"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = fused.forward_tokens(x), math.forward_tokens(x)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_masked_forward_uses_the_mask_token_outside_the_timm_model():
    bb = create_backbone(TINY_VIT, mask_token=True).eval()
    assert "mask_token" in dict(bb.named_parameters()) and "mask_token" not in bb.model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        bb.mask_token.normal_()
        cls, patch = bb.forward_tokens(x, masks)
        plain_cls, plain_patch = bb.forward_tokens(x)
        other = x.clone()
        other[0, :, :8, :] = torch.randn(3, 8, 32)  # patches 0..3: all masked in image 0
        cls_other, _ = bb.forward_tokens(other, masks)
    assert patch.shape == (2, 16, 32)
    assert torch.allclose(cls[1], plain_cls[1], atol=1e-6) and torch.allclose(patch[1], plain_patch[1], atol=1e-6)
    assert not torch.allclose(cls[0], plain_cls[0], atol=1e-4)
    assert torch.allclose(cls_other[0], cls[0], atol=1e-5)  # masked pixels no longer matter
    with pytest.raises(ConfigError, match="mask token"):
        create_backbone(TINY_VIT).forward_tokens(x, masks)


def test_registers_are_excluded_from_patch_tokens():
    cfg = ModelConfig(drop_path_rate=0.0, kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                      reg_tokens=4, no_embed_class=True))
    bb = create_backbone(cfg).eval()
    with torch.no_grad():
        cls, patch = bb.forward_tokens(torch.randn(2, 3, 32, 32))
        ref = bb.model.forward_features(torch.randn(2, 3, 32, 32))
    assert patch.shape == (2, 16, 32) and ref.shape == (2, 21, 32) and cls.shape == (2, 32)


def test_head_last_layer_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = DINOHead(32, 4096, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, head.last_layer(bottleneck.float()))  # the same fp32 computation
    bf16_logits = head.last_layer(bottleneck.float()).bfloat16().float()
    q32, q16 = (torch.softmax(t / 0.04, -1) for t in (logits, bf16_logits))
    assert (q32 - q16).abs().sum(-1).mean() > 1e-3  # what the fp32 last layer avoids at tau_t = 0.04


def test_ema_update_is_a_fused_lerp_of_parameters():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-7)
    with pytest.raises(ValueError):
        ema_update(teacher, torch.nn.Linear(3, 2, bias=False), 0.9)
